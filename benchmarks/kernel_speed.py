"""Whole-network speed-ups of the dynamic kernels: the README's table.

Runs ``dynas.kernels.bench.bench`` (interleaved static/dynamic pairs, budget gate mode, fast
path, channels-last) for ResNet-50 and ResNet-101 at 224x224, rate 0.5 in every stage, and
prints one markdown row per (backbone, config) with batch 1 and batch 8 side by side.

    python benchmarks/kernel_speed.py --threads 2 --repeats 10
"""

from __future__ import annotations

import argparse
import sys

from dynas.kernels.bench import bench


def _stage(paradigm: str, **kw) -> dict:
    return {"paradigm": paradigm, "rate": 0.5, **kw}


CONFIGS: dict[str, list[dict]] = {
    "layer": [_stage("layer")] * 4,
    "channel G=2": [_stage("channel", channel_granularity=2)] * 4,
    "channel G=4": [_stage("channel", channel_granularity=4)] * 4,
    "spatial 28-14-7-7": [_stage("spatial", spatial_granularity=g) for g in (28, 14, 7, 7)],
    "spatial 8-4-7-7": [_stage("spatial", spatial_granularity=g) for g in (8, 4, 7, 7)],
    "mixed": [_stage("layer"), _stage("channel", channel_granularity=2), _stage("spatial", spatial_granularity=7), _stage("layer")],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    head = " | ".join(f"batch {b}: static / dynamic ms | speed-up" for b in args.batch_sizes)
    print(f"| backbone | config | stages | {head} | max abs err |")
    print("|---|---|---|" + "---|---|" * len(args.batch_sizes) + "---|")
    for backbone in args.backbones:
        for name, stages in CONFIGS.items():
            cells, err, short = [], 0.0, ""
            for b in args.batch_sizes:
                r = bench({"backbone": backbone, "input_size": 224, "stages": stages}, device=args.device,
                          batch_size=b, threads=args.threads, repeats=args.repeats, warmup=args.warmup)
                cells.append(f"{r.static_ms:.1f} / {r.dynamic_ms:.1f} | **{r.speedup:.2f}x**")
                err, short = max(err, r.max_abs_err), r.config.replace("|", "\\|")
            print(f"| {backbone} | {name} | `{short}` | " + " | ".join(cells) + f" | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
