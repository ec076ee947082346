"""Early exits measured: latency under the budget and deadline policies, halted vs full, accuracy per budget.

Issue 20's "Measured" list (the search aside), with dynas's kernels on this CPU and the committed
calibrated target ``benchmarks/data/cpu-2core-dec07/cpu-2core-dec07.toml``:

1. **Budgets.** ResNet-18 with light exits after stages 0, 1 and 2 (untrained weights: time does
   not depend on them), budgets of 30 / 50 / 70 % of the static network's predicted latency on
   the target at batch 1 and 8; per policy (budget, deadline; batches interleaved, the order
   alternating) the measured wall time per batch over ``--batches`` batches (median, p90,
   max), the exit answered from, and how often the batch met the budget.  A budget below the
   first exit's predicted cost is refused by both policies; the row says so.
2. **Halted vs full.** Halting at the exit after stage 1 (the second of four) against the same
   network run to its own head, ``--pairs`` interleaved pairs: medians, p10-p90 spread, their
   ratio, against the share of FLOPs the halted path still runs (its exit head included) and
   the predicted ratio.  The halt saves at least the work it skips, minus the head, when the
   time ratio is at most the FLOPs ratio.
3. **Accuracy per budget** on ``synthetic-hard``: one ResNet-18 with exits trained jointly
   (``exits_depth.py``'s recipe) against separate static networks of matching latency (the
   network truncated after stage 0, 1, 2 with a light head, and the whole network, each trained
   alone with the same recipe: DDI's one model for all budgets vs one model per budget).  For
   budgets of 30 / 50 / 70 / 100 % of the static network's predicted latency per image (batch 1):
   the budget policy, the confidence policy (thresholds fitted on the first half of the held-out
   split, accuracy on the second half) and the best separate network that fits.

A benchmark, not a test: timing thresholds live here only.  On a host other processes load,
start it with ``OMP_WAIT_POLICY=PASSIVE`` (spinning worker threads that lose their core stall
their partner for a whole time slice: ResNet-18 at 112 x 112 measured 10 x slower that way on
the loaded shared host).  Modest sizes take a few minutes there; longer runs::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/exits_budget.py --batches 50
    OMP_WAIT_POLICY=PASSIVE python benchmarks/exits_budget.py --size 224 --batches 200 --steps 300 --train 4096
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exits_depth import train_model  # noqa: E402  (the recipe of the depth benchmark)

from dynas.errors import ConfigError  # noqa: E402
from dynas.kernels.data import load_data  # noqa: E402
from dynas.kernels.exits import FinalPolicy, fit_thresholds, forward_to, make_policy  # noqa: E402
from dynas.kernels.model import build_model  # noqa: E402
from dynas.predictors.latency import predict  # noqa: E402
from dynas.predictors.targets import load_target  # noqa: E402
from dynas.spaces.config import ArchConfig, load_config  # noqa: E402

TARGET = Path(__file__).resolve().parent / "data/cpu-2core-dec07/cpu-2core-dec07.toml"
EXITS = (0, 1, 2)
HALT_STAGE = 1  # "an exit after stage 2 of 4" (0-based stage 1)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _config(size: int, exits: tuple[int, ...] = EXITS) -> ArchConfig:
    return load_config({"backbone": "resnet18", "input_size": size, "stages": [{}] * 4, "exits": list(exits)})


def _timed(model: Any, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1e3


def _p(times: list[float], q: int) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] if len(times) > 1 else times[0]


# ----------------------------------------------------------------------------- 1. budgets


def _deadline_pass(trace: list[tuple[str, float, float, float]], deadline_ms: float) -> tuple[bool, bool]:
    """(guarantee held, prefix late) for one deadline pass (``model.last_trace``).  The stated
    guarantee (docs/early-exits.md): the pass ends within the deadline or at most its last
    unit's measured time after it, unless the prefix to the first exit (which always runs)
    already ended past it; "prefix late" is that exemption."""
    end = trace[-1][3]
    prefix = next(i for i, t in enumerate(trace) if t[0] == "exit 0")
    late = trace[prefix][3] > deadline_ms
    held = end <= deadline_ms or end - deadline_ms <= trace[-1][3] - trace[-1][2] or prefix == len(trace) - 1
    return held, late


def budgets(args: argparse.Namespace, target: Any) -> list[dict[str, Any]]:
    cfg = _config(args.size)
    model = build_model(cfg).eval().to(memory_format=torch.channels_last)
    static = ArchConfig.static("resnet18", args.size)
    rows = []
    for n in args.batch_sizes:
        x = torch.randn(n, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
        static_ms = predict(static, target, n).latency_ms
        first_ms = predict(cfg, target, n).exits[0].latency_ms
        with torch.inference_mode():
            model.exit_policy = FinalPolicy()
            for _ in range(args.warmup):
                model(x)
            static_measured = statistics.median(_timed(model, x) for _ in range(args.static_repeats))
        for frac in args.fractions:
            budget = frac * static_ms
            base = {"batch": n, "fraction": frac, "budget_ms": budget, "static_predicted_ms": static_ms}
            base["static_measured_ms"] = static_measured
            try:
                policies = {
                    "budget": make_policy(cfg, "budget", budget_ms=budget, target=target),
                    "deadline": make_policy(cfg, "deadline", deadline_ms=budget, target=target),
                }
                policies["budget"].exit_for(cfg, n)
                policies["deadline"].unit_costs(cfg, n)
            except ConfigError as exc:
                rows.append({**base, "refused": str(exc), "first_exit_ms": first_ms})
                print(f"batch {n}, {frac:.0%}: refused ({exc})", flush=True)
                continue
            times: dict[str, list[float]] = {p: [] for p in policies}
            used: dict[str, collections.Counter] = {p: collections.Counter() for p in policies}
            held: list[tuple[bool, bool]] = []  # the deadline policy's guarantee, prefix late; per pass
            with torch.inference_mode():
                for policy in policies.values():
                    model.exit_policy = policy
                    for _ in range(args.warmup):
                        model(x)
                for i in range(args.batches):
                    for name in list(policies)[:: 1 if i % 2 == 0 else -1]:
                        model.exit_policy = policies[name]
                        times[name].append(_timed(model, x))
                        used[name][int(model.last_exit[0])] += 1
                        if name == "deadline":
                            held.append(_deadline_pass(model.last_trace, budget))
            for name in policies:
                t = times[name]
                rows.append(
                    {
                        **base,
                        "policy": name,
                        "median_ms": statistics.median(t),
                        "p90_ms": _p(t, 90),
                        "max_ms": max(t),
                        "met": sum(v <= budget for v in t) / len(t),
                        "exits": {str(k): v for k, v in sorted(used[name].items())},
                        **(
                            {
                                "guarantee_held": sum(h for h, _ in held) / len(held),
                                "prefix_late": sum(p for _, p in held) / len(held),
                            }
                            if name == "deadline"
                            else {}
                        ),
                    }
                )
                r = rows[-1]
                print(
                    f"batch {n}, {frac:.0%} = {budget:.3g} ms: {name:8s} median {r['median_ms']:.3g} ms, p90 "
                    f"{r['p90_ms']:.3g}, max {r['max_ms']:.3g}, met {100 * r['met']:.0f}% of {len(t)}"
                    + (
                        f" (guarantee held {100 * r['guarantee_held']:.0f}%, prefix to the first exit late "
                        f"{100 * r['prefix_late']:.0f}%)"
                        if name == "deadline"
                        else ""
                    )
                    + ", exits "
                    f"{r['exits']} (static: predicted {static_ms:.3g} ms, measured {static_measured:.3g} ms)",
                    flush=True,
                )
    return rows


# ----------------------------------------------------------------------------- 2. halted vs full


def halted_vs_full(args: argparse.Namespace, target: Any) -> list[dict[str, Any]]:
    cfg = _config(args.size)
    model = build_model(cfg).eval().to(memory_format=torch.channels_last)
    k = EXITS.index(HALT_STAGE)
    rows = []
    for n in args.batch_sizes:
        x = torch.randn(n, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
        exits = predict(cfg, target, n).exits
        halt = make_policy(cfg, "budget", budget_ms=exits[k].latency_ms * (1 + 1e-9), target=target)
        assert halt.exit_for(cfg, n) == k
        full = FinalPolicy()
        th, tf = [], []
        with torch.inference_mode():
            for policy in (halt, full) * args.warmup:
                model.exit_policy = policy
                model(x)
            for i in range(args.pairs):
                for policy, t in ((halt, th), (full, tf))[:: 1 if i % 2 == 0 else -1]:
                    model.exit_policy = policy
                    t.append(_timed(model, x))
        mh, mf = statistics.median(th), statistics.median(tf)
        flops = exits[k].flops / exits[-1].flops
        row = {
            "batch": n,
            "halted_ms": mh,
            "halted_spread_ms": _p(th, 90) - _p(th, 10),
            "full_ms": mf,
            "full_spread_ms": _p(tf, 90) - _p(tf, 10),
            "time_ratio": mh / mf,
            "flops_ratio": flops,
            "predicted_ratio": exits[k].latency_ms / exits[-1].latency_ms,
            "saves_the_skipped_work": mh / mf <= flops,
        }
        rows.append(row)
        print(
            f"batch {n}: halted after stage {HALT_STAGE} {mh:.3g} ms (p10-p90 {row['halted_spread_ms']:.2g}), full "
            f"{mf:.3g} ms ({row['full_spread_ms']:.2g}); time ratio {mh / mf:.3f}, FLOPs ratio {flops:.3f} "
            f"(exit head included), predicted {row['predicted_ratio']:.3f}",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------- 3. accuracy per budget


def _accuracy(fn: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        hits = sum(int((fn(x).argmax(dim=1) == y).sum()) for x, y in batches)
    return 100.0 * hits / sum(len(y) for _, y in batches)


def accuracy(args: argparse.Namespace, target: Any) -> list[dict[str, Any]]:
    size = args.acc_size
    splits = load_data(f"synthetic-hard:{args.train}", (size, size), args.acc_batch, args.seed)
    val = [(x, y) for x, y in splits.val]
    xs, ys = torch.cat([x for x, _ in val]), torch.cat([y for _, y in val])  # [n, 3, H, W], [n]
    half = len(ys) // 2
    fit_part, test_part = [(xs[:half], ys[:half])], [(xs[half:], ys[half:])]
    cfg = _config(size)
    t0 = time.perf_counter()
    model = train_model(cfg.to_dict(), splits, args.steps, args.lr, args.seed, label="exits").eval()
    separate: list[dict[str, Any]] = []  # the truncated networks, each trained alone
    for s in (*EXITS, 3):
        one = ArchConfig.static("resnet18", size).to_dict() if s == 3 else _config(size, (s,)).to_dict()
        if s == 3:
            net = train_model(
                one, splits, args.steps, args.lr, args.seed, lambda m, x, y: F.cross_entropy(m(x), y), "static"
            )
            ms = predict(load_config(one), target, 1).latency_ms
            top1 = _accuracy(net.eval(), test_part)
        else:
            net = train_model(
                one,
                splits,
                args.steps,
                args.lr,
                args.seed,
                lambda m, x, y: F.cross_entropy(forward_to(m, 0, x), y),
                f"to stage {s}",
            ).eval()
            ms = predict(load_config(one), target, 1).exits[0].latency_ms
            top1 = _accuracy(lambda x, net=net: forward_to(net, 0, x), test_part)
        separate.append({"after_stage": s, "latency_ms": ms, "top1": top1})
    train_s = time.perf_counter() - t0
    static_ms = predict(ArchConfig.static("resnet18", size), target, 1).latency_ms
    exits = predict(cfg, target, 1).exits
    exit_top1 = [_accuracy(lambda x, k=k: forward_to(model, k, x), test_part) for k in range(len(exits))]
    rows = []
    for frac in args.acc_fractions:
        budget = frac * static_ms
        row: dict[str, Any] = {"fraction": frac, "budget_ms": budget}
        try:  # the exit the budget policy picks at batch 1; its accuracy is that exit's, run alone
            row["budget_exit"] = k = make_policy(cfg, "budget", budget_ms=budget, target=target).exit_for(cfg, 1)
            row["budget_top1"] = exit_top1[k]
        except ConfigError:
            row["budget_top1"] = None  # no exit fits: chance
        try:
            fit = fit_thresholds(model, fit_part, target, [budget], batch_size=1)[0]
            model.set_exit_policy("confidence", thresholds=list(fit.thresholds))
            row["confidence_top1"] = _accuracy(model, test_part)
            shares = torch.bincount(model.last_exit, minlength=len(exits)).double() / len(test_part[0][1])
            row["confidence_mean_ms"] = float(sum(s * e.anytime_latency_ms_per_image for s, e in zip(shares, exits)))
        except ConfigError:
            row["confidence_top1"] = None
        fits = [s for s in separate if s["latency_ms"] <= budget * (1 + 1e-9)]
        row["separate_top1"] = max((s["top1"] for s in fits), default=None)
        rows.append(row)
        print(f"{frac:.0%} of static ({budget:.3g} ms per image): {row}", flush=True)
    print(
        f"exits model: per-exit top-1 {[round(a, 1) for a in exit_top1]}, predicted ms straight to each "
        f"{[round(e.latency_ms, 3) for e in exits]}; separate networks {separate}; training {train_s:.0f} s",
        flush=True,
    )
    return [{"exit_top1": exit_top1, "exit_ms": [e.latency_ms for e in exits], "separate": separate}, *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=str(TARGET))
    ap.add_argument("--size", type=int, default=112, help="input side of the timing parts")
    ap.add_argument("--batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[1, 8])
    ap.add_argument("--fractions", type=lambda t: [float(v) for v in t.split(",")], default=[0.3, 0.5, 0.7])
    ap.add_argument("--batches", type=int, default=200, help="batches per policy and budget")
    ap.add_argument("--pairs", type=int, default=50, help="halted/full pairs")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--static-repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="the target's thread count")
    ap.add_argument("--acc-size", type=int, default=32, help="input side of the accuracy part")
    ap.add_argument("--acc-fractions", type=lambda t: [float(v) for v in t.split(",")], default=[0.3, 0.5, 0.7, 1.0])
    ap.add_argument("--train", type=int, default=2048, help="synthetic-hard training images")
    ap.add_argument("--steps", type=int, default=60, help="training steps of each network")
    ap.add_argument("--acc-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="budgets,halt,accuracy")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write every figure here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.target)
    print(
        f"load average at start: {_load()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        flush=True,
    )
    out: dict[str, Any] = {"args": vars(args), "load_start": _load()}
    parts = {"budgets": budgets, "halt": halted_vs_full, "accuracy": accuracy}
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        out[name] = parts[name](args, target)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s, load average now {_load()}]", flush=True)
    out["load_end"] = _load()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
