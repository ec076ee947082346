"""Training speed of a dynamic network against its static backbone, and where the time goes.

Both networks train on the same random batch (same backbone, input size, batch, threads,
device, precision as ``dynas train`` uses: float32 on CPU, bf16/fp16 autocast + channels-last
on CUDA).  A step is what :mod:`dynas.kernels.fulltrain` does per batch, without the teacher:

* static: forward, cross-entropy, backward, SGD step;
* dynamic: the masked training path (dense compute, Gumbel-sampled masks), the recipe loss
  (cross-entropy + sparsity from the FLOPs readout), backward, SGD step.

The two alternate in rounds (static block, dynamic block, static block, ...), so machine drift
hits both; each reports the median step.  Then one profiled step of each gives the time per
phase (forward / loss / backward / optimizer) and the operators whose time grows most from
static to dynamic.  The teacher's forward (distillation) is timed on its own: it is the same
cost for any config.

    python benchmarks/train_speed.py CONFIG --batch-size 32 --threads 2 --rounds 5
    python benchmarks/train_speed.py CONFIG --device cuda --batch-size 128

Prints images/s of each, the dynamic/static step-time ratio (the issue's budget: at most
1.3x), the phase breakdown and the top operators.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dynas.kernels.distributed import DistEnv
from dynas.kernels.evaluate import autocast, precision
from dynas.kernels.model import build_model
from dynas.kernels.recipe import recipe_loss
from dynas.kernels.trainer import stage_targets
from dynas.spaces.config import ArchConfig, load_config

PHASES = ("forward", "loss", "backward", "optimizer")


class Trainee:
    """One network with its optimizer; ``step()`` runs one training step, timing each phase."""

    def __init__(self, cfg: ArchConfig, classes: int, device: torch.device, amp: bool):
        torch.manual_seed(0)
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.net = build_model(cfg, num_classes=classes).to(device, memory_format=fmt).train()
        self.device, self.dtype = device, precision(DistEnv(device=device), amp)
        self.gated = any(b.paradigm != "static" for b in self.net.blocks())
        self.targets = stage_targets(self.net)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-5)
        self.net.set_temperature(1.0)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        t = [self._sync()]
        with autocast(self.device, self.dtype):
            logits = self.net(x)  # [B, classes]
            t.append(self._sync())
            if self.gated:
                loss, _ = recipe_loss(logits, y, self.net.flops_readout(), 1, 10, *self.targets)
            else:
                loss = F.cross_entropy(logits.float(), y)
        t.append(self._sync())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(self._sync())
        self.opt.step()
        t.append(self._sync())
        return {p: b - a for p, a, b in zip(PHASES, t, t[1:])}


def _interleaved(
    a: Trainee, b: Trainee, x: torch.Tensor, y: torch.Tensor, rounds: int, steps: int, warmup: int
) -> tuple[list[dict], list[dict]]:
    for _ in range(warmup):
        a.step(x, y)
        b.step(x, y)
    ta, tb = [], []
    for _ in range(rounds):
        ta += [a.step(x, y) for _ in range(steps)]
        tb += [b.step(x, y) for _ in range(steps)]
    return ta, tb


def _median(times: list[dict], key: Callable[[dict], float]) -> float:
    return statistics.median(key(t) for t in times)


def _profile(trainee: Trainee, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Self time (ms) per operator over one step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        trainee.step(x, y)
    out: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total if x.is_cuda else e.self_cpu_time_total
        out[e.key] = out.get(e.key, 0.0) + us / 1000
    return out


def _teacher_ms(cfg: ArchConfig, classes: int, x: torch.Tensor, dtype: Any, repeats: int) -> float:
    teacher = build_model(ArchConfig.static(cfg.backbone, cfg.input_size), num_classes=classes).to(x.device).eval()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(x.device, dtype):
            teacher(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="config or exported JSON file")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=None, help="image side (default: the config's)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--no-amp", action="store_true", help="float32 on CUDA too")
    ap.add_argument("--rounds", type=int, default=5, help="alternating blocks of each network")
    ap.add_argument("--steps", type=int, default=3, help="steps per block")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    ap.add_argument("--top", type=int, default=12, help="operators listed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.input_size:
        cfg = load_config({**cfg.to_dict(), "input_size": args.input_size})
    device = torch.device(args.device)
    static = Trainee(ArchConfig.static(cfg.backbone, cfg.input_size), args.classes, device, not args.no_amp)
    dynamic = Trainee(cfg, args.classes, device, not args.no_amp)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, *cfg.input_size, generator=g).to(device)  # [B, 3, H, W]
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(device)  # [B]
    ts, td = _interleaved(static, dynamic, x, y, args.rounds, args.steps, args.warmup)
    step_s, step_d = _median(ts, lambda t: sum(t.values())), _median(td, lambda t: sum(t.values()))
    h, w = cfg.input_size
    print(
        f"{cfg.backbone} @ {h}x{w}, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, "
        f"{static.dtype or 'float32'}, torch {torch.__version__}; {args.rounds} x {args.steps} steps each, interleaved"
    )
    print(f"config: {cfg.short()}")
    print(f"static  {1000 * step_s:9.2f} ms/step  {args.batch_size / step_s:8.1f} images/s")
    print(f"dynamic {1000 * step_d:9.2f} ms/step  {args.batch_size / step_d:8.1f} images/s")
    print(f"dynamic / static step time: x{step_d / step_s:.3f}  (budget: at most x1.3)")
    print(
        f"teacher forward (distillation, same for any config): {_teacher_ms(cfg, args.classes, x, static.dtype, 3):.2f} ms"
    )
    print("\nmedian ms per phase      static    dynamic   ratio")
    for p in PHASES:
        a, b = 1000 * _median(ts, lambda t: t[p]), 1000 * _median(td, lambda t: t[p])
        print(f"  {p:<20} {a:9.2f} {b:10.2f}   x{b / a if a else float('nan'):.2f}")
    ps, pd = _profile(static, x, y), _profile(dynamic, x, y)
    rows = sorted(set(ps) | set(pd), key=lambda k: pd.get(k, 0) - ps.get(k, 0), reverse=True)[: args.top]
    print(
        f"\noperators, self time in one profiled step (ms), by growth: static {sum(ps.values()):.1f}, "
        f"dynamic {sum(pd.values()):.1f}"
    )
    for k in rows:
        print(f"  {k[:44]:<44} {ps.get(k, 0):9.2f} {pd.get(k, 0):10.2f}  {pd.get(k, 0) - ps.get(k, 0):+9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
