"""Designs of networks to measure: ``dynas calibrate`` and ``dynas validate`` (no torch here).

* :func:`calibration_plan` -- whole networks whose stages are stratified over paradigms,
  granularities and rates: config ``i`` gives stage ``s`` paradigm ``(i + s) mod 6`` (so every
  paradigm meets every stage shape equally often), cycles through the stage's valid
  granularities, and draws rates from the lattice 0.1, 0.2, ..., 1.0 in a per-stage shuffled
  order (a Latin-hypercube design).  Items alternate backbones and batch sizes, so a run cut
  short by its time budget is still balanced.
* :func:`validation_plan` -- random valid configs from a seed, with rates on the *other*
  lattice 0.15, 0.25, ..., 0.95, so no dynamic stage of a validation network was calibrated on.

:mod:`dynas.kernels.calibrate` measures the items of a plan.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from dynas.checks import check_int
from dynas.errors import ConfigError
from dynas.spaces.backbones import get_backbone, list_backbones
from dynas.spaces.config import (
    PARADIGMS,
    ArchConfig,
    StageConfig,
    channel_granularities,
    spatial_granularities,
    uses_channel,
    uses_spatial,
)

__all__ = [
    "CALIBRATION_RATES",
    "VALIDATION_RATES",
    "DEFAULT_CALIBRATION_BACKBONES",
    "DEFAULT_VALIDATION_BACKBONES",
    "PlanItem",
    "calibration_plan",
    "validation_plan",
]

#: rates of the calibration design and of the held-out validation configs (disjoint lattices)
CALIBRATION_RATES: tuple[float, ...] = tuple(round(0.1 * i, 2) for i in range(1, 11))
VALIDATION_RATES: tuple[float, ...] = tuple(round(0.05 + 0.1 * i, 2) for i in range(1, 10))
#: one backbone per block kind: basic, bottleneck, grouped + squeeze-excitation
DEFAULT_CALIBRATION_BACKBONES: tuple[str, ...] = ("resnet18", "resnet50", "regnety_400mf")
DEFAULT_VALIDATION_BACKBONES: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "regnety_400mf",
    "regnety_800mf",
)


@dataclass(frozen=True)
class PlanItem:
    """One network to measure at one batch size."""

    config: ArchConfig
    batch_size: int


def _check_backbones(backbones: Sequence[str], field: str) -> tuple[str, ...]:
    if isinstance(backbones, str) or not backbones:
        raise ConfigError(
            f"{field}={backbones!r} is not allowed; allowed: a non-empty list of {', '.join(list_backbones())}"
        )
    for b in backbones:
        if b not in list_backbones():
            raise ConfigError(f"{field} entry {b!r} is unknown; allowed: {', '.join(list_backbones())}")
    return tuple(backbones)


def _check_batches(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    if not batch_sizes:
        raise ConfigError("batch_size=[] is not allowed; allowed: one or more integers >= 1")
    return tuple(check_int("batch_size", n, 1) for n in batch_sizes)


def _stage_choice(
    paradigm: str, rate: float, channel_rate: float, spatial: int | None, channel: int | None
) -> StageConfig:
    if paradigm == "static":
        return StageConfig()
    return StageConfig(
        paradigm,
        rate,
        spatial_granularity=spatial if uses_spatial(paradigm) else None,
        channel_granularity=channel if uses_channel(paradigm) else None,
        channel_rate=channel_rate if paradigm in ("spatial+channel", "layer+channel") else None,
    )


def _allowed(paradigm: str, sg: tuple[int, ...], cg: tuple[int, ...], offered: tuple[str, ...] = PARADIGMS) -> bool:
    return paradigm in offered and (not uses_spatial(paradigm) or bool(sg)) and (not uses_channel(paradigm) or bool(cg))


def _fallback(sg: tuple[int, ...], cg: tuple[int, ...], offered: tuple[str, ...]) -> str:
    """The paradigm a stage uses when its turn's paradigm is not possible there: layer, else channel, else static."""
    return next(p for p in ("layer", "channel", "static") if _allowed(p, sg, cg, offered))


def _design(backbone: str, input_size: tuple[int, int], seed: int) -> Iterator[ArchConfig]:
    """Endless stratified configs of one backbone (see the module docstring)."""
    spec = get_backbone(backbone, input_size)
    rng = random.Random(f"{seed}:{backbone}")
    S = spec.num_stages
    sgs = [spatial_granularities(spec, s) for s in range(S)]
    cgs = [channel_granularities(spec, s) for s in range(S)]
    rates = [[] for _ in range(S)]
    crates = [[] for _ in range(S)]
    counters = [[0, 0] for _ in range(S)]
    for i in itertools.count():
        stages = []
        for s in range(S):
            paradigm = PARADIGMS[(i + s) % len(PARADIGMS)]
            if not _allowed(paradigm, sgs[s], cgs[s], spec.paradigms):
                paradigm = _fallback(sgs[s], cgs[s], spec.paradigms)
            if not rates[s]:
                rates[s] = rng.sample(CALIBRATION_RATES, len(CALIBRATION_RATES))
            if not crates[s]:
                crates[s] = rng.sample(CALIBRATION_RATES, len(CALIBRATION_RATES))
            sp = ch = None
            if uses_spatial(paradigm):
                sp = sgs[s][counters[s][0] % len(sgs[s])]
                counters[s][0] += 1
            if uses_channel(paradigm):
                ch = cgs[s][counters[s][1] % len(cgs[s])]
                counters[s][1] += 1
            rate = rates[s].pop() if paradigm != "static" else 1.0
            crate = crates[s].pop() if paradigm in ("spatial+channel", "layer+channel") else 1.0
            stages.append(_stage_choice(paradigm, rate, crate, sp, ch))
        yield ArchConfig(backbone, spec.input_hw, tuple(stages))


def calibration_plan(
    backbones: Sequence[str] = DEFAULT_CALIBRATION_BACKBONES,
    input_size: Any = 224,
    batch_sizes: Sequence[int] = (1, 8),
    seed: int = 0,
) -> Iterator[PlanItem]:
    """Endless balanced stream of calibration items; the static network of every (backbone,
    batch size) comes first, then stratified configs alternating backbones and batch sizes."""
    backbones = _check_backbones(backbones, "backbones")
    batch_sizes = _check_batches(batch_sizes)
    hw = get_backbone(backbones[0], input_size).input_hw
    for b in backbones:
        for n in batch_sizes:
            yield PlanItem(ArchConfig.static(b, hw), n)
    designs = {b: _design(b, hw, seed) for b in backbones}
    while True:
        for b in backbones:
            cfg = next(designs[b])
            for n in batch_sizes:
                yield PlanItem(cfg, n)


def _random_stage(rng: random.Random, spec: Any, s: int) -> StageConfig:
    sg, cg = spatial_granularities(spec, s), channel_granularities(spec, s)
    paradigms = [p for p in PARADIGMS if _allowed(p, sg, cg, spec.paradigms)]
    p = rng.choice(paradigms)
    return _stage_choice(
        p,
        rng.choice(VALIDATION_RATES),
        rng.choice(VALIDATION_RATES),
        rng.choice(sg) if sg else None,
        rng.choice(cg) if cg else None,
    )


def validation_plan(
    backbones: Sequence[str] = DEFAULT_VALIDATION_BACKBONES,
    input_size: Any = 224,
    batch_sizes: Sequence[int] = (1, 8),
    count: int = 24,
    seed: int = 1,
) -> list[PlanItem]:
    """``count`` random configs (backbones in turn), each at every batch size; rates on
    :data:`VALIDATION_RATES`, so no dynamic stage repeats a calibration stage."""
    backbones = _check_backbones(backbones, "backbones")
    batch_sizes = _check_batches(batch_sizes)
    check_int("count", count, 1)
    rng = random.Random(seed)
    items = []
    for i in range(count):
        spec = get_backbone(backbones[i % len(backbones)], input_size)
        cfg = ArchConfig(spec.name, spec.input_hw, tuple(_random_stage(rng, spec, s) for s in range(spec.num_stages)))
        items += [PlanItem(cfg, n) for n in batch_sizes]
    return items
