"""CPU speed-ups of dynamic DenseNet-121 at rate 0.5: the table in docs/backbones.md.

Runs ``dynas.kernels.bench.bench`` (static and dynamic networks interleaved pair by pair,
medians, fast path, channels-last, the same input; the fast-vs-reference error on it) for
layer, channel and layer+channel (DDI's MGL2S) at rate 0.5 in every stage, batch 1 and 8, in
two gate modes: ``budget`` (an untrained network's scores barely depend on the input, so every
sample skips the same layers: at batch 8 the later layers and the transitions skip the skipped
layers' channels too) and ``random`` (each sample its own layers, as a trained network's gates
look to the hardware: at batch 8 a channel is read when any running sample produced it).  It
prints the machine's load (``uptime``) before and after: the timings mean little on a busy host.

    python benchmarks/densenet_speed.py --threads 2 --repeats 10
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from dynas.kernels.bench import bench


def _stage(paradigm: str, **kw) -> dict:
    return {"paradigm": paradigm, "rate": 0.5, **kw}


CONFIGS: dict[str, list[dict]] = {
    "layer": [_stage("layer")] * 4,
    "channel G=4": [_stage("channel", channel_granularity=4)] * 4,
    "layer+channel G=4 (MGL2S)": [_stage("layer+channel", channel_granularity=4, channel_rate=0.5)] * 4,
}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--gate-modes", nargs="+", default=["budget", "random"], choices=("budget", "random"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"load before: {_uptime()}")
    head = " | ".join(f"batch {b}: static / dynamic ms | speed-up" for b in args.batch_sizes)
    print(f"| config | gate mode | {head} | max abs err (fast vs reference) |")
    print("|---|---|" + "---|---|" * len(args.batch_sizes) + "---|")
    for name, stages in CONFIGS.items():
        for mode in args.gate_modes:
            cells, err = [], 0.0
            for b in args.batch_sizes:
                r = bench(
                    {"backbone": args.backbone, "input_size": 224, "stages": stages},
                    batch_size=b,
                    threads=args.threads,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    gate_mode=mode,
                )
                cells.append(f"{r.static_ms:.1f} / {r.dynamic_ms:.1f} | **{r.speedup:.2f}x**")
                err = max(err, r.max_abs_err)
            print(f"| {name} | {mode} | " + " | ".join(cells) + f" | {err:.1e} |", flush=True)
    print(f"load after: {_uptime()}; threads {args.threads}, repeats {args.repeats} interleaved pairs, medians")
    return 0


if __name__ == "__main__":
    sys.exit(main())
