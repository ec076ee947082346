"""Measure a dynamic network against its static backbone: ``dynas bench``.

Method (what the numbers mean):

* the static network is the plain backbone (``spaces/torch_model.py``); the dynamic one is
  ``build_model(config)`` in **budget** gate mode (exactly the configured rates per sample) or,
  with ``gate_mode="random"``, the same counts chosen at random per sample (what a trained
  network's input-dependent gates look like to the hardware, and what the calibrated latency
  model assumes), on the **fast** path (real skipping), in eval mode under ``torch.inference_mode``;
* both networks and the input in one memory format, ``channels_last`` by default (on this
  project's CPUs the static ResNet-50 runs 4% faster at batch 1 and 12% at batch 8 that way, so
  it is the stronger baseline; the dynamic gathers and scatters copy whole pixel rows in it);
* the same random input batch for both; ``warmup`` untimed runs of each, then ``repeats``
  timed pairs, interleaved A/B with the order alternating every pair so slow drift (clocks,
  other load) hits both equally; on CUDA every timing is bracketed by synchronisation;
* reported: median and p10-p90 spread of each, speed-up = static median / dynamic median, the
  thread count in force, and the max abs difference between the fast and reference paths on
  the same input (the reference path masks dense outputs with the same decisions), and the
  FLOPs limit of the speed-up: static FLOPs / the dynamic network's executed FLOPs in the timed
  pass (``torch.utils.flop_counter``'s count of the static network, the dynamic blocks'
  ``flops_readout``, batch mean), what the speed-up would be if time followed FLOPs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from dynas.checks import check_choice, check_int
from dynas.errors import ConfigError
from dynas.spaces.config import load_config
from dynas.spaces.torch_model import build_static_model

__all__ = ["MEMORY_FORMATS", "CLOCKS", "BenchResult", "bench", "flops_limit"]

#: memory formats of ``bench`` (names as in ``torch``)
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "channels_last": torch.channels_last,
    "contiguous": torch.contiguous_format,
}


@dataclass(frozen=True)
class BenchResult:
    backbone: str
    config: str  # compact per-stage form
    device: str
    threads: int
    batch_size: int
    input_size: tuple[int, int]
    static_ms: float
    dynamic_ms: float
    speedup: float
    static_spread_ms: float  # p90 - p10
    dynamic_spread_ms: float
    max_abs_err: float
    repeats: int
    torch_version: str
    memory_format: str
    gate_mode: str = "budget"
    clock: str = "wall"
    flops_limit: float = float("nan")  # static FLOPs / dynamic executed FLOPs (see the module docstring)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


#: clocks of ``bench``: wall time, or the CPU time of the calling thread (see ``bench``)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def _timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], Any]], float]:
    now = CLOCKS[clock]

    def run(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (now() - t0) * 1e3

    return run


def _spread(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    q = statistics.quantiles(times, n=10)
    return q[-1] - q[0]


def flops_limit(model: Any) -> float:
    """Static FLOPs / executed FLOPs of ``model``'s last forward pass (a :class:`DynamicNet`; batch mean).

    The stem, the head and the static blocks count as in the static network; each dynamic block
    counts its executed FLOPs (maskers and downsample included) in place of its dense ones.
    """
    from dynas.predictors.flops import dense_flops

    static = float(dense_flops(model.config.backbone, model.config.input_size).total_flops)
    executed = static
    for r in model.flops_readout():
        executed += float(r["executed_flops"].mean()) - (r["dense_flops"] - r["masker_flops"])
    return static / executed


def bench(
    config: Any,
    device: str = "cpu",
    batch_size: int = 1,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 5,
    seed: int = 0,
    memory_format: str = "channels_last",
    gate_mode: str = "budget",
    clock: str = "wall",
) -> BenchResult:
    """Time static vs dynamic (budget mode, fast path) on ``device``; see the module docstring.

    ``clock="thread"`` (CPU only) times the CPU time of the calling thread instead of wall time:
    on a host that other processes load, it leaves out the time this process waits for a core.
    It counts the calling thread's share of each parallel operator, so it stands for the wall
    time of an unloaded host only when the worker threads wait passively (start the process
    with ``OMP_WAIT_POLICY=PASSIVE``; spinning threads would count their waiting).
    """
    from dynas.kernels.calibrate import keep_freed_memory
    from dynas.kernels.model import build_model

    check_choice("device", device, ("cpu", "cuda"), problem="is not supported")
    check_choice("gate_mode", gate_mode, ("budget", "random"), problem="is not allowed")
    if clock not in CLOCKS or (clock == "thread" and device != "cpu"):
        raise ConfigError(f"clock={clock!r} is not allowed; allowed: wall, or thread on cpu")
    check_choice("memory_format", memory_format, MEMORY_FORMATS)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not available on this machine; allowed: cpu")
    for name, value, minimum in (("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        check_int(name, value, minimum)
    if threads is not None:
        torch.set_num_threads(check_int("threads", threads, 1))
    cfg = load_config(config)
    keep_freed_memory()  # time what calibration times (see kernels.calibrate.keep_freed_memory)
    dev = torch.device(device)
    torch.manual_seed(seed)
    fmt = MEMORY_FORMATS[memory_format]
    dynamic = build_model(cfg).to(dev, memory_format=fmt).eval()
    static = build_static_model(cfg.spec).to(dev, memory_format=fmt).eval()
    dynamic.set_gate_mode(gate_mode)
    h, w = cfg.input_size
    x = torch.randn(batch_size, 3, h, w, device=dev).contiguous(memory_format=fmt)
    run = _timer(dev, clock)
    with torch.inference_mode():
        # the same generator state for both paths: random gate mode then draws the same decisions
        rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        dynamic.set_path("reference")
        ref = dynamic(x)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, dev)
        dynamic.set_path("fast")
        fast = dynamic(x)
        max_abs_err = float((fast - ref).abs().max())
        limit = flops_limit(dynamic)
        for _ in range(warmup):
            static(x)
            dynamic(x)
        t_static, t_dynamic = [], []
        for i in range(repeats):
            if i % 2 == 0:
                t_static.append(run(lambda: static(x)))
                t_dynamic.append(run(lambda: dynamic(x)))
            else:
                t_dynamic.append(run(lambda: dynamic(x)))
                t_static.append(run(lambda: static(x)))
    s_ms, d_ms = statistics.median(t_static), statistics.median(t_dynamic)
    return BenchResult(
        backbone=cfg.backbone,
        config=cfg.short(),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        batch_size=batch_size,
        input_size=cfg.input_size,
        static_ms=s_ms,
        dynamic_ms=d_ms,
        speedup=s_ms / d_ms,
        static_spread_ms=_spread(t_static),
        dynamic_spread_ms=_spread(t_dynamic),
        max_abs_err=max_abs_err,
        repeats=repeats,
        torch_version=torch.__version__,
        memory_format=memory_format,
        gate_mode=gate_mode,
        clock=clock,
        flops_limit=limit,
    )
