"""Measure real networks for calibration and validation: ``dynas calibrate`` / ``dynas validate``.

What one measurement is (:func:`measure`): the dynamic network of a config
(:func:`~dynas.kernels.model.build_model`, freshly initialised from ``seed``, eval mode, fast
path, **random** gate mode -- the budget's exact rates with the choice drawn independently per
sample, see :mod:`dynas.kernels.maskers`), channels-last like ``dynas bench``, run under
``torch.inference_mode`` on one random batch: ``warmup`` untimed passes, then ``repeats`` timed
passes.  Forward hooks on the stage modules split each pass into the stem (input to the first
stage), every stage, and the head (last stage to logits); on CUDA every split is synchronised.
Medians over the repeats are reported per part and for the whole pass.

Two designs of *what* to measure:

* :func:`calibration_plan` -- whole networks whose stages are stratified over paradigms,
  granularities and rates: config ``i`` gives stage ``s`` paradigm ``(i + s) mod 6`` (so every
  paradigm meets every stage shape equally often), cycles through the stage's valid
  granularities, and draws rates from the lattice 0.1, 0.2, ..., 1.0 in a per-stage shuffled
  order (a Latin-hypercube design).  Items alternate backbones and batch sizes, so a run cut
  short by its time budget is still balanced.
* :func:`validation_plan` -- random valid configs from a seed, with rates on the *other*
  lattice 0.15, 0.25, ..., 0.95, so no dynamic stage of a validation network was calibrated on.

Rows of the measurement table (:func:`run_plan`, one per part of every measured network) carry
the environment: device name, torch version, threads, gate mode and date.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import platform
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

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
from dynas.spaces.torch_model import block_module_name

__all__ = [
    "CALIBRATION_RATES",
    "VALIDATION_RATES",
    "DEFAULT_CALIBRATION_BACKBONES",
    "DEFAULT_VALIDATION_BACKBONES",
    "PlanItem",
    "Measurement",
    "environment",
    "measure",
    "calibration_plan",
    "validation_plan",
    "run_plan",
    "run_rounds",
]

#: rates of the calibration design and of the held-out validation configs (disjoint lattices)
CALIBRATION_RATES: tuple[float, ...] = tuple(round(0.1 * i, 2) for i in range(1, 11))
VALIDATION_RATES: tuple[float, ...] = tuple(round(0.05 + 0.1 * i, 2) for i in range(1, 10))
#: one backbone per block kind: basic, bottleneck, grouped + squeeze-excitation
DEFAULT_CALIBRATION_BACKBONES: tuple[str, ...] = ("resnet18", "resnet50", "regnety_400mf")
DEFAULT_VALIDATION_BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "regnety_400mf",
                                                  "regnety_800mf")


@dataclass(frozen=True)
class PlanItem:
    """One network to measure at one batch size."""

    config: ArchConfig
    batch_size: int


@dataclass(frozen=True)
class Measurement:
    """Medians (ms) over the timed passes of one network; ``stages_ms[s]`` is stage ``s``."""

    stem_ms: float
    stages_ms: tuple[float, ...]
    head_ms: float
    network_ms: float
    network_p10_ms: float
    network_p90_ms: float
    repeats: int


def _check_backbones(backbones: Sequence[str], field: str) -> tuple[str, ...]:
    if isinstance(backbones, str) or not backbones:
        raise ConfigError(f"{field}={backbones!r} is not allowed; allowed: a non-empty list of {', '.join(list_backbones())}")
    for b in backbones:
        if b not in list_backbones():
            raise ConfigError(f"{field} entry {b!r} is unknown; allowed: {', '.join(list_backbones())}")
    return tuple(backbones)


def _check_batches(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    if not batch_sizes:
        raise ConfigError("batch_size=[] is not allowed; allowed: one or more integers >= 1")
    for n in batch_sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"batch_size={n!r} is out of range; allowed: an integer >= 1")
    return tuple(batch_sizes)


def _stage_choice(paradigm: str, rate: float, channel_rate: float, spatial: int | None, channel: int | None) -> StageConfig:
    if paradigm == "static":
        return StageConfig()
    return StageConfig(paradigm, rate,
                       spatial_granularity=spatial if uses_spatial(paradigm) else None,
                       channel_granularity=channel if uses_channel(paradigm) else None,
                       channel_rate=channel_rate if paradigm in ("spatial+channel", "layer+channel") else None)


def _allowed(paradigm: str, sg: tuple[int, ...], cg: tuple[int, ...]) -> bool:
    return (not uses_spatial(paradigm) or bool(sg)) and (not uses_channel(paradigm) or bool(cg))


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
            if not _allowed(paradigm, sgs[s], cgs[s]):
                paradigm = "layer"
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


def calibration_plan(backbones: Sequence[str] = DEFAULT_CALIBRATION_BACKBONES, input_size: Any = 224,
                     batch_sizes: Sequence[int] = (1, 8), seed: int = 0) -> Iterator[PlanItem]:
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
    paradigms = [p for p in PARADIGMS if _allowed(p, sg, cg)]
    p = rng.choice(paradigms)
    return _stage_choice(p, rng.choice(VALIDATION_RATES), rng.choice(VALIDATION_RATES),
                         rng.choice(sg) if sg else None, rng.choice(cg) if cg else None)


def validation_plan(backbones: Sequence[str] = DEFAULT_VALIDATION_BACKBONES, input_size: Any = 224,
                    batch_sizes: Sequence[int] = (1, 8), count: int = 24, seed: int = 1) -> list[PlanItem]:
    """``count`` random configs (backbones in turn), each at every batch size; rates on
    :data:`VALIDATION_RATES`, so no dynamic stage repeats a calibration stage."""
    backbones = _check_backbones(backbones, "backbones")
    batch_sizes = _check_batches(batch_sizes)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count={count!r} is out of range; allowed: an integer >= 1")
    rng = random.Random(seed)
    items = []
    for i in range(count):
        spec = get_backbone(backbones[i % len(backbones)], input_size)
        cfg = ArchConfig(spec.name, spec.input_hw, tuple(_random_stage(rng, spec, s) for s in range(spec.num_stages)))
        items += [PlanItem(cfg, n) for n in batch_sizes]
    return items


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Where measurements are taken: device name, torch version, threads, date (UTC)."""
    name = torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name()
    return {"device": device, "device_name": name, "torch_version": torch.__version__, 
            "threads": threads if threads is not None else torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "python": platform.python_version(), "gate_mode": "random"}


def _stage_modules(model: torch.nn.Module, cfg: ArchConfig) -> list[torch.nn.Module]:
    spec = cfg.spec
    return [model.get_submodule(block_module_name(spec.stage_blocks(s)[0]).rpartition(".")[0])
            for s in range(spec.num_stages)]


def measure(config: ArchConfig, batch_size: int, device: str = "cpu", repeats: int = 5, warmup: int = 1,
            seed: int = 0) -> Measurement:
    """Time one network; see the module docstring for the method."""
    from dynas.kernels.model import build_model

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(config).to(dev, memory_format=torch.channels_last).eval()
    model.set_gate_mode("random")
    h, w = config.input_size
    x = torch.randn(batch_size, 3, h, w, device=dev).contiguous(memory_format=torch.channels_last)
    cuda = dev.type == "cuda"
    marks: list[float] = []

    def mark(*_: Any) -> None:
        if cuda:
            torch.cuda.synchronize(dev)
        marks.append(time.perf_counter())

    handles = []
    for m in _stage_modules(model, config):
        handles.append(m.register_forward_pre_hook(mark))
        handles.append(m.register_forward_hook(mark))
    n_stages = config.spec.num_stages
    parts: list[list[float]] = [[] for _ in range(n_stages + 3)]  # stem, stages..., head, network
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                marks.clear()
                mark()
                model(x)
                mark()
                if i < warmup:
                    continue
                t = marks  # [start, (stage pre, stage post) x S, end]
                parts[0].append(t[1] - t[0])
                for s in range(n_stages):
                    parts[1 + s].append(t[2 + 2 * s] - t[1 + 2 * s])
                parts[n_stages + 1].append(t[-1] - t[-2])
                parts[n_stages + 2].append(t[-1] - t[0])
    finally:
        for hd in handles:
            hd.remove()
    med = [statistics.median(p) * 1e3 for p in parts]
    net = sorted(parts[-1])
    q = statistics.quantiles(net, n=10) if len(net) >= 2 else [net[0]] * 9
    return Measurement(med[0], tuple(med[1:1 + n_stages]), med[n_stages + 1], med[-1], q[0] * 1e3, q[-1] * 1e3,
                       repeats)


def run_plan(items: Iterable[PlanItem], device: str = "cpu", repeats: int = 5, warmup: int = 1, seed: int = 0,
             budget_s: float | None = None, max_items: int | None = None,
             progress: Callable[[int, float, PlanItem, Measurement], None] | None = None,
             seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Measure ``items`` in order until they run out, ``max_items`` are done, or the next item
    would likely overrun ``budget_s`` (estimated from the items of the same backbone and batch
    size so far; the first item always runs).  Item ``k`` is built and fed from seed
    ``seeds[k]`` (default ``seed + k``).  Returns one row per part of every network."""
    env = environment(device)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    cost: dict[tuple[str, int], list[float]] = {}
    done = 0
    for item in items:
        if max_items is not None and done >= max_items:
            break
        key = (item.config.backbone, item.batch_size)
        elapsed = time.perf_counter() - t0
        if budget_s is not None and done:
            seen = cost.get(key) or [max(c for v in cost.values() for c in v)]
            if elapsed + statistics.mean(seen) > budget_s:
                break
        t_item = time.perf_counter()
        m = measure(item.config, item.batch_size, device, repeats, warmup, seeds[done] if seeds is not None else seed + done)
        cost.setdefault(key, []).append(time.perf_counter() - t_item)
        cfg = item.config
        base = {"network_id": done, "backbone": cfg.backbone, "input_h": cfg.input_size[0], "input_w": cfg.input_size[1],
                "batch_size": item.batch_size, "config": cfg.to_json(indent=None)}
        parts = [("stem", -1, "", m.stem_ms)]
        parts += [(f"stage{s}", s, st.short(), m.stages_ms[s]) for s, st in enumerate(cfg.stages)]
        parts += [("head", -1, "", m.head_ms), ("network", -1, cfg.short(), m.network_ms)]
        for part, stage, choice, ms in parts:
            rows.append({**base, "part": part, "stage": stage, "choice": choice, "measured_ms": ms,
                         "repeats": m.repeats, **env})
        done += 1
        if progress is not None:
            progress(done, time.perf_counter() - t0, item, m)
    return rows


def run_rounds(items: Iterable[PlanItem], rounds: int = 2, progress: Callable[..., None] | None = None,
               budget_s: float | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`run_plan` over ``items`` ``rounds`` times (odd rounds in reverse order, so a
    network's rounds are minutes apart), keeping for every network the round whose whole pass
    was fastest, with all its parts.  Other load on a shared machine only ever adds time, and
    it comes in bursts that can cover every pass of one measurement; a second round away from
    the burst is how such a measurement is recognised.  Rows get a ``rounds`` column.

    ``items`` may be endless when ``budget_s`` is given: the first round measures as many as
    fit in ``budget_s / rounds``, the later rounds measure those again.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds={rounds!r} is out of range; allowed: an integer >= 1")
    base = kwargs.pop("seed", 0)
    pulled: list[PlanItem] = []

    def record(source: Iterable[PlanItem]) -> Iterator[PlanItem]:
        for item in source:
            pulled.append(item)
            yield item

    best: dict[int, list[dict[str, Any]]] = {}
    first_budget = budget_s / rounds if budget_s is not None else None
    for r in range(rounds):
        if r == 0:
            rows = run_plan(record(items), progress=progress, budget_s=first_budget,
                            seeds=_Seeds(base), seed=base, **kwargs)
            measured = len({row["network_id"] for row in rows})
            items_list, order = pulled[:measured], list(range(measured))
        else:
            order = order[::-1]
            rows = run_plan([items_list[i] for i in order], progress=progress, seeds=[base + i for i in order],
                            seed=base, **kwargs)
        by_net: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            by_net.setdefault(row["network_id"], []).append(row)
        for local, net_rows in by_net.items():
            i = order[local]
            for row in net_rows:
                row["network_id"], row["rounds"] = i, rounds
            total = next(row["measured_ms"] for row in net_rows if row["part"] == "network")
            kept = best.get(i)
            if kept is None or total < next(row["measured_ms"] for row in kept if row["part"] == "network"):
                best[i] = net_rows
    return [row for i in sorted(best) for row in best[i]]


class _Seeds:
    """``seeds[k] = base + k`` for any ``k`` (an endless plan's first round)."""

    def __init__(self, base: int) -> None:
        self.base = base

    def __getitem__(self, k: int) -> int:
        return self.base + k
