"""The reference simulator's published figures, and how close the model comes to them.

Source of every number in ``data/reference_figures.json``: LAUDNet
(Han et al., TPAMI 2024, arXiv 2308.15949; values computed by the authors' public DyNetSimulator, LeapLabTHU/LAUDNet).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from dynas.predictors.latency import predict
from dynas.predictors.targets import load_target
from dynas.spaces.config import ArchConfig, StageConfig

__all__ = ["reference_figures", "ratio_config", "compare_reference"]

_DATA = Path(__file__).resolve().parent / "data" / "reference_figures.json"


@lru_cache(maxsize=1)
def reference_figures() -> dict[str, Any]:
    return json.loads(_DATA.read_text())


def ratio_config(entry: dict[str, Any]) -> ArchConfig:
    """The uniform-rate config a ratio entry describes."""
    p, rate = entry["paradigm"], entry["rate"]
    stages = []
    for s in range(4):
        if p == "spatial":
            stages.append(StageConfig("spatial", rate, spatial_granularity=entry["spatial_granularity"][s]))
        elif p == "channel":
            stages.append(StageConfig("channel", rate, channel_granularity=entry["channel_granularity"]))
        else:
            stages.append(StageConfig("layer", rate))
    return ArchConfig(entry["backbone"], (224, 224), tuple(stages))


def compare_reference() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Tables of reference vs predicted figures and a summary of the agreement."""
    ref = reference_figures()
    rows = []
    for entry in ref["static_ms_per_image"]:
        tgt = load_target(entry["target"])
        n = tgt.default_batch_size
        pred = predict(ArchConfig.static(entry["backbone"]), tgt, n)
        rows.append(
            {
                "backbone": entry["backbone"],
                "target": entry["target"],
                "reference_ms": entry["ms"],
                "dynas_ms": sum(st.static_latency_ms for st in pred.stages) / n,
            }
        )
    static = pd.DataFrame(rows)
    static["rel_err"] = static["dynas_ms"] / static["reference_ms"] - 1
    rows = []
    for entry in ref["ratios"]:
        tgt = load_target(entry["target"])
        cfg = ratio_config(entry)
        stages = predict(cfg, tgt, entry["batch_size"]).stages
        rows.append(
            {
                "backbone": entry["backbone"],
                "config": cfg.short(),
                "reference": entry["ratio"],
                "dynas": sum(st.latency_ms for st in stages) / sum(st.static_latency_ms for st in stages),
            }
        )
    ratios = pd.DataFrame(rows)
    ratios["abs_err"] = (ratios["dynas"] - ratios["reference"]).abs()
    summary = {
        "static: median |rel err|": float(static["rel_err"].abs().median()),
        "static: max |rel err|": float(static["rel_err"].abs().max()),
        "static: Spearman": float(static["reference_ms"].rank().corr(static["dynas_ms"].rank())),
        "ratios: mean |err|": float(ratios["abs_err"].mean()),
        "ratios: max |err|": float(ratios["abs_err"].max()),
        "ratios: Spearman": float(ratios["reference"].rank().corr(ratios["dynas"].rank())),
    }
    return static, ratios, summary
