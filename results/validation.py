"""Predicted-vs-measured report of ``dynas validate``: a plotly HTML and a CSV.

Input: the table of :func:`dynas.predictors.calibration.compare` (one row per measured network
or stage or block, with ``measured_ms``, ``predicted_ms``, ``rel_err``, ``part``, ``batch_size``,
``backbone``, ``choice``).  One panel per kind of row present -- whole networks, single
stages, single blocks -- each a log-log scatter per batch size with the y = x line and the
+/-10 % band.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from dynas.results.pareto import atomic_write_text

__all__ = ["validation_figure", "write_validation_html", "write_validation_csv"]


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
            fig.add_trace(go.Scatter(x=xs, y=xs * factor, mode="lines", line=dict(color="grey", dash=dash, width=1),
                                     name=name, showlegend=col == 1, legendgroup=name), row=1, col=col)
        for i, (n, g) in enumerate(part.groupby("batch_size")):
            text = (g["backbone"] + " b" + g["batch_size"].astype(str) + " " + g["part"].astype(str) + "<br>"
                    + g["choice"].astype(str)
                    + "<br>error " + (100 * g["rel_err"]).map("{:+.1f} %".format))
            fig.add_trace(go.Scatter(x=g["measured_ms"], y=g["predicted_ms"], mode="markers", text=text,
                                     hoverinfo="text", name=f"batch {n}", legendgroup=f"b{n}", showlegend=col == 1,
                                     marker=dict(color=qualitative.Plotly[i % 10], size=7 if is_net else 5)),
                          row=1, col=col)
        fig.update_xaxes(type="log", title="measured ms", row=1, col=col)
        fig.update_yaxes(type="log", title="predicted ms", row=1, col=col)
    fig.update_layout(template="plotly_white", height=560, title=title or "dynas validate: predicted vs measured")
    return fig


def write_validation_html(df: pd.DataFrame, path: "str | os.PathLike[str]", title: str = "") -> Path:
    """Write :func:`validation_figure` as one self-contained HTML file (atomically)."""
    return atomic_write_text(path, validation_figure(df, title).to_html(include_plotlyjs=True, full_html=True))


def write_validation_csv(df: pd.DataFrame, path: "str | os.PathLike[str]") -> Path:
    return atomic_write_text(path, df.to_csv(index=False))
