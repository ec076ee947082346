"""What ``dynas search``, ``dynas pareto`` and ``dynas export`` print about a study: its summary and
front (:func:`print_front`), the exported trial (:func:`print_exported`), and the error when no
trial meets the constraints (:func:`raise_infeasible`)."""

from __future__ import annotations

from typing import Any

from dynas.cli.common import echo, frame_text
from dynas.search.budgets import BUDGET_UNITS, study_budgets
from dynas.search.options import SearchOptions

__all__ = ["print_front", "print_exported", "raise_infeasible"]


def print_front(study: Any, top: int) -> None:
    """Print a study's summary, its checkpoints and at most ``top`` Pareto rows (0: all)."""
    from dynas.results import checkpoints_table, hypervolume, pareto_table
    from dynas.search.stopping import is_stopped

    a = study.user_attrs
    df = pareto_table(study)
    trials = study.get_trials(deepcopy=False)
    n_done = sum(1 for t in trials if t.state.name == "COMPLETE")
    n_stopped = sum(1 for t in trials if is_stopped(t))
    stopped = f" + {n_stopped} stopped early ({(a.get('early_stop') or {}).get('name', '?')})" if n_stopped else ""
    h, w = a.get("input_size", ["?", "?"])
    echo(
        f"study {study.study_name}: {a.get('backbone')} @ {h}x{w} on {a.get('target')}, batch {a.get('batch_size')}, "
        f"proxy {a.get('proxy')}; {n_done} complete trials{stopped}, {len(df)} distinct configs on the Pareto front"
    )
    static_ms, static_mj, static_top1 = a.get("static_latency_ms"), a.get("static_energy_mj"), a.get("static_top1")
    if static_ms is not None and static_top1 is not None:
        energy = f", {static_mj:.4g} mJ" if static_mj is not None else ""
        echo(
            f"static: {static_ms:.4g} ms{energy} per batch, top-1 {static_top1:.2f}%; "
            f"minimising {a.get('objective', 'latency')}, hypervolume {hypervolume(study):.4g}"
        )
    given = study_budgets(a)
    if given:
        unit = BUDGET_UNITS[given[1]]
        echo(
            f"{unit.kind} budgets {', '.join(f'{b:.4g}' for b in given[0])} {unit.shown} per batch: top1 is the mean of "
            f"the top1@ columns (the deepest exit that fits each, chance {a.get('chance_top1', 0):.3g}% if none); "
            f"static network {a.get('static_budget_top1', float('nan')):.2f}%; top1_own is the own head's"
        )
    checkpoints = checkpoints_table(study)
    if len(checkpoints):
        shown = checkpoints if top == 0 else checkpoints.tail(top)
        echo(
            f"checkpoints (held-out top-1 % after each step count; {len(shown)} of {len(checkpoints)} trials, latest last):"
        )
        echo(frame_text(shown))
        echo()
    if len(df) == 0:
        echo("no feasible trial on the front")
        return
    shown = df if top == 0 else df.head(top)
    echo(frame_text(shown))
    if len(shown) < len(df):
        echo(f"({len(shown)} of {len(df)} shown; --top 0 shows all, --csv writes all)")


def print_exported(study: Any, trial: Any, path: str) -> None:
    ua = trial.user_attrs
    costs = [f"{ua[k]:.4g} {unit}" for k, unit in (("latency_ms", "ms"), ("energy_mj", "mJ")) if ua.get(k) is not None]
    if not costs:  # a trial written before trials stored both: its objective only
        from dynas.results.pareto import objective_column

        costs = [f"{trial.values[0]:.4g} {'mJ' if objective_column(study) == 'energy_mj' else 'ms'}"]
    what = "mean top-1 over the budgets" if study_budgets(study.user_attrs) else "top-1"
    echo(
        f"exported trial {trial.number} ({', '.join(costs)} per batch, {what} {trial.values[1]:.2f}%; "
        f"{ua.get('short', '')}) to {path}"
    )


def raise_infeasible(study: Any, options: SearchOptions) -> None:
    from dynas.errors import StudyError

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    bounds = []
    if options.max_latency_ms is not None and done:
        from dynas.results.pareto import objective_column, trial_latency_ms

        first = objective_column(study)
        best = min(trial_latency_ms(t, first) for t in done)
        bounds.append(f"--max-latency-ms {options.max_latency_ms:g} (fastest trial: {best:.4g} ms)")
    if options.max_latency_ratio is not None and done:
        best = min(t.user_attrs.get("latency_ratio", float("inf")) for t in done)
        bounds.append(f"--max-latency-ratio {options.max_latency_ratio:g} (lowest ratio: {best:.4g})")
    raise StudyError(
        f"no feasible trial among the {len(done)} complete trials of study {study.study_name!r}: "
        f"{'; '.join(bounds) or 'no constraint met'}; loosen the constraints or run more trials (no report or export written)"
    )
