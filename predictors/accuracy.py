"""The ``prior`` accuracy proxy: a documented extrapolation of LAUDNet's published curves.

What it is
    A *prior*: predicted ImageNet top-1 (%) after LAUDNet-style fine-tuning (100 epochs,
    distillation from the static network), obtained by fitting a small parametric model to the
    published ResNet-101 points in ``data/accuracy_points.json`` (read and validated by
    :mod:`dynas.predictors.accuracy_data`; one curve per paradigm, same
    rate in every stage) and transferring it to other stages, granularities and backbones by
    stated assumptions.  It is deterministic and cheap, so a search can call it per trial.

What it is not
    A measurement, or a model validated beyond those 13 points.  Everything away from
    ResNet-101 at the published granularities (S=8-4-7-1, G=2) and rates (0.40-0.75) rests on
    the assumptions below; rates under 0.40 are pure extrapolation.

Model (all terms in top-1 percentage points)::

    top1(config) = max(chance, static_top1(backbone) + sum_s w_s * delta_s)

    w_s       stage s's share of the backbone's dense FLOPs (dynas.predictors.flops.dense_flops;
              the total includes stem and head), computed for the config's input size
    delta_s   0 for a static stage, else  B_p - lam_b * (m_p * L_p(r) [+ m_c * L_c(r_c)])
    L_p(r)    A_p * ((1 - r) / r) ** q   loss below the rate-1 point, per paradigm p in
              {layer, channel, spatial}: 0 at r = 1, non-increasing in r, unbounded as r -> 0
    B_p       the curve's value at rate 1: the fine-tuning/distillation bonus that the data show
              (dynamic ResNet-101 at moderate rates beats its static baseline).  Bounded to
              [0, BONUS_MAX_POINTS] in the fit.
    q         one shape exponent shared by all paradigms (one per paradigm over-fits: leave-one-out
              MAE 0.19 instead of 0.065 points)
    m         granularity factor on the loss, (n_ref / n) ** kappa, where n is the number of gate
              decisions per sample and block (spatial: patches in the map; channel: groups) and
              n_ref that of the published granularity at the same stage position (so m = 1 at
              the data).  Coarser gates (fewer decisions) lose more; m never touches the rate-1
              value, so granularity does not matter when nothing is skipped.  kappa is ONE
              coefficient, fitted so that spatial gating at whole-map granularity (one decision
              per block, which is what a layer gate is) reproduces the published layer curve;
              channel groups use the same kappa per halving of the number of decisions.
    lam_b     backbone sensitivity (100 - static_b) / (100 - static_ref): a net with a higher
              static error loses proportionally more per skipped FLOP share (ResNet-18: 1.36x
              ResNet-101's loss).  The bonus B_p is not scaled.

Other backbones (transfer rule).  Every backbone's static top-1 is a cited figure in the data
file; its dynamic deltas are the ResNet-101 curves above moved by the same three factors: stage
FLOPs shares ``w_s`` (of that backbone at that input size), the error-ratio sensitivity ``lam_b``
and the granularity factor ``m`` (decisions per block at the published granularity of the same
stage position).  A DenseNet layer gate uses the layer curve, its bottleneck channel gate the
channel curve.  No dynamic DenseNet, RegNetX or RegNetY >= 1.6GF point is published that we
know of, and none was fitted: those predictions are the transfer rule alone.

Combined paradigms compose the two effects: the primary decision (positions for
``spatial+channel``, samples for ``layer+channel``) gives the bonus and its loss, and the
channel decision adds its own loss (zero when ``channel_rate`` is 1).  A stage at rate 1.0 of
any paradigm therefore scores ``w_s * B_p`` over static: the prior credits the fine-tuning
recipe, not the gates, with that bonus.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import pandas as pd

from dynas.errors import ConfigError
from dynas.predictors.accuracy_data import CURVE_PARADIGMS, AccuracyData, load_accuracy_points
from dynas.predictors.proxy import AccuracyProxy, register_proxy
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import ArchConfig, StageConfig, load_config, uses_layer, uses_spatial

__all__ = [
    "BONUS_MAX_POINTS",
    "GRANULARITY_EXPONENT_MAX",
    "ParadigmCurve",
    "PriorFit",
    "PriorProxy",
    "fit_prior",
    "reference_config",
    "stage_flops_shares",
    "leave_one_out",
]

#: upper bound of the rate-1 (distillation) bonus B_p, in points.  The largest published gain of
#: a dynamic ResNet-101 over its static baseline is +0.96 (spatial, rate 0.75); a monotone curve
#: must reach at least that at rate 1, and the bound keeps the bonus from growing past it by more
#: than the figure's read-off uncertainty plus a small margin.
BONUS_MAX_POINTS: float = 1.2
#: upper bound of the granularity exponent kappa (a 49x coarser gate then at most ~2.6x the loss)
GRANULARITY_EXPONENT_MAX: float = 0.25

# Grids for the deterministic fit (no scipy): the shared shape exponent q and kappa.
_SHAPE_GRID = np.round(np.arange(0.25, 4.0 + 1e-9, 0.005), 3)
_KAPPA_GRID = np.round(np.arange(0.0, GRANULARITY_EXPONENT_MAX + 1e-9, 0.001), 3)
_MEMO_MAX = 1 << 18


# ----------------------------------------------------------------------------- shapes


@functools.lru_cache(maxsize=128)
def stage_flops_shares(backbone: str, input_size: object = 224) -> tuple[float, ...]:
    """Share of the backbone's dense FLOPs (stem and head included in the total) in each stage."""
    from dynas.predictors.flops import dense_flops  # torch import deferred to first use

    spec = get_backbone(backbone, input_size)
    table = dense_flops(backbone, spec.input_hw)
    return tuple(table.stage_flops(s) / table.total_flops for s in range(spec.num_stages))


def _spatial_decisions(hw: tuple[int, int], s: int) -> int:
    return math.ceil(hw[0] / s) * math.ceil(hw[1] / s)


@functools.lru_cache(maxsize=16)
def _reference_decisions(data: AccuracyData) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Gate decisions per sample and block at the published granularities, per stage position."""
    spec = get_backbone(data.reference_backbone, data.reference_input_size)
    spatial = tuple(
        _spatial_decisions(spec.stage_out_hw(s), g) for s, g in enumerate(data.reference_spatial_granularity)
    )
    channel = tuple(spec.stage_width(s) // g for s, g in enumerate(data.reference_channel_granularity))
    return spatial, channel


def reference_config(paradigm: str, rate: float, data: AccuracyData | None = None) -> ArchConfig:
    """The config a published point describes: the reference backbone with ``paradigm`` at
    ``rate`` in every stage, at the published granularities."""
    data = data if data is not None else load_accuracy_points()
    if paradigm not in CURVE_PARADIGMS:
        raise ConfigError(f"paradigm={paradigm!r} has no published curve; allowed: {', '.join(CURVE_PARADIGMS)}")
    stages = []
    for s in range(len(data.reference_spatial_granularity)):
        if paradigm == "spatial":
            stages.append(
                {"paradigm": "spatial", "rate": rate, "spatial_granularity": data.reference_spatial_granularity[s]}
            )
        elif paradigm == "channel":
            stages.append(
                {"paradigm": "channel", "rate": rate, "channel_granularity": data.reference_channel_granularity[s]}
            )
        else:
            stages.append({"paradigm": "layer", "rate": rate})
    return ArchConfig.from_dict(
        {"backbone": data.reference_backbone, "input_size": data.reference_input_size, "stages": stages}
    )


# ----------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class ParadigmCurve:
    """delta(r) = bonus_points - loss_at_half_points * ((1 - r) / r) ** shape, per unit FLOPs share
    of the reference backbone.  ``loss_at_half_points`` is the loss below the rate-1 value at
    rate 0.5 (where the skip odds (1 - r) / r are 1)."""

    paradigm: str
    bonus_points: float
    loss_at_half_points: float
    shape: float

    def loss(self, rate: "float | np.ndarray") -> "float | np.ndarray":
        odds = (1.0 - np.asarray(rate, dtype=float)) / np.asarray(rate, dtype=float)
        out = self.loss_at_half_points * odds**self.shape
        return float(out) if np.ndim(out) == 0 else out

    def delta(self, rate: "float | np.ndarray") -> "float | np.ndarray":
        return self.bonus_points - self.loss(rate)


@dataclass(frozen=True)
class PriorFit:
    """Fitted parameters of the prior (see the module docstring for the model)."""

    curves: Mapping[str, ParadigmCurve] = field(hash=False)
    shape: float
    granularity_exponent: float
    reference_share: float  # sum of the reference backbone's stage FLOPs shares
    rmse_points: float  # fit residual over the points used
    n_points: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "granularity_exponent": self.granularity_exponent,
            "reference_share": self.reference_share,
            "rmse_points": self.rmse_points,
            "n_points": self.n_points,
            "curves": {
                p: {"bonus_points": c.bonus_points, "loss_at_half_points": c.loss_at_half_points}
                for p, c in self.curves.items()
            },
        }


def _fit_two_params(u: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of z ~ B - A * u per row of ``u`` ([Q, n] basis values for Q shape
    exponents), subject to A >= 0 and 0 <= B <= BONUS_MAX_POINTS.  Returns B, A, SSE, each [Q].

    A two-parameter box-constrained least-squares optimum is either the unconstrained one or lies
    on an edge of the box, so every candidate is evaluated and the best feasible one kept.
    """
    z = z[None, :]  # [1, n]
    um, zm = u.mean(1), z.mean(1)  # [Q], [1]
    var = ((u - um[:, None]) ** 2).sum(1)  # [Q]
    cov = ((u - um[:, None]) * (z - zm[:, None])).sum(1)  # [Q]
    a0 = np.where(var > 0, -cov / np.where(var > 0, var, 1.0), 0.0)
    b0 = zm + a0 * um
    uu = (u * u).sum(1)
    cands = [(b0, a0)]
    for bfix in (0.0, BONUS_MAX_POINTS):  # B on an edge, A by 1-D least squares, clamped
        a = np.maximum(np.where(uu > 0, (u * (bfix - z)).sum(1) / np.where(uu > 0, uu, 1.0), 0.0), 0.0)
        cands.append((np.full_like(a, bfix), a))
    cands.append((np.full_like(um, float(np.clip(zm[0], 0.0, BONUS_MAX_POINTS))), np.zeros_like(um)))  # A = 0
    best_b = best_a = best_sse = None
    for b, a in cands:
        feasible = (a >= 0) & (b >= -1e-12) & (b <= BONUS_MAX_POINTS + 1e-12)
        sse = np.where(feasible, ((b[:, None] - a[:, None] * u - z) ** 2).sum(1), np.inf)
        if best_sse is None:
            best_b, best_a, best_sse = b.copy(), a.copy(), sse
        else:
            better = sse < best_sse
            best_b, best_a, best_sse = (
                np.where(better, b, best_b),
                np.where(better, a, best_a),
                np.where(better, sse, best_sse),
            )
    return best_b, best_a, best_sse


def fit_prior(data: AccuracyData | None = None, *, exclude: "tuple[str, ...] | list[str]" = ()) -> PriorFit:
    """Fit the prior to the published points, leaving out the point ids in ``exclude``.

    Deterministic: a grid over the shared shape exponent q with closed-form (box-constrained)
    least squares for each paradigm's (B_p, A_p), then a grid over kappa.
    """
    data = data if data is not None else load_accuracy_points()
    pts = data.points
    unknown = sorted(set(exclude) - set(pts["point"]))
    if unknown:
        raise ConfigError(f"exclude={unknown[0]!r} is not a published point; allowed: {', '.join(pts['point'])}")
    pts = pts[~pts["point"].isin(list(exclude))]
    shares = stage_flops_shares(data.reference_backbone, data.reference_input_size)
    share = float(sum(shares))
    static = data.reference_top1

    # 1. Shape q shared by the paradigms; (B_p, A_p) per paradigm for every q on the grid.
    per_paradigm = {}
    total_sse = np.zeros(len(_SHAPE_GRID))
    for par in CURVE_PARADIGMS:
        sel = pts[pts["paradigm"] == par]
        if len(sel) < 2:
            raise ConfigError(
                f"paradigm {par!r} keeps {len(sel)} points after exclude; allowed: at least 2 per paradigm"
            )
        rate = sel["rate"].to_numpy()
        odds = (1.0 - rate) / rate  # [n]
        u = odds[None, :] ** _SHAPE_GRID[:, None]  # [Q, n]
        z = (sel["top1"].to_numpy() - static) / share  # delta per unit share, [n]
        b, a, sse = _fit_two_params(u, z)
        per_paradigm[par] = (b, a)
        total_sse += sse * share**2  # back to points^2
    k = int(np.argmin(total_sse))  # first minimum: deterministic
    q = float(_SHAPE_GRID[k])
    curves = {par: ParadigmCurve(par, float(b[k]), float(a[k]), q) for par, (b, a) in per_paradigm.items()}

    # 2. kappa: spatial gating with one decision per block (whole-map patches) should reproduce
    # the layer curve over the published rate range.  Loss factor per stage: (n_ref_s / 1) ** kappa.
    sp_ref, _ = _reference_decisions(data)
    both = pts[pts["paradigm"].isin(["spatial", "layer"])]["rate"]
    r = np.linspace(float(both.min()), float(both.max()), 36)  # [R]
    w = np.asarray(shares)  # [S]
    m = np.asarray(sp_ref, dtype=float)[None, :] ** _KAPPA_GRID[:, None]  # [K, S]
    pred = (
        share * curves["spatial"].bonus_points - (m @ w)[:, None] * np.asarray(curves["spatial"].loss(r))[None, :]
    )  # [K, R]
    target = share * np.asarray(curves["layer"].delta(r))  # [R]
    kappa = float(_KAPPA_GRID[int(np.argmin(((pred - target[None, :]) ** 2).sum(1)))])

    return PriorFit(
        curves=MappingProxyType(curves),
        shape=q,
        granularity_exponent=kappa,
        reference_share=share,
        rmse_points=float(math.sqrt(total_sse[k] / len(pts))),
        n_points=len(pts),
    )


@functools.cache
def _default_fit() -> PriorFit:
    return fit_prior(load_accuracy_points())


# ----------------------------------------------------------------------------- proxy


@dataclass(frozen=True)
class _Context:
    """Per (backbone, input size): what a stage's delta needs besides its own choice."""

    shares: tuple[float, ...]
    sensitivity: float
    out_hw: tuple[tuple[int, int], ...]
    widths: tuple[int, ...]
    chance_top1: float


@register_proxy("prior")
class PriorProxy(AccuracyProxy):
    """PRIOR accuracy proxy: LAUDNet's published ResNet-101 curves, extrapolated (see module doc).

    ``PriorProxy()`` uses the shipped data and a fit cached per process; pass ``fit`` (e.g. from
    :func:`fit_prior` with ``exclude``) or ``data`` to use others.  Scores are memoized per
    stage choice, so a search pays for each distinct (stage, choice) once.
    """

    description = (
        "PRIOR, not a measurement: top-1 extrapolated from LAUDNet's published ResNet-101 curves "
        "(layer, channel G=2, spatial S=8-4-7-1) by FLOPs share per stage"
    )

    def __init__(self, fit: PriorFit | None = None, data: AccuracyData | None = None) -> None:
        self._data = data if data is not None else load_accuracy_points()
        if fit is None:
            fit = _default_fit() if data is None else fit_prior(self._data)
        self._fit = fit
        self._static = dict(self._data.static_top1)
        self._ref_spatial, self._ref_channel = _reference_decisions(self._data)
        self._contexts: dict[tuple[str, tuple[int, int]], _Context] = {}
        self._memo: dict[tuple[str, tuple[int, int], int, StageConfig], float] = {}

    @property
    def fit(self) -> PriorFit:
        return self._fit

    @property
    def data(self) -> AccuracyData:
        return self._data

    def static_top1(self, backbone: str) -> float:
        try:
            return self._static[backbone]
        except KeyError:
            raise ConfigError(
                f"backbone={backbone!r} has no static top-1 in {self._data.path}; allowed: {', '.join(sorted(self._static))}"
            ) from None

    def sensitivity(self, backbone: str) -> float:
        """Loss multiplier of ``backbone`` relative to the reference: ratio of static error rates."""
        return (100.0 - self.static_top1(backbone)) / (100.0 - self._data.reference_top1)

    def score(self, config: "ArchConfig | Mapping[str, Any] | str") -> float:
        cfg = config if type(config) is ArchConfig else load_config(config)
        ctx = self._contexts.get((cfg.backbone, cfg.input_size)) or self._context(cfg.backbone, cfg.input_size)
        total = self._static[cfg.backbone]
        memo = self._memo
        for i, st in enumerate(cfg.stages):
            if st.paradigm == "static":
                continue
            key = (cfg.backbone, cfg.input_size, i, st)
            d = memo.get(key)
            if d is None:
                d = self._stage_delta(ctx, i, st)
                if len(memo) >= _MEMO_MAX:
                    memo.clear()
                memo[key] = d
            total += d
        return max(total, ctx.chance_top1)

    def stage_deltas(self, config: "ArchConfig | Mapping[str, Any] | str") -> tuple[float, ...]:
        """Points each stage adds to the static top-1 (before the floor at chance level)."""
        cfg = load_config(config)
        ctx = self._context(cfg.backbone, cfg.input_size)
        return tuple(self._stage_delta(ctx, i, st) for i, st in enumerate(cfg.stages))

    # -- internals

    def _context(self, backbone: str, input_hw: tuple[int, int]) -> _Context:
        key = (backbone, tuple(input_hw))
        ctx = self._contexts.get(key)
        if ctx is None:
            spec = get_backbone(backbone, input_hw)
            ctx = _Context(
                shares=stage_flops_shares(backbone, spec.input_hw),
                sensitivity=self.sensitivity(backbone),
                out_hw=tuple(spec.stage_out_hw(s) for s in range(spec.num_stages)),
                widths=tuple(spec.stage_width(s) for s in range(spec.num_stages)),
                chance_top1=100.0 / spec.num_classes,
            )
            self._contexts[key] = ctx
        return ctx

    def _granularity_factor(self, n: int, n_ref: int) -> float:
        return (n_ref / n) ** self._fit.granularity_exponent

    def _stage_delta(self, ctx: _Context, stage: int, st: StageConfig) -> float:
        if st.paradigm == "static":
            return 0.0
        curves = self._fit.curves
        ref = min(stage, len(self._ref_spatial) - 1)  # published granularity at this stage position
        p = st.paradigm
        if uses_spatial(p):
            primary = curves["spatial"]
            n = _spatial_decisions(ctx.out_hw[stage], st.spatial_granularity)
            loss = self._granularity_factor(n, self._ref_spatial[ref]) * primary.loss(st.rate)
        elif uses_layer(p):
            primary = curves["layer"]  # one decision per sample: no granularity choice
            loss = primary.loss(st.rate)
        else:
            primary = curves["channel"]
            n = ctx.widths[stage] // st.channel_granularity
            loss = self._granularity_factor(n, self._ref_channel[ref]) * primary.loss(st.rate)
        if p in ("spatial+channel", "layer+channel"):
            n = ctx.widths[stage] // st.channel_granularity
            loss += self._granularity_factor(n, self._ref_channel[ref]) * curves["channel"].loss(st.channel_rate)
        return ctx.shares[stage] * (primary.bonus_points - ctx.sensitivity * loss)


# ----------------------------------------------------------------------------- validation


def leave_one_out(data: AccuracyData | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Refit without each published point in turn and predict it.

    Returns a DataFrame with columns ``point, paradigm, rate, published_top1, predicted_top1,
    abs_error`` and a summary ``{"mae": ..., "max_abs_error": ..., "n_points": ...}`` (points).
    """
    data = data if data is not None else load_accuracy_points()
    rows = []
    for row in data.points.itertuples(index=False):
        proxy = PriorProxy(fit=fit_prior(data, exclude=(row.point,)), data=data)
        pred = proxy.score(reference_config(row.paradigm, row.rate, data))
        rows.append(
            {
                "point": row.point,
                "paradigm": row.paradigm,
                "rate": row.rate,
                "published_top1": row.top1,
                "predicted_top1": pred,
                "abs_error": abs(pred - row.top1),
            }
        )
    df = pd.DataFrame(rows, columns=["point", "paradigm", "rate", "published_top1", "predicted_top1", "abs_error"])
    summary = {
        "mae": float(df["abs_error"].mean()),
        "max_abs_error": float(df["abs_error"].max()),
        "n_points": int(len(df)),
    }
    return df, summary
