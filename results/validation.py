"""Predicted-vs-measured scores and report of ``dynas validate``: a score table, the host's
speed, the machine's noise, a plotly HTML and a CSV.

Input: the table of :func:`dynas.predictors.calibration.compare` (one row per measured network
or stage or block, with ``measured_ms``, ``predicted_ms``, ``rel_err``, ``part``, ``batch_size``,
``backbone``, ``choice``; optional measurement columns ``reference_ms``, ``host_check``,
``host_ratio_before``/``host_ratio_after``, ``round_spread``, ``paired_spread``).

:func:`score_validation` scores it per part (whole networks, single stages, single blocks) and
batch size, and again with the predictions scaled by the host's speed against calibration
where it was measured ("x host"); :func:`round_noise` says how far apart repeated rounds came
out; :func:`worst_networks` lists the largest errors.  The figure has one panel per kind of row
present, each a log-log scatter per batch size with the y = x line and the +/-10 % band.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from dynas.predictors.calibration import calibrated_static_ms, per_sample_gated, round_spread, summarize
from dynas.predictors.targets import HardwareTarget, load_target
from dynas.results.pareto import atomic_write_text

__all__ = [
    "QUIET_SPREAD_PCT",
    "HOST_STEADY",
    "SCORE_COLUMNS",
    "ValidationScores",
    "score_validation",
    "scored_parts",
    "score_row",
    "host_factors",
    "host_ratio",
    "RoundNoise",
    "round_noise",
    "worst_networks",
    "validation_figure",
    "write_validation_html",
    "write_validation_csv",
]


#: a median round spread above this (percent) means the machine was too busy to measure on
QUIET_SPREAD_PCT = 5.0

#: the predictions are scaled by the host's speed measured before and after the measurements
#: (``host_ratio_before``/``host_ratio_after``) only when the two agree this well (0.03 = 3 %)
HOST_STEADY = 0.03

#: columns of :attr:`ValidationScores.table`: the keys of
#: :func:`~dynas.predictors.calibration.summarize` after the part and batch size
SCORE_COLUMNS = ("part", "batch_size", "count", "mape_pct", "within_10pct", "spearman", "kendall", "max_abs_err_pct")

#: the parts scored, in the order of the table
_PARTS = ("networks", "stages", "blocks")


@dataclass(frozen=True)
class ValidationScores:
    """What :func:`score_validation` found."""

    table: pd.DataFrame  # one row per part and batch size (SCORE_COLUMNS); the "<part> x host" rows last
    host_ratios: tuple[float, ...]  # the host's speed now / at calibration, before and after (when recorded)
    steady_ratio: float | None  # their geometric mean when they agree within HOST_STEADY, else None
    host_scaling: str  # how the "x host" rows were scaled: "each", "pairs", "steady", or "" (no such rows)
    blocks: int  # block rows scored as blocks
    gated_blocks: int  # block rows of per-sample gated stages, scored with their stage instead


def scored_parts(df: pd.DataFrame) -> dict[str, pd.Series]:
    """[rows] bool masks of the parts :func:`score_validation` scores: "networks", "stages" and
    "blocks"; blocks of stages whose gates choose per sample which blocks run are left out
    (:func:`~dynas.predictors.calibration.per_sample_gated`: which blocks run changes every pass)."""
    kind = df["part"].astype(str)  # [rows] network, stage<s>, block<s>.<i>
    blocks = kind.str.startswith("block")
    gated = per_sample_gated(df) if blocks.any() else blocks
    return {"networks": kind == "network", "stages": kind.str.startswith("stage"), "blocks": blocks & ~gated}


def score_row(part: str, batch_size: Any, sub: pd.DataFrame) -> dict[str, Any]:
    """One row of the score table: :func:`~dynas.predictors.calibration.summarize` of the rows
    ``sub`` of one part and batch size."""
    return {"part": part, "batch_size": int(batch_size), **summarize(sub)}


def host_ratio(refs: Iterable[Mapping[str, Any]]) -> float | None:
    """The host's speed against calibration from the rows of
    :func:`dynas.kernels.calibrate.host_speed`: the median of their ``ratio`` (now / at
    calibration), what ``dynas validate`` records as ``host_ratio_before`` and
    ``host_ratio_after``; None when there are no rows."""
    ratios = [r["ratio"] for r in refs]
    return statistics.median(ratios) if ratios else None


def host_factors(
    df: pd.DataFrame, target: HardwareTarget, steady_ratio: float | None = None
) -> tuple[pd.Series | None, str]:
    """[rows] the host's speed factors (now / at calibration) to scale the predictions by for
    the "x host" scores, and how they were found: "each" (each network's static network timed
    right after it, ``reference_ms``), "pairs" (the same, timed pass by pass alongside it),
    "steady" (``steady_ratio``, the before/after ratio, when it held), or (None, "")."""
    if "reference_ms" in df and df["reference_ms"].notna().any() and target.static_ms:
        then = calibrated_static_ms(df, target)  # [rows] ms
        paired = "host_check" in df and (df["host_check"].astype(str) == "pairs").any()
        return pd.to_numeric(df["reference_ms"], errors="coerce") / then, "pairs" if paired else "each"
    if steady_ratio is not None:
        return pd.Series(steady_ratio, index=df.index), "steady"
    return None, ""


def score_validation(df: pd.DataFrame, target: "str | HardwareTarget") -> ValidationScores:
    """Score the predictions of ``target`` in ``df`` (:func:`~dynas.predictors.calibration.compare`
    's table) per part and batch size: MAPE, share within +/-10 %, Spearman, Kendall, largest
    error; then, where the host's speed was measured (:func:`host_factors`), the same with the
    predictions scaled by it: every part when each network has its own factor, whole networks
    only when it is the before/after ratio."""
    target = load_target(target)
    parts = scored_parts(df)
    batches = sorted(df["batch_size"].unique())
    rows = []
    for part in _PARTS:
        for n in batches:
            sub = df[parts[part] & (df["batch_size"] == n)]
            if not sub.empty:
                rows.append(score_row(part, n, sub))
    ratios = tuple(
        float(df[c].iloc[0]) for c in ("host_ratio_before", "host_ratio_after") if c in df and df[c].notna().any()
    )
    steady = len(ratios) == 2 and abs(ratios[0] / ratios[1] - 1) <= HOST_STEADY
    steady_ratio = math.sqrt(ratios[0] * ratios[1]) if steady else None
    host, how = host_factors(df, target, steady_ratio)
    if host is not None:
        for part in _PARTS:
            if how == "steady" and part != "networks":
                continue
            for n in batches:
                sel = parts[part] & (df["batch_size"] == n) & host.notna()
                sub = df[sel].copy()
                if sub.empty:
                    continue
                sub["rel_err"] = sub["predicted_ms"] * host[sel] / sub["measured_ms"] - 1
                rows.append(score_row(f"{part} x host", n, sub))
    blocks = df["part"].astype(str).str.startswith("block")
    return ValidationScores(
        table=pd.DataFrame(rows, columns=list(SCORE_COLUMNS)),
        host_ratios=ratios,
        steady_ratio=steady_ratio,
        host_scaling=how,
        blocks=int(parts["blocks"].sum()),
        gated_blocks=int((blocks & ~parts["blocks"]).sum()),
    )


@dataclass(frozen=True)
class RoundNoise:
    """The machine's own noise: how far apart the rounds of the same networks came out
    (:func:`~dynas.predictors.calibration.round_spread`)."""

    spread: dict[str, float]  # count, median_pct, p90_pct of the networks measured more than once
    paired: dict[str, float] | None  # the same relative to their paired static networks (pairs), else None

    @property
    def busy(self) -> bool:
        """Whether the machine was too busy to measure on: the median spread (relative to the
        static networks, with pairs) above :data:`QUIET_SPREAD_PCT`."""
        return (self.paired if self.paired is not None else self.spread)["median_pct"] > QUIET_SPREAD_PCT


def round_noise(df: pd.DataFrame) -> RoundNoise | None:
    """The :class:`RoundNoise` of a measurement (or :func:`~dynas.predictors.calibration.compare`)
    table; None when no network was measured more than once."""
    spread = round_spread(df)
    return None if spread is None else RoundNoise(spread, round_spread(df, "paired_spread"))


def worst_networks(df: pd.DataFrame, count: int = 5) -> pd.DataFrame:
    """The ``count`` whole-network rows of ``df`` with the largest \\|rel_err\\|, largest first."""
    nets = df[df["part"] == "network"]
    return nets.loc[nets["rel_err"].abs().sort_values(ascending=False).index].head(count)


#: panels of the figure: title, and the prefix of the ``part`` values it shows
_PANELS = (("whole networks", "network"), ("single stages", "stage"), ("single blocks", "block"))


def validation_figure(df: pd.DataFrame, title: str = "") -> go.Figure:
    kind = df["part"].astype(str)
    panels = [(name, prefix) for name, prefix in _PANELS if kind.str.startswith(prefix).any()] or list(_PANELS[:1])
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[name for name, _ in panels])
    for col, (_, prefix) in enumerate(panels, start=1):
        is_net = prefix == "network"
        part = df[kind.str.startswith(prefix)]
        if part.empty:
            continue
        lo = float(min(part["measured_ms"].min(), part["predicted_ms"].min())) * 0.8
        hi = float(max(part["measured_ms"].max(), part["predicted_ms"].max())) * 1.25
        xs = np.geomspace(lo, hi, 50)
        for factor, dash, name in ((1.0, "solid", "y = x"), (1.1, "dot", "+10 %"), (0.9, "dot", "-10 %")):
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=xs * factor,
                    mode="lines",
                    line=dict(color="grey", dash=dash, width=1),
                    name=name,
                    showlegend=col == 1,
                    legendgroup=name,
                ),
                row=1,
                col=col,
            )
        for i, (n, g) in enumerate(part.groupby("batch_size")):
            text = (
                g["backbone"]
                + " b"
                + g["batch_size"].astype(str)
                + " "
                + g["part"].astype(str)
                + "<br>"
                + g["choice"].astype(str)
                + "<br>error "
                + (100 * g["rel_err"]).map("{:+.1f} %".format)
            )
            fig.add_trace(
                go.Scatter(
                    x=g["measured_ms"],
                    y=g["predicted_ms"],
                    mode="markers",
                    text=text,
                    hoverinfo="text",
                    name=f"batch {n}",
                    legendgroup=f"b{n}",
                    showlegend=col == 1,
                    marker=dict(color=qualitative.Plotly[i % 10], size=7 if is_net else 5),
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(type="log", title="measured ms", row=1, col=col)
        fig.update_yaxes(type="log", title="predicted ms", row=1, col=col)
    fig.update_layout(template="plotly_white", height=560, title=title or "dynas validate: predicted vs measured")
    return fig


def write_validation_html(df: pd.DataFrame, path: "str | os.PathLike[str]", title: str = "") -> Path:
    """Write :func:`validation_figure` as one self-contained HTML file (atomically)."""
    return atomic_write_text(path, validation_figure(df, title).to_html(include_plotlyjs=True, full_html=True))


def write_validation_csv(df: pd.DataFrame, path: "str | os.PathLike[str]") -> Path:
    return atomic_write_text(path, df.to_csv(index=False))
