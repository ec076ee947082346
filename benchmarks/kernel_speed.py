"""Whole-network speed-ups of the dynamic kernels against their targets: docs/kernels.md's table.

For ResNet-50 and ResNet-101 at 224x224, every paradigm at rate 0.5 in every stage (layer;
channel G = 2 and 4; spatial S = 4-4-2-1 and 8-4-7-1) and the two combinations at 0.7 x 0.7
(spatial+channel, layer+channel), at batch 1 and 8, this runs ``dynas.kernels.bench.bench``:
budget gates, fast path, channels-last, static and dynamic timed in interleaved pairs, medians.
Each row prints the speed-up, its FLOPs limit (static FLOPs / the dynamic network's executed
FLOPs, from the model's FLOPs read-out), the speed-up as a fraction of that limit, the target
and whether the cell meets it, the fast path's max abs error against the reference path, and
the 1-minute load average when the row was measured (timings mean little on a loaded host).

    python benchmarks/kernel_speed.py --threads 2 --repeats 10
    python benchmarks/kernel_speed.py --rates 0.3 0.5 0.7   # the "never slower than static" rule

``--rates`` runs every config with each rate in place of its own (both rates of a combination)
and checks the rule that no configuration is slower than the static network at a rate <= 0.7.
The targets below are the issue's (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from dynas.kernels.bench import bench

#: minimum speed-up per (paradigm family, batch size)
TARGETS: dict[tuple[str, int], float] = {
    ("layer", 1): 1.75,
    ("layer", 8): 1.75,
    ("channel", 1): 1.5,
    ("channel", 8): 1.5,
    ("spatial", 1): 1.3,
    ("spatial", 8): 1.4,
    ("combined", 1): 1.4,
    ("combined", 8): 1.4,
}
#: ``--rates``: no configuration slower than static at any rate up to this one
RULE_MAX_RATE, RULE_MIN_SPEEDUP = 0.7, 1.0


def _stages(paradigm: str, rate: float, spatial: tuple[int, ...] = (), channel: int | None = None) -> list[dict]:
    stages = []
    for i in range(4):
        st: dict[str, Any] = {"paradigm": paradigm, "rate": rate}
        if spatial:
            st["spatial_granularity"] = spatial[i]
        if channel is not None:
            st["channel_granularity"] = channel
        if "+" in paradigm:
            st["channel_rate"] = rate
        stages.append(st)
    return stages


#: name -> (target family, default rate, stages builder taking a rate)
CONFIGS: dict[str, tuple[str, float, Any]] = {
    "layer": ("layer", 0.5, lambda r: _stages("layer", r)),
    "channel G=2": ("channel", 0.5, lambda r: _stages("channel", r, channel=2)),
    "channel G=4": ("channel", 0.5, lambda r: _stages("channel", r, channel=4)),
    "spatial S=4-4-2-1": ("spatial", 0.5, lambda r: _stages("spatial", r, spatial=(4, 4, 2, 1))),
    "spatial S=8-4-7-1": ("spatial", 0.5, lambda r: _stages("spatial", r, spatial=(8, 4, 7, 1))),
    "spatial+channel S=4-4-2-1 G=2": ("combined", 0.7, lambda r: _stages("spatial+channel", r, (4, 4, 2, 1), 2)),
    "layer+channel G=2": ("combined", 0.7, lambda r: _stages("layer+channel", r, channel=2)),
}


def _row(backbone: str, name: str, rate: float, batch: int, args: argparse.Namespace, rule: bool) -> dict[str, Any]:
    family, _, build = CONFIGS[name]
    r = bench(
        {"backbone": backbone, "input_size": 224, "stages": build(rate)},
        device=args.device,
        batch_size=batch,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        gate_mode=args.gates,
        clock=args.clock,
    )
    target = RULE_MIN_SPEEDUP if rule else TARGETS[(family, batch)]
    return {
        "backbone": backbone,
        "name": name,
        "rate": rate,
        "batch": batch,
        "target": target,
        "verdict": "pass" if r.speedup >= target else "MISS",
        "load_1min": os.getloadavg()[0],
        **r.to_dict(),
    }


def _print(row: dict[str, Any]) -> None:
    rate = f"{row['rate']:.2f}" if "+" not in row["name"] else f"{row['rate']:.2f} x {row['rate']:.2f}"
    print(
        f"| {row['backbone']} | {row['name']} | {rate} | {row['batch']} "
        f"| {row['static_ms']:.1f} ({row['static_spread_ms']:.1f}) | {row['dynamic_ms']:.1f} ({row['dynamic_spread_ms']:.1f}) "
        f"| **{row['speedup']:.2f}x** | {row['flops_limit']:.2f}x | {row['speedup'] / row['flops_limit']:.0%} "
        f"| >= {row['target']:.2f}x {row['verdict']} | {row['max_abs_err']:.1e} | {row['load_1min']:.1f} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"])
    ap.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=list(CONFIGS),
        metavar="NAME",
        help=f"rows to run (default: all): {', '.join(CONFIGS)}",
    )
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument(
        "--rates",
        nargs="+",
        type=float,
        default=None,
        help=f"check the rule: every config at each of these rates (<= {RULE_MAX_RATE}) at least "
        f"{RULE_MIN_SPEEDUP}x; default: each config at its own rate against its target",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gates", default="budget", choices=("budget", "random"))
    ap.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "thread"),
        help="wall time (the targets' measure), or the main thread's CPU time with passively "
        "waiting worker threads: a proxy for an unloaded host's wall time on a loaded one",
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every row (all bench fields) to PATH")
    args = ap.parse_args(argv)
    if argv is None and args.clock == "thread" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # OpenMP reads the policy when torch starts its threads: restart with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    bad = [r for r in args.rates or () if not 0 < r <= RULE_MAX_RATE]
    if bad:
        ap.error(f"--rates={bad[0]!r} is out of range; allowed: numbers in (0, {RULE_MAX_RATE}]")
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.device}, pure-PyTorch kernels, "
        f"{args.gates} gates, {args.clock} clock, medians of {args.repeats} interleaved pairs; load average at start "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        "| backbone | config | rate | batch | static ms (p10-p90) | dynamic ms (p10-p90) | speed-up | FLOPs limit "
        "| of limit | target | max abs err | load |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    rows = []
    for backbone in args.backbones:
        for name in args.configs:
            for rate in args.rates or [CONFIGS[name][1]]:
                for b in args.batch_sizes:
                    rows.append(_row(backbone, name, rate, b, args, rule=args.rates is not None))
                    _print(rows[-1])
    misses = [r for r in rows if r["verdict"] != "pass"]
    print(
        f"\n{len(rows) - len(misses)} of {len(rows)} cells meet their target; "
        f"max abs err {max(r['max_abs_err'] for r in rows):.1e}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
