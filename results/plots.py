"""One self-contained HTML report of dynas searches (plotly.js inlined, opens offline).

Top panel: every complete trial of every study (grey; infeasible ones as crosses), each
study's Pareto front (line + markers, one colour per study) and its static network (a star),
with x = the studies' objective (log axis): predicted latency per image (ms), or for energy
studies predicted energy per batch (mJ), and y = the proxy's top-1 (%), for studies searched
with latency budgets the mean top-1 over the budgets (the static star then at the static
network's own budget score, ``static_budget_top1``).  Studies of one report share their objective.

Bottom panel: the per-stage latency of one trial of the first study, split into compute,
memory and launch time, beside the static network's stages (ms per image).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from dynas.errors import DynasError, StudyError
from dynas.results.export import select_trial
from dynas.results.pareto import all_trials_table, atomic_write_text, check_study, objective_column, study_attr
from dynas.search.budgets import BUDGET_UNITS, study_budgets
from dynas.spaces.config import ArchConfig

__all__ = ["write_html", "make_figure", "study_label"]

_log = logging.getLogger(__name__)
_GREY = "rgba(140, 140, 140, 0.45)"
_PARTS = (("compute_ms", "compute", "#4C78A8"), ("memory_ms", "memory", "#F58518"), ("launch_ms", "launch", "#54A24B"))

#: objective -> (table column on the x axis, static study attr, its divisor attr or None, axis title, hover unit)
_AXES = {
    "latency_ms": (
        "latency_ms_per_image",
        "static_latency_ms",
        "batch_size",
        "predicted latency (ms per image)",
        "ms/image",
    ),
    "energy_mj": ("energy_mj", "static_energy_mj", None, "energy (mJ per batch)", "mJ/batch"),
}


def _hover(unit: str) -> str:
    return (
        "trial %{customdata[0]}<br>%{customdata[1]}<br>"
        f"%{{x:.4g}} {unit}, top-1 %{{y:.2f}}%<br>"
        "speed-up %{customdata[2]:.3f}x, FLOPs ratio %{customdata[3]:.3f}<extra>%{fullData.name}</extra>"
    )


def _as_list(
    studies: "optuna.Study | Sequence[optuna.Study] | Mapping[str, optuna.Study]",
) -> list[tuple[str | None, optuna.Study]]:
    if isinstance(studies, optuna.Study):
        return [(None, studies)]
    if isinstance(studies, Mapping):
        return [(str(k), v) for k, v in studies.items()]
    items = [(None, s) for s in studies]
    if not items:
        raise StudyError("studies=[] is empty; allowed: one or more dynas studies")
    return items


def study_label(study: optuna.Study, all_studies: Sequence[optuna.Study] = ()) -> str:
    """The target name, or ``"study (target)"`` when several studies share that target."""
    target = study.user_attrs.get("target") or study.study_name
    if sum(1 for s in all_studies if (s.user_attrs.get("target") or s.study_name) == target) > 1:
        return f"{study.study_name} ({target})"
    return str(target)


def _static_breakdown(study: optuna.Study, cfg: ArchConfig) -> list[dict[str, Any]] | None:
    """Per-stage prediction of the static network on the study's target, or None if unavailable."""
    from dynas.predictors.latency import predict

    target = study.user_attrs.get("target_path") or study.user_attrs.get("target")
    try:
        pred = predict(
            ArchConfig.static(cfg.backbone, cfg.input_size), target, batch_size=study.user_attrs.get("batch_size")
        )
    except DynasError as exc:
        _log.warning("static breakdown unavailable for target %r: %s", target, exc)
        return None
    return pred.to_dict()["stages"]


def _add_breakdown(fig: go.Figure, study: optuna.Study, trial: optuna.trial.FrozenTrial, row: int) -> str:
    pred = trial.user_attrs.get("prediction") or {}
    stages = pred.get("stages") or []
    if not stages:
        raise StudyError(
            f"trial {trial.number} has no stored per-stage prediction; allowed: a trial written by dynas search"
        )
    batch = float(study_attr(study, "batch_size"))
    cfg = ArchConfig.from_dict(trial.user_attrs["config"])
    static_stages = _static_breakdown(study, cfg)
    # multi-category x axis: level 0 = stage, level 1 = dynamic/static
    labels = [f"stage {s['stage']}" for s in stages]
    x = [labels + labels, ["dynamic"] * len(stages) + ["static"] * len(stages)]
    for key, name, colour in _PARTS:
        dyn = [s[key] / batch for s in stages]
        sta = [s[key] / batch for s in static_stages] if static_stages else [0.0] * len(stages)
        fig.add_trace(
            go.Bar(
                x=x,
                y=dyn + sta,
                name=name,
                legendgroup="breakdown",
                marker_color=colour,
                hovertemplate=f"%{{x}}: {name} %{{y:.4g}} ms/image<extra></extra>",
            ),
            row=row,
            col=1,
        )
    if static_stages is None:
        # Only the static totals are known: show them as one segment.
        fig.add_trace(
            go.Bar(
                x=x,
                y=[0.0] * len(stages) + [s["static_latency_ms"] / batch for s in stages],
                name="static total",
                legendgroup="breakdown",
                marker_color="#9D9D9D",
            ),
            row=row,
            col=1,
        )
    choices = " | ".join(s.get("choice", "") for s in stages)
    return (
        f"trial {trial.number} ({choices}) vs static, ms per image; "
        f"stem {pred.get('stem_ms', 0.0) / batch:.3g} ms, head {pred.get('head_ms', 0.0) / batch:.3g} ms"
    )


def make_figure(
    studies: "optuna.Study | Sequence[optuna.Study] | Mapping[str, optuna.Study]",
    breakdown_trial: int | None = None,
) -> go.Figure:
    """The report's figure (see the module docstring); ``write_html`` saves it."""
    items = _as_list(studies)
    only = [s for _, s in items]
    for s in only:
        check_study(s)
    first = only[0]
    objective = objective_column(first)
    for s in only:
        if objective_column(s) != objective:
            raise StudyError(
                f"study {s.study_name!r} minimised {objective_column(s)}, {first.study_name!r} {objective}; "
                "allowed: studies of one objective in one report"
            )
    column, static_key, divisor, axis_title, unit = _AXES[objective]
    hover = _hover(unit)
    chosen = select_trial(first, trial=breakdown_trial)
    colours = qualitative.Plotly
    fig = make_subplots(
        rows=2,
        cols=1,
        vertical_spacing=0.14,
        row_heights=[0.62, 0.38],
        subplot_titles=(f"Pareto fronts: {axis_title.split(' (')[0]} vs proxy top-1", "Per-stage latency"),
    )
    for k, (given, study) in enumerate(items):
        label = given or study_label(study, only)
        colour = colours[k % len(colours)]
        table = all_trials_table(study)
        custom = table[["trial", "stages", "speedup", "flops_ratio"]].to_numpy(dtype=object)  # (n, 4)
        fig.add_trace(
            go.Scatter(
                x=table[column],
                y=table["top1"],
                mode="markers",
                name=f"{label}: all trials",
                legendgroup=label,
                customdata=custom,
                hovertemplate=hover,
                marker={"color": _GREY, "size": 6, "symbol": ["circle" if f else "x" for f in table["feasible"]]},
            ),
            row=1,
            col=1,
        )
        front = table[table["pareto"]]
        fig.add_trace(
            go.Scatter(
                x=front[column],
                y=front["top1"],
                mode="lines+markers",
                name=f"{label}: Pareto front",
                legendgroup=label,
                customdata=custom[table["pareto"].to_numpy()],
                hovertemplate=hover,
                line={"color": colour, "shape": "hv"},
                marker={"color": colour, "size": 8},
            ),
            row=1,
            col=1,
        )
        static_x = float(study_attr(study, static_key)) / (float(study_attr(study, divisor)) if divisor else 1.0)
        static_key_top1 = "static_budget_top1" if study_budgets(study.user_attrs) else "static_top1"
        fig.add_trace(
            go.Scatter(
                x=[static_x],
                y=[float(study_attr(study, static_key_top1))],
                mode="markers",
                name=f"{label}: static",
                legendgroup=label,
                marker={"color": colour, "size": 14, "symbol": "star", "line": {"width": 1, "color": "black"}},
                hovertemplate=f"static network<br>%{{x:.4g}} {unit}, top-1 %{{y:.2f}}%<extra>%{{fullData.name}}</extra>",
            ),
            row=1,
            col=1,
        )
    title = _add_breakdown(fig, first, chosen, row=2)
    fig.layout.annotations[1].update(text=f"Per-stage latency: {title}")
    fig.update_xaxes(title_text=axis_title, type="log", row=1, col=1)
    budgets = study_budgets(first.user_attrs)
    y_title = (
        f"mean proxy top-1 over {len(budgets[0])} {BUDGET_UNITS[budgets[1]].kind} budgets (%)"
        if budgets
        else "proxy top-1 (%)"
    )
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_yaxes(title_text="ms per image", row=2, col=1)
    fig.update_layout(
        barmode="stack",
        height=1000,
        template="plotly_white",
        hovermode="closest",
        title=f"dynas: {', '.join(label or study_label(s, only) for label, s in items)}",
    )
    return fig


def write_html(
    studies: "optuna.Study | Sequence[optuna.Study] | Mapping[str, optuna.Study]",
    path: str | os.PathLike[str],
    breakdown_trial: int | None = None,
) -> Path:
    """Write the report for one study, a list of studies (one per target) or a ``{label: study}``
    mapping to ``path`` as one self-contained HTML file (atomically); returns the path.

    The breakdown panel shows ``breakdown_trial`` (a trial number of the first study) or, by
    default, the trial :func:`~dynas.results.export.select_trial` picks.
    """
    fig = make_figure(studies, breakdown_trial=breakdown_trial)
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    return atomic_write_text(path, html)
