"""Measure real networks for calibration and validation: ``dynas calibrate`` / ``dynas validate``.

What one measurement is (:func:`measure`): the dynamic network of a config
(:func:`~dynas.kernels.model.build_model`, freshly initialised from ``seed``, eval mode, fast
path, **random** gate mode -- the budget's exact rates with the choice drawn independently per
sample, see :mod:`dynas.kernels.maskers`), channels-last like ``dynas bench``, run under
``torch.inference_mode`` on one random batch: ``warmup`` untimed passes, then ``repeats`` timed
passes.  Forward hooks on the stage modules split each pass into the stem (input to the first
stage), every stage, and the head (last stage to logits); on CUDA every split is synchronised.
Medians over the repeats are reported per part and for the whole pass.  With ``blocks=True``
(``dynas validate``) ``repeats`` more passes follow with hooks on every block instead, so that
the block hooks add nothing to the stage and network times; each block's median over them is
reported too.

Paired with a reference (``reference`` model, :func:`run_plan` ``paired=True``): after every
pass of the network, warm-up ones included, one pass of the reference (the network's static
backbone) runs, timed whole; its median is the rows' ``reference_ms``.  A shared machine's
speed moves within seconds (other tenants' load on the caches, memory and clock); the two
medians come from the same seconds, so ``measured_ms / reference_ms`` keeps the network's time
in units of the host's current speed (:func:`dynas.predictors.calibration.host_normalized`).
The reference's passes also push the network's weights out of the caches between its passes,
so paired times describe a network that shares the machine, not one run back to back.

What to measure is a plan of :class:`~dynas.spaces.design.PlanItem` s
(:func:`~dynas.spaces.design.calibration_plan`, :func:`~dynas.spaces.design.validation_plan`).

Rows of the measurement table (:func:`run_plan`, one per part of every measured network) carry
the environment: device name, torch version, threads, gate mode and date.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from dynas.checks import check_int, check_positive
from dynas.errors import ConfigError
from dynas.kernels.energy_counter import rapl_status
from dynas.predictors.targets import static_key
from dynas.spaces.config import ArchConfig
from dynas.spaces.design import PlanItem
from dynas.spaces.torch_model import block_module_name

_log = logging.getLogger(__name__)

__all__ = [
    "Measurement",
    "environment",
    "host_speed",
    "keep_freed_memory",
    "measure",
    "run_plan",
    "run_rounds",
    "static_reference",
]


@dataclass(frozen=True)
class Measurement:
    """Medians (ms) over the timed passes of one network; ``stages_ms[s]`` is stage ``s``,
    ``blocks_ms[s][i]`` its block ``i``."""

    stem_ms: float
    stages_ms: tuple[float, ...]
    head_ms: float
    network_ms: float
    repeats: int
    blocks_ms: tuple[tuple[float, ...], ...] = ()  # [stage][block]; empty unless measured
    reference_ms: float = math.nan  # median pass of the paired reference; NaN unless paired


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


#: what keep_freed_memory() did in this process (None: not called yet)
_MALLOC: str | None = None


def keep_freed_memory() -> str:
    """Keep freed memory in this process (glibc ``mallopt``); returns what was set.

    glibc returns a freed block above its trim threshold to the kernel and serves big blocks
    with fresh ``mmap`` pages, so a batch-8 activation of tens of MB is page-faulted and zeroed
    again on every forward pass.  Measured here (ResNet-50, batch 8, stage 0, whose tensors are
    26 MB): 125-151 ms per pass by default, 84-88 ms with freed memory kept, and the default
    varies from run to run.  Every measuring path calls this once, so calibrations and benches
    time what a tuned deployment sees (the README says how to get the same when deploying:
    the equivalent environment variables, or jemalloc / tcmalloc).
    """
    global _MALLOC
    if _MALLOC is None:
        _MALLOC = "default"
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's option numbers
            ok = (
                libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1  # glibc's largest
                and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
                and libc.mallopt(m_top_pad, 256 * 1024 * 1024) == 1
            )
            if ok:
                _MALLOC = "glibc: trim off, mmap above 32 MiB, top pad 256 MiB"
        except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): allocator left as is
            pass
    return _MALLOC


def environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Where measurements are taken: device name, torch version, threads, date (UTC), allocator,
    and why no energy is measured (:func:`dynas.kernels.energy_counter.rapl_status`)."""
    name = torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name()
    return {
        "device": device,
        "device_name": name,
        "torch_version": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "gate_mode": "random",
        "malloc": keep_freed_memory(),
        "energy_counters": rapl_status(device=device).line,
    }


def _stage_modules(model: torch.nn.Module, cfg: ArchConfig) -> list[torch.nn.Module]:
    spec = cfg.spec
    return [
        model.get_submodule(block_module_name(spec.stage_blocks(s)[0]).rpartition(".")[0])
        for s in range(spec.num_stages)
    ]


def measure(
    config: ArchConfig,
    batch_size: int,
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    blocks: bool = False,
    reference: torch.nn.Module | None = None,
) -> Measurement:
    """Time one network (and, with ``blocks``, each of its blocks; with a ``reference`` model on
    ``device``, one pass of it after each pass of the network); see the module docstring."""
    from dynas.kernels.model import build_model

    keep_freed_memory()
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(config).to(dev, memory_format=torch.channels_last).eval()
    model.set_gate_mode("random")
    h, w = config.input_size
    x = torch.randn(batch_size, 3, h, w, device=dev).contiguous(memory_format=torch.channels_last)
    cuda = dev.type == "cuda"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    ref_s: list[float] = []  # [passes] seconds of each reference pass

    def reference_pass() -> None:
        t = now()
        reference(x)
        ref_s.append(now() - t)

    n_stages = config.spec.num_stages
    parts: list[list[float]] = [[] for _ in range(n_stages + 3)]  # stem, stages..., head, network
    for t in _marked_passes(
        model,
        _stage_modules(model, config),
        x,
        warmup + repeats,
        now,
        reference_pass if reference is not None else None,
    )[warmup:]:
        # t: [start, (stage pre, stage post) x S, end]
        parts[0].append(t[1] - t[0])
        for s in range(n_stages):
            parts[1 + s].append(t[2 + 2 * s] - t[1 + 2 * s])
        parts[n_stages + 1].append(t[-1] - t[-2])
        parts[n_stages + 2].append(t[-1] - t[0])
    med = [statistics.median(p) * 1e3 for p in parts]
    blocks_ms = _time_blocks(model, config, x, repeats, now) if blocks else ()
    ref_ms = statistics.median(ref_s[warmup:]) * 1e3 if ref_s else math.nan
    return Measurement(med[0], tuple(med[1 : 1 + n_stages]), med[n_stages + 1], med[-1], repeats, blocks_ms, ref_ms)


def _marked_passes(
    model: torch.nn.Module,
    modules: Sequence[torch.nn.Module],
    x: torch.Tensor,
    passes: int,
    now: Callable[[], float],
    after: Callable[[], None] | None = None,
) -> list[list[float]]:
    """[passes][2 + 2 * len(modules)] times (``now()``) within each of ``passes`` passes of
    ``model`` on ``x``: its start, the start and end of each of ``modules`` in the order they
    run (hooks; each must run once per pass), its end.  ``after`` runs after each pass, outside
    the marks (under the same inference mode)."""
    marks: list[float] = []

    def mark(*_: Any) -> None:
        marks.append(now())

    handles = [h for m in modules for h in (m.register_forward_pre_hook(mark), m.register_forward_hook(mark))]
    out = []
    try:
        with torch.inference_mode():
            for _ in range(passes):
                marks.clear()
                mark()
                model(x)
                mark()
                if len(marks) != 2 + 2 * len(modules):
                    raise RuntimeError(
                        f"timing hooks: {len(marks) - 2} marks in one pass for {len(modules)} modules; "
                        "each hooked module must run exactly once per pass"
                    )
                out.append(list(marks))
                if after is not None:
                    after()
    finally:
        for hd in handles:
            hd.remove()
    return out


def _time_blocks(
    model: torch.nn.Module, config: ArchConfig, x: torch.Tensor, repeats: int, now: Callable[[], float]
) -> tuple[tuple[float, ...], ...]:
    """[stage][block] median ms of each block over ``repeats`` passes of ``model`` on ``x``, timed
    by hooks on the blocks (:func:`_marked_passes`)."""
    spec = config.spec
    modules = [model.get_submodule(block_module_name(b)) for s in range(spec.num_stages) for b in spec.stage_blocks(s)]
    passes = _marked_passes(model, modules, x, repeats, now)  # [passes][start, (pre, post) x blocks, end]
    med = [statistics.median(t[2 + 2 * i] - t[1 + 2 * i] for t in passes) * 1e3 for i in range(len(modules))]
    out, k = [], 0  # med: [blocks] ms, network order
    for s in range(spec.num_stages):
        d = spec.stage_depth(s)
        out.append(tuple(med[k : k + d]))
        k += d
    return tuple(out)


def run_plan(
    items: Iterable[PlanItem],
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    budget_s: float | None = None,
    max_items: int | None = None,
    progress: Callable[[int, float, PlanItem, Measurement], None] | None = None,
    seeds: Sequence[int] | None = None,
    reference: Callable[[PlanItem], float | None] | None = None,
    blocks: bool = False,
    paired: bool = False,
) -> list[dict[str, Any]]:
    """Measure ``items`` in order until they run out, ``max_items`` are done, or the next item
    would likely overrun ``budget_s`` (estimated from the items of the same backbone and batch
    size so far; the first item always runs).  Item ``k`` is built and fed from seed
    ``seeds[k]`` (default ``seed + k``).  Returns one row per part of every network.

    ``reference``: timed right after each item (e.g. its static network), kept as the rows'
    ``reference_ms`` (None: not recorded).  ``paired``: instead, each item's static network runs
    a pass after each of its passes (:func:`measure`), its median kept as ``reference_ms`` and
    the rows marked ``host_check`` = ``"pairs"``.  ``blocks``: also time every block (see
    :func:`measure`), one row each, part ``block{stage}.{index in the stage}``."""
    _check_budget(budget_s)
    if paired and reference is not None:
        raise ConfigError("paired=True with a reference is out of range; allowed: one way to time the host, not both")
    static_models: dict[tuple[str, tuple[int, int]], torch.nn.Module] = {}  # (backbone, input hw) -> static model
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
        cfg = item.config
        ref_model = static_models.get((cfg.backbone, cfg.input_size)) if paired else None
        if paired and ref_model is None:
            from dynas.kernels.model import build_model

            ref_model = build_model(ArchConfig.static(cfg.backbone, cfg.input_size))
            ref_model = ref_model.to(torch.device(device), memory_format=torch.channels_last).eval()
            static_models[(cfg.backbone, cfg.input_size)] = ref_model
        m = measure(
            cfg,
            item.batch_size,
            device,
            repeats,
            warmup,
            seeds[done] if seeds is not None else seed + done,
            blocks,
            reference=ref_model,
        )
        base = {
            "network_id": done,
            "backbone": cfg.backbone,
            "input_h": cfg.input_size[0],
            "input_w": cfg.input_size[1],
            "batch_size": item.batch_size,
            "config": cfg.to_json(indent=None),
        }
        if reference is not None:
            base["reference_ms"] = reference(item)
        if paired:
            base.update(reference_ms=m.reference_ms, host_check="pairs")
        cost.setdefault(key, []).append(time.perf_counter() - t_item)
        parts = [("stem", -1, "", m.stem_ms)]
        parts += [(f"stage{s}", s, st.short(), m.stages_ms[s]) for s, st in enumerate(cfg.stages)]
        parts += [
            (f"block{s}.{i}", s, cfg.stages[s].short(), ms)
            for s, row in enumerate(m.blocks_ms)
            for i, ms in enumerate(row)
        ]
        parts += [("head", -1, "", m.head_ms), ("network", -1, cfg.short(), m.network_ms)]
        for part, stage, choice, ms in parts:
            rows.append(
                {**base, "part": part, "stage": stage, "choice": choice, "measured_ms": ms, "repeats": m.repeats, **env}
            )
        done += 1
        if progress is not None:
            progress(done, time.perf_counter() - t0, item, m)
    return rows


def _recorded_static(
    static_ms: dict[str, float], backbone: str, input_size: Any, batch_size: int
) -> tuple[ArchConfig, str] | None:
    """The static network of ``backbone`` and its key, when ``static_ms`` (a target's record,
    see :func:`host_speed`) has it at this input and batch size; None otherwise."""
    cfg = ArchConfig.static(backbone, input_size)
    key = static_key(cfg.backbone, cfg.input_size, batch_size)
    return (cfg, key) if key in static_ms else None


def static_reference(
    static_ms: dict[str, float], device: str = "cpu", repeats: int = 3, warmup: int = 1
) -> Callable[[PlanItem], float | None]:
    """A ``run_plan`` reference: the item's static network timed again (ms), when ``static_ms``
    (a target's record, see :func:`host_speed`) has it; None otherwise."""

    def time_static(item: PlanItem) -> float | None:
        recorded = _recorded_static(static_ms, item.config.backbone, item.config.input_size, item.batch_size)
        return None if recorded is None else measure(recorded[0], item.batch_size, device, repeats, warmup).network_ms

    return time_static


def host_speed(
    static_ms: dict[str, float],
    networks: Iterable[tuple[str, Any, int]],
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Time again the static networks a target recorded at calibration (``static_ms``, see
    :func:`dynas.predictors.targets.static_key`) among ``networks`` (backbone, input size,
    batch size).

    One row per network: ``key``, ``calibrated_ms``, ``measured_ms`` and ``ratio`` (now / then).
    A shared machine's speed drifts (other tenants, clock); a ratio away from 1 for all of them
    says the host no longer runs at the speed its target was fitted at, which shifts every
    prediction by that factor.  Networks the target has no record of are skipped.
    """
    rows = []
    seen = set()
    for backbone, input_size, n in networks:
        recorded = _recorded_static(static_ms, backbone, input_size, n)
        if recorded is None or recorded[1] in seen:
            continue
        cfg, key = recorded
        seen.add(key)
        ms = measure(cfg, n, device, repeats, warmup).network_ms
        rows.append({"key": key, "calibrated_ms": static_ms[key], "measured_ms": ms, "ratio": ms / static_ms[key]})
    return rows


def _check_budget(budget_s: Any) -> None:
    """A time budget is None (no limit) or a finite number of seconds > 0 (NaN would never run out)."""
    if budget_s is not None:
        check_positive("budget_s", budget_s, allowed="a finite number of seconds > 0, or None")


def run_rounds(
    items: Iterable[PlanItem],
    rounds: int = 2,
    progress: Callable[..., None] | None = None,
    budget_s: float | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`run_plan` over ``items`` ``rounds`` times (odd rounds in reverse order, so a
    network's rounds are minutes apart), keeping for every network the round whose whole pass
    was fastest, with all its parts.  Other load on a shared machine only ever adds time, and
    it comes in bursts that can cover every pass of one measurement; a second round away from
    the burst is how such a measurement is recognised.  Rows get a ``rounds`` column, and
    ``round_spread``: how much longer the network's slowest round took than its fastest (0.05 =
    5 %; NaN for a network measured once), the machine's own noise; with ``paired=True`` also
    ``paired_spread``, the same for its time over its paired reference's.

    ``items`` may be endless when ``budget_s`` is given: the first round measures as many as
    fit in ``budget_s / rounds``, the later rounds measure those again.
    """
    check_int("rounds", rounds, 1)
    _check_budget(budget_s)
    _log.info("%s", rapl_status(device=kwargs.get("device", "cpu")).line)  # the rows hold times only
    base = kwargs.pop("seed", 0)
    pulled: list[PlanItem] = []

    def record(source: Iterable[PlanItem]) -> Iterator[PlanItem]:
        for item in source:
            pulled.append(item)
            yield item

    best: dict[int, list[dict[str, Any]]] = {}
    totals: dict[int, list[float]] = {}  # [network] its whole-pass median in each round
    ratios: dict[int, list[float]] = {}  # [network] whole pass / paired reference in each round (paired only)
    first_budget = budget_s / rounds if budget_s is not None else None
    for r in range(rounds):
        if r == 0:
            rows = run_plan(record(items), progress=progress, budget_s=first_budget, seed=base, **kwargs)
            measured = len({row["network_id"] for row in rows})
            items_list, order = pulled[:measured], list(range(measured))
        else:
            order = order[::-1]
            rows = run_plan(
                [items_list[i] for i in order], progress=progress, seeds=[base + i for i in order], seed=base, **kwargs
            )
        by_net: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            by_net.setdefault(row["network_id"], []).append(row)
        for local, net_rows in by_net.items():
            i = order[local]
            for row in net_rows:
                row["network_id"], row["rounds"] = i, rounds
            total = next(row["measured_ms"] for row in net_rows if row["part"] == "network")
            totals.setdefault(i, []).append(total)
            ref = net_rows[0].get("reference_ms")
            if net_rows[0].get("host_check") == "pairs" and ref is not None and ref > 0:
                ratios.setdefault(i, []).append(total / ref)
            kept = best.get(i)
            if kept is None or total < next(row["measured_ms"] for row in kept if row["part"] == "network"):
                best[i] = net_rows
    for i, rows_i in best.items():
        t = totals[i]
        for row in rows_i:
            row["round_spread"] = max(t) / min(t) - 1 if len(t) > 1 else math.nan
            if i in ratios:
                q = ratios[i]
                row["paired_spread"] = max(q) / min(q) - 1 if len(q) > 1 else math.nan
    return [row for i in sorted(best) for row in best[i]]
