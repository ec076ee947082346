"""The published accuracy points the ``prior`` proxy (:mod:`dynas.predictors.accuracy`) is fitted
to: reading and validating ``data/accuracy_points.json``.

The file names, with a source for every value, the static top-1 of each backbone, the reference
network the curves were published for (backbone, input size, spatial and channel granularity
per stage) and one curve of (rate, top-1) points per paradigm.  A bad file is a one-line
:class:`~dynas.errors.ConfigError` naming the file, the field, the value and what is allowed.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import pandas as pd

from dynas.errors import ConfigError
from dynas.spaces.backbones import get_backbone, list_backbones

__all__ = ["CURVE_PARADIGMS", "DEFAULT_DATA_PATH", "AccuracyData", "load_accuracy_points"]

#: paradigms with a published curve; the combined paradigms are composed from these
CURVE_PARADIGMS: tuple[str, ...] = ("layer", "channel", "spatial")
DEFAULT_DATA_PATH: Path = Path(__file__).resolve().parent / "data" / "accuracy_points.json"


@dataclass(frozen=True)
class AccuracyData:
    """The published points, validated.

    ``points`` has one row per published dynamic point: ``point`` (id such as
    ``"layer@0.40"``), ``paradigm``, ``rate``, ``top1``, ``source``.
    """

    path: str
    static_top1: Mapping[str, float] = field(hash=False)
    static_sources: Mapping[str, str] = field(hash=False, repr=False)
    reference_backbone: str = "resnet101"
    reference_input_size: int = 224
    reference_spatial_granularity: tuple[int, ...] = ()
    reference_channel_granularity: tuple[int, ...] = ()
    points: pd.DataFrame = field(default_factory=pd.DataFrame, hash=False, compare=False, repr=False)

    @property
    def reference_top1(self) -> float:
        return self.static_top1[self.reference_backbone]


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"accuracy data {where}: {msg}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_list(v: Any, n: int) -> bool:
    return (
        isinstance(v, list) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
    )


def load_accuracy_points(path: "str | os.PathLike[str] | None" = None) -> AccuracyData:
    """Read and validate the published points (default: the file shipped with dynas)."""
    if path is None:
        return _load_default()  # parsed once per process
    return _load(Path(path))


@functools.cache
def _load_default() -> AccuracyData:
    return _load(DEFAULT_DATA_PATH)


def _load(p: Path) -> AccuracyData:
    where = str(p)
    raw = _read_json(p, where)
    top1, sources = _static_top1(raw.get("static_top1"), where)
    ref_bb, ref_in, ref_s, ref_c = _reference(raw.get("reference"), top1, where)
    points = _curve_points(raw.get("curves"), ref_bb, ref_s, ref_c, where)
    return AccuracyData(
        path=where,
        static_top1=MappingProxyType(top1),
        static_sources=MappingProxyType(sources),
        reference_backbone=ref_bb,
        reference_input_size=ref_in,
        reference_spatial_granularity=tuple(ref_s),
        reference_channel_granularity=tuple(ref_c),
        points=points,
    )


def _read_json(p: Path, where: str) -> dict[str, Any]:
    """The file's top-level object, of a supported schema."""
    try:
        raw = json.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(
            f"accuracy data {where}: cannot be read ({exc.strerror}); allowed: a readable JSON file"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"accuracy data {where}: is not valid JSON ({exc})") from None
    _need(isinstance(raw, dict), where, "top level is not an object")
    _need(raw.get("schema") == 1, where, f"schema={raw.get('schema')!r} is not supported; allowed: 1")
    return raw


def _static_top1(statics: Any, where: str) -> tuple[dict[str, float], dict[str, str]]:
    """``static_top1``: each backbone's static top-1 (%) and its source."""
    _need(
        isinstance(statics, dict) and statics,
        where,
        "static_top1 is missing or empty; allowed: {backbone: {top1, source}}",
    )
    top1: dict[str, float] = {}
    sources: dict[str, str] = {}
    for name, entry in statics.items():
        w = f"{where} static_top1.{name}"
        _need(name in list_backbones(), w, f"backbone {name!r} is unknown; allowed: {', '.join(list_backbones())}")
        _need(isinstance(entry, dict), w, "is not an object with top1 and source")
        v = entry.get("top1")
        _need(_number(v) and 0 < v < 100, w, f"top1={v!r} is not a percentage in (0, 100)")
        s = entry.get("source")
        _need(isinstance(s, str) and s.strip() != "", w, "source is missing; every value must name its source")
        top1[name], sources[name] = float(v), s
    return top1, sources


def _reference(ref: Any, top1: Mapping[str, float], where: str) -> tuple[str, int, list[int], list[int]]:
    """``reference``: backbone, input size, spatial and channel granularity per stage of the
    network the curves were published for (each granularity must divide its stage's map / width)."""
    _need(
        isinstance(ref, dict),
        where,
        "reference is missing; allowed: {backbone, input_size, spatial_granularity, channel_granularity}",
    )
    ref_bb = ref.get("backbone")
    _need(ref_bb in top1, where, f"reference.backbone={ref_bb!r} has no static_top1 entry")
    ref_in = ref.get("input_size")
    _need(
        isinstance(ref_in, int) and not isinstance(ref_in, bool),
        where,
        f"reference.input_size={ref_in!r} is not an integer",
    )
    spec = get_backbone(ref_bb, ref_in)
    n_st = spec.num_stages
    ref_s, ref_c = ref.get("spatial_granularity"), ref.get("channel_granularity")
    _need(_int_list(ref_s, n_st), where, f"reference.spatial_granularity={ref_s!r} is not {n_st} positive integers")
    _need(_int_list(ref_c, n_st), where, f"reference.channel_granularity={ref_c!r} is not {n_st} positive integers")
    for s in range(n_st):
        h, wd = spec.stage_out_hw(s)
        _need(
            h % ref_s[s] == 0 and wd % ref_s[s] == 0,
            where,
            f"reference.spatial_granularity[{s}]={ref_s[s]} does not divide the {h}x{wd} map",
        )
        _need(
            spec.stage_width(s) % ref_c[s] == 0,
            where,
            f"reference.channel_granularity[{s}]={ref_c[s]} does not divide width {spec.stage_width(s)}",
        )
    return ref_bb, ref_in, ref_s, ref_c


def _curve_points(curves: Any, ref_bb: str, ref_s: list[int], ref_c: list[int], where: str) -> pd.DataFrame:
    """``curves``: one row per published point (``point, paradigm, rate, top1, source``), each
    point listed once, at least two per paradigm, all on the reference network."""
    _need(isinstance(curves, list) and curves, where, "curves is missing or empty")
    rows = []
    for i, c in enumerate(curves):
        w = f"{where} curves[{i}]"
        _need(isinstance(c, dict), w, "is not an object")
        par = c.get("paradigm")
        _need(par in CURVE_PARADIGMS, w, f"paradigm={par!r} is not allowed; allowed: {', '.join(CURVE_PARADIGMS)}")
        _need(
            c.get("backbone") == ref_bb,
            w,
            f"backbone={c.get('backbone')!r} is not allowed; allowed: {ref_bb} (the reference backbone)",
        )
        for key, refv in (("spatial_granularity", ref_s), ("channel_granularity", ref_c)):
            _need(c.get(key, refv) == refv, w, f"{key}={c.get(key)!r} differs from the reference {refv}")
        src = c.get("source")
        _need(isinstance(src, str) and src.strip() != "", w, "source is missing; every curve must name its source")
        pts = c.get("points")
        _need(isinstance(pts, list) and pts, w, "points is missing or empty")
        for j, pt in enumerate(pts):
            r, t = (pt.get("rate"), pt.get("top1")) if isinstance(pt, dict) else (None, None)
            _need(_number(r) and 0 < r <= 1, f"{w}.points[{j}]", f"rate={r!r} is not in (0, 1]")
            _need(_number(t) and 0 < t < 100, f"{w}.points[{j}]", f"top1={t!r} is not a percentage in (0, 100)")
            rows.append({"point": f"{par}@{r:.2f}", "paradigm": par, "rate": float(r), "top1": float(t), "source": src})
    points = pd.DataFrame(rows, columns=["point", "paradigm", "rate", "top1", "source"])
    dup = points["point"][points["point"].duplicated()]
    _need(dup.empty, where, f"point {dup.iloc[0] if not dup.empty else ''!r} is listed twice")
    for par in CURVE_PARADIGMS:
        n = int((points["paradigm"] == par).sum())
        _need(n >= 2, where, f"paradigm {par!r} has {n} points; allowed: at least 2 per paradigm")
    return points
