"""Tables and hypervolume of a finished (or running) dynas search.

A dynas study has two objectives, ``values = [cost, top1]``: the cost of one forward pass of
the whole batch (minimised), ``latency_ms`` or ``energy_mj`` as the study's user attr
``objectives`` names it (:func:`objective_column`), and the accuracy proxy's top-1 in percent
(maximised).  Each trial carries user attrs ``config``, ``short``, ``prediction``, ``speedup``,
``flops_ratio``, ``latency_ms`` and ``latency_ms_per_image`` (and ``energy_mj``,
``energy_mj_per_image`` where the target predicts energy) whatever the objective; the study
carries ``static_latency_ms``, ``static_energy_mj``, ``static_top1``, ``batch_size``, ``target``
and friends (see :mod:`dynas.search.study`).  Tables name the cost column after the objective,
sort by it and carry both latency and energy where the trials have them.

The Pareto front is Optuna's own (:attr:`optuna.study.Study.best_trials`, which already drops
infeasible trials of a constrained study); nothing here re-implements dominance.

Hypervolume is measured in a normalised minimisation space so that studies on different
targets compare: ``(cost / static cost, -top1)`` (``latency_ms / static_latency_ms``, or
``energy_mj / static_energy_mj``).  The default reference point is
:data:`DEFAULT_REFERENCE_LATENCY_RATIO` = 1.5 (50% costlier than the static network) and
``static_top1 - DEFAULT_REFERENCE_TOP1_DROP`` = static top-1 minus 5 points; trials beyond the
reference point in either objective add nothing.

A study searched with latency or energy budgets (user attr ``budgets_ms`` or ``budgets_mj``) has
the mean top-1 over its budgets as ``top1`` (:mod:`dynas.search.budgets`); its tables add one
``top1@Bms`` (``top1@Bmj``) column per budget and ``top1_own`` (the own head's top-1) after ``top1`` (:func:`budget_columns`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import optuna
import pandas as pd
from optuna._hypervolume import compute_hypervolume
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from dynas import files
from dynas.errors import StudyError
from dynas.search import budgets
from dynas.search.stopping import is_finished
from dynas.spaces.config import ArchConfig

__all__ = [
    "PARETO_COLUMNS",
    "ENERGY_COLUMNS",
    "CHECKPOINT_COLUMNS",
    "objective_column",
    "budget_columns",
    "trial_latency_ms",
    "checkpoints_table",
    "DEFAULT_REFERENCE_LATENCY_RATIO",
    "DEFAULT_REFERENCE_TOP1_DROP",
    "pareto_table",
    "front_trials",
    "all_trials_table",
    "write_csv",
    "default_reference",
    "hypervolume",
    "hypervolume_history",
    "is_feasible",
]

#: columns of :func:`pareto_table` of a latency study without energy predictions;
#: :func:`all_trials_table` adds ``feasible`` and ``pareto``
PARETO_COLUMNS: tuple[str, ...] = (
    "trial",
    "latency_ms",
    "latency_ms_per_image",
    "speedup",
    "top1",
    "flops_ratio",
    "stages",
)
#: the energy columns the tables add where trials have energy (an energy study: first, after ``trial``)
ENERGY_COLUMNS: tuple[str, ...] = ("energy_mj", "energy_mj_per_image")
#: the cost columns a table may have: the latency pair and the energy pair
_COSTS = {"latency_ms": ("latency_ms", "latency_ms_per_image"), "energy_mj": ENERGY_COLUMNS}
#: default reference latency ratio (dynamic / static) of the hypervolume: 50% slower than static
DEFAULT_REFERENCE_LATENCY_RATIO: float = 1.5
#: default reference top-1 of the hypervolume is the static top-1 minus this many points
DEFAULT_REFERENCE_TOP1_DROP: float = 5.0

_DIRECTIONS = [StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE]


# ----------------------------------------------------------------------------- helpers (shared)


def check_study(study: optuna.Study) -> None:
    """Raise :class:`StudyError` unless ``study`` has dynas's two objectives (latency_ms, top1)."""
    if list(study.directions) != _DIRECTIONS:
        got = ", ".join(d.name.lower() for d in study.directions)
        raise StudyError(
            f"study {study.study_name!r} has directions [{got}]; allowed: [minimize, maximize] "
            "(latency_ms or energy_mj, top1) as written by dynas search"
        )


def objective_column(study: optuna.Study) -> str:
    """The name of the study's first objective: ``latency_ms`` or ``energy_mj`` (the user attr
    ``objectives``; studies without it minimised latency)."""
    first = (study.user_attrs.get("objectives") or ["latency_ms"])[0]
    if first not in _COSTS:
        raise StudyError(f"study {study.study_name!r} has objectives[0]={first!r}; allowed: {', '.join(_COSTS)}")
    return str(first)


def budget_columns(study: optuna.Study) -> tuple[str, ...]:
    """The columns a budget study's tables add after ``top1``: ``top1@Bms`` per budget, then
    ``top1_own``; none for a study without budgets.  Energy budgets (``budgets_mj``): ``top1@Bmj``."""
    given = budgets.study_budgets(study.user_attrs)
    return (*budgets.budget_columns(*given), "top1_own") if given else ()


def trial_latency_ms(trial: FrozenTrial, first: str = "latency_ms") -> float:
    """The predicted latency (ms, whole batch) of a complete trial of a study whose first
    objective is ``first``: the objective itself, or the user attr ``latency_ms``."""
    if first == "latency_ms":
        return float(trial.values[0])
    return float(
        trial.user_attrs.get("latency_ms", (trial.user_attrs.get("prediction") or {}).get("latency_ms", math.nan))
    )


def study_attr(study: optuna.Study, key: str) -> Any:
    """A study user attr that dynas search always sets; :class:`StudyError` if it is missing."""
    attrs = study.user_attrs
    if key not in attrs or attrs[key] is None:
        raise StudyError(
            f"study {study.study_name!r} has no user attr {key!r}; allowed: a study written by dynas search"
        )
    return attrs[key]


def is_feasible(trial: FrozenTrial) -> bool:
    """Optuna's rule: feasible when every constraint value is <= 0 (no constraints: feasible)."""
    return all(c <= 0.0 for c in trial.constraints.values())


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials in trial-number order."""
    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`dynas.files.atomic_write_text`; a missing folder is a :class:`StudyError`."""
    return files.atomic_write_text(path, text, StudyError)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`dynas.files.atomic_write_bytes`; a missing folder is a :class:`StudyError`."""
    return files.atomic_write_bytes(path, data, StudyError)


def _costs(study: optuna.Study, trial: FrozenTrial, first: str) -> dict[str, float]:
    """Latency and energy (whole batch and per image) of a complete trial; NaN where unknown.

    The objective is the trial's first value; the other cost comes from the user attrs the
    search writes (or the stored prediction, for trials added by other means)."""
    ua, pred = trial.user_attrs, trial.user_attrs.get("prediction") or {}
    batch = study.user_attrs.get("batch_size")
    out: dict[str, float] = {}
    for name, (whole, per_image) in _COSTS.items():
        value = float(trial.values[0]) if name == first else ua.get(whole, pred.get(whole))
        value = math.nan if value is None else float(value)
        each = ua.get(per_image)
        if each is None:
            each = value / batch if batch else math.nan
        out[whole], out[per_image] = value, float(each)
    return out


def trial_row(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """One table row of a complete trial: :data:`PARETO_COLUMNS` and :data:`ENERGY_COLUMNS`
    (NaN where the trial has no energy; :func:`table_columns` then leaves them out).

    Reads the user attrs the search writes; falls back to values derived from the objectives and
    the study attrs for trials added by other means (``flops_ratio`` is then NaN).
    """
    first = objective_column(study)
    costs = _costs(study, trial, first)
    top1 = float(trial.values[1])
    ua = trial.user_attrs
    speedup = ua.get("speedup")
    if speedup is None:
        static, latency_ms = study.user_attrs.get("static_latency_ms"), costs["latency_ms"]
        speedup = static / latency_ms if static and latency_ms > 0 else math.nan
    flops_ratio = ua.get("flops_ratio")
    short = ua.get("short")
    if short is None and isinstance(ua.get("config"), dict):
        short = ArchConfig.from_dict(ua["config"]).short()
    columns = budget_columns(study)
    per_budget = [*(ua.get("budget_top1") or [None] * (len(columns) - 1)), ua.get("top1_own")] if columns else []
    return {
        "trial": trial.number,
        **costs,
        "speedup": float(speedup),
        "top1": top1,
        **{c: math.nan if v is None else float(v) for c, v in zip(columns, per_budget)},
        "flops_ratio": float(flops_ratio) if flops_ratio is not None else math.nan,
        "stages": short if short is not None else "",
    }


def table_columns(first: str, rows: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The columns of a table of ``rows`` in a study minimising ``first``: ``trial``, the
    objective's pair, the other cost's pair (left out when no row has it), then
    ``speedup``, ``top1``, the ``extra`` columns (a budget study's :func:`budget_columns`), ``flops_ratio``, ``stages``."""
    other = next(name for name in _COSTS if name != first)
    has_other = any(not math.isnan(r[other]) for r in rows) or (other == "latency_ms")
    costs = (*_COSTS[first], *(_COSTS[other] if has_other else ()))
    return ("trial", *costs, "speedup", "top1", *extra, "flops_ratio", "stages")


def _frame(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame([{c: r[c] for c in columns} for r in rows], columns=list(columns))
    first = columns[1]  # the objective's column
    if len(df):
        # Cheapest first; equal cost: the more accurate first, then the older trial.
        df = df.sort_values([first, "top1", "trial"], ascending=[True, False, True], kind="stable")
    floats = [c for c in columns if c not in ("trial", "stages", "feasible", "pareto")]
    df = df.astype({"trial": "int64", **{c: "float64" for c in floats}})
    return df.reset_index(drop=True)


# ----------------------------------------------------------------------------- tables


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Optuna's Pareto front (``study.best_trials``, feasible only) with repeated configs dropped.

    A sampler may propose a config it has seen; the search then reuses the earlier trial's
    values and marks the copy with the user attr ``duplicate_of``, so copies sit on the front
    beside their original.  They are dropped here; the original stays.
    """
    return [t for t in study.best_trials if "duplicate_of" not in t.user_attrs]


def pareto_table(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front (:func:`front_trials`: Optuna's, feasible only, each config once),
    cheapest first in the study's objective.

    Columns (:func:`table_columns`): ``trial``; the objective, ``latency_ms`` or ``energy_mj``
    (whole batch), and its ``_per_image``; the other cost where trials have it (a latency
    study on a target with energy prices has ``energy_mj`` too; an energy study always has
    ``latency_ms``); ``speedup`` (static / dynamic latency), ``top1`` (%), ``flops_ratio``
    (expected / dense FLOPs) and ``stages`` (the compact per-stage string, e.g.
    ``"S8@0.50 | C2@0.50 | L@0.50 | static"``, then ``[exits 0,2 light]`` if any).  A budget
    study's ``top1`` is the mean over its budgets, followed by :func:`budget_columns`.
    """
    check_study(study)
    rows = [trial_row(study, t) for t in front_trials(study)]
    return _frame(rows, table_columns(objective_column(study), rows, budget_columns(study)))


def all_trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every COMPLETE trial, cheapest first, with the columns of :func:`pareto_table` plus two
    bools: ``feasible`` (all constraints <= 0) and ``pareto`` (in :func:`front_trials`)."""
    check_study(study)
    front = {t.number for t in front_trials(study)}
    rows = []
    for t in complete_trials(study):
        row = trial_row(study, t)
        row["feasible"] = is_feasible(t)
        row["pareto"] = t.number in front
        rows.append(row)
    df = _frame(rows, (*table_columns(objective_column(study), rows, budget_columns(study)), "feasible", "pareto"))
    return df.astype({"feasible": "bool", "pareto": "bool"})


#: columns of :func:`checkpoints_table` (of an energy study: ``energy_mj`` for ``latency_ms``)
CHECKPOINT_COLUMNS: tuple[str, ...] = ("trial", "state", "latency_ms", "top1_by_step", "stop_reason", "stages")


def checkpoints_table(study: optuna.Study) -> pd.DataFrame:
    """Every finished trial that reported checkpoints (a training proxy), in trial order.

    Columns: ``trial``; ``state`` (``complete`` or ``stopped@STEP``); ``latency_ms`` or
    ``energy_mj``, the study's objective (the configured prediction of a stopped trial);
    ``top1_by_step`` (the trial's
    intermediate values, ``"STEP:TOP1"`` pairs); ``stop_reason`` (empty when complete);
    ``stages``.  Empty for studies whose proxy has no checkpoints (``prior``).
    """
    check_study(study)
    first = objective_column(study)
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if not t.intermediate_values or not is_finished(t):
            continue
        ua = t.user_attrs
        complete = t.state == TrialState.COMPLETE
        rows.append(
            {
                "trial": t.number,
                "state": "complete" if complete else f"stopped@{ua.get('stopped_at_step', '?')}",
                first: float(t.values[0]) if complete else float(ua.get(f"{first}_configured", math.nan)),
                "top1_by_step": " ".join(f"{k}:{v:.1f}" for k, v in sorted(t.intermediate_values.items())),
                "stop_reason": "" if complete else str(ua.get("stop_reason", "")),
                "stages": ua.get("short", ""),
            }
        )
    return pd.DataFrame(rows, columns=[first if c == "latency_ms" else c for c in CHECKPOINT_COLUMNS])


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as CSV (no index) atomically; returns the path."""
    return atomic_write_text(path, df.to_csv(index=False))


# ----------------------------------------------------------------------------- hypervolume


def default_reference(study: optuna.Study) -> tuple[float, float]:
    """The documented default reference point ``(latency_ratio, top1)`` in natural units:
    latency ratio 1.5, and the study attr ``reference_top1`` that the proxy set (prior:
    ``static_top1 - 5.0``; finetune: chance level), or ``static_top1 - 5.0`` for studies without
    it.  In the minimisation space it is ``(1.5, -top1)``."""
    ref = study.user_attrs.get("reference_top1")
    if ref is None:
        ref = float(study_attr(study, "static_top1")) - DEFAULT_REFERENCE_TOP1_DROP
    return DEFAULT_REFERENCE_LATENCY_RATIO, float(ref)


def _reference_point(study: optuna.Study, reference: Sequence[float] | None) -> np.ndarray:
    if reference is None:
        reference = default_reference(study)
    ref = [float(r) for r in reference]
    if len(ref) != 2 or not all(math.isfinite(r) for r in ref) or ref[0] <= 0 or ref[1] < 0:
        raise StudyError(
            f"reference={tuple(reference)!r} is invalid; allowed: (latency_ratio > 0, top1 >= 0) in natural "
            "units, e.g. (1.5, 71.0); top1 is in percent, not negated"
        )
    return np.array([ref[0], -ref[1]])  # shape (2,): minimisation space (latency ratio, -top1)


def _points(study: optuna.Study, trials: Iterable[FrozenTrial]) -> np.ndarray:
    """(n, 2) array of (cost / static cost, -top1) for the given trials (cost: the objective)."""
    key = f"static_{objective_column(study)}"  # static_latency_ms or static_energy_mj
    static = float(study_attr(study, key))
    if not static > 0:
        raise StudyError(f"study {study.study_name!r} has {key}={static!r}; allowed: a positive number")
    pts = np.array([[t.values[0] / static, -t.values[1]] for t in trials], dtype=np.float64)
    return pts.reshape(-1, 2)  # shape (n, 2) even when n == 0


def hypervolume(study: optuna.Study, reference: Sequence[float] | None = None) -> float:
    """Area dominated by the feasible complete trials, up to the reference point.

    Space: ``(latency_ms / static_latency_ms, -top1)`` (an energy study: ``energy_mj /
    static_energy_mj``), both minimised.  ``reference`` is
    ``(cost ratio, top1)`` in natural units (top-1 in percent, not negated); default
    :func:`default_reference` = ``(1.5, static_top1 - 5)``.  Trials worse than the reference in
    either objective are left out.  Units: cost ratio x top-1 points.
    """
    check_study(study)
    ref = _reference_point(study, reference)
    pts = _points(study, [t for t in complete_trials(study) if is_feasible(t)])
    pts = pts[np.all(pts <= ref, axis=1)]  # (m, 2): those inside the reference box
    return float(compute_hypervolume(pts, ref))


def hypervolume_history(study: optuna.Study, reference: Sequence[float] | None = None) -> list[float]:
    """:func:`hypervolume` after each COMPLETE trial, in trial-number order (one value per trial).

    Incremental: it keeps only the points not weakly dominated by a later one and recomputes the
    area only when a new feasible trial inside the reference box is not weakly dominated, so a
    1000-trial study costs about 1000 small 2-D computations.
    """
    check_study(study)
    ref = _reference_point(study, reference)
    trials = complete_trials(study)
    pts = _points(study, trials)  # (n, 2), row i is trials[i]
    keep = np.empty((0, 2), dtype=np.float64)  # current candidate points (k, 2)
    hv = 0.0
    history: list[float] = []
    for trial, p in zip(trials, pts):
        if is_feasible(trial) and np.all(p <= ref) and not np.any(np.all(keep <= p, axis=1)):
            # p is new area: drop the points it weakly dominates, then measure again.
            keep = np.vstack([keep[~np.all(p <= keep, axis=1)], p[None, :]])  # (k', 2)
            hv = float(compute_hypervolume(keep, ref, assume_pareto=True))
        history.append(hv)
    return history
