"""A basic block's second convolution on selected input channels: column gather against row gather.

In a channel-gated ResNet-18/34 block, conv2 reads only the channels conv1 computed.  Its
weight restricted to them is a column gather of the cached [C_out * 9, C_in] matrix, and a
column gather reads the whole matrix; on CPU, ``kernels/convs.py`` (``conv_inputs``) runs the
equal transposed convolution instead, whose flipped kernels are cached by input channel, so the
selection is a row gather.  This script times whole networks (fresh weights, random gate mode,
fast path, channels-last, freed memory kept, as ``dynas calibrate`` runs them) with each way in
turn, interleaved pass by pass, and prints the medians and their ratio.

    python benchmarks/input_channel_gather.py --threads 2 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dynas.kernels import convs
from dynas.kernels.calibrate import keep_freed_memory
from dynas.kernels.model import build_model
from dynas.spaces.config import load_config

#: (backbone, stage, choice): channel-gated stages of basic blocks, the rest static
CASES = (
    ("resnet18", 3, {"paradigm": "channel", "channel_granularity": 256, "rate": 0.6}),
    ("resnet18", 3, {"paradigm": "layer+channel", "channel_granularity": 32, "rate": 0.7, "channel_rate": 0.5}),
    (
        "resnet18",
        3,
        {
            "paradigm": "spatial+channel",
            "spatial_granularity": 7,
            "channel_granularity": 32,
            "rate": 0.5,
            "channel_rate": 0.5,
        },
    ),
    ("resnet34", 3, {"paradigm": "channel", "channel_granularity": 32, "rate": 0.1}),
    (
        "resnet34",
        2,
        {
            "paradigm": "spatial+channel",
            "spatial_granularity": 2,
            "channel_granularity": 64,
            "rate": 0.5,
            "channel_rate": 0.5,
        },
    ),
    ("resnet18", 2, {"paradigm": "channel", "channel_granularity": 8, "rate": 0.4}),
    ("resnet18", 0, {"paradigm": "channel", "channel_granularity": 1, "rate": 0.5}),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args(argv)
    row_gather = convs.TRANSPOSED_CONV
    if row_gather is None:
        print("this torch build has no oneDNN transposed convolution: conv2 keeps the column gather", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(
        f"torch {torch.__version__}, {args.threads} threads, 224x224; median ms per network, column gather / row "
        f"gather, {args.repeats} interleaved passes each (ratio > 1: the row gather is faster)"
    )
    print("| backbone | stage | choice | batch | column gather ms | row gather ms | ratio |")
    print("|---|---:|---|---:|---:|---:|---:|")
    try:
        for backbone, stage, choice in CASES:
            stages = [{"paradigm": "static"}] * 4
            stages[stage] = choice
            cfg = load_config({"backbone": backbone, "input_size": 224, "stages": stages})
            for n in args.batch_sizes:
                torch.manual_seed(0)
                model = build_model(cfg).to(memory_format=torch.channels_last).eval().set_gate_mode("random")
                x = torch.randn(n, 3, 224, 224).contiguous(memory_format=torch.channels_last)
                times: dict[str, list[float]] = {"column": [], "row": []}
                with torch.inference_mode():
                    for i in range(args.warmup + args.repeats):
                        for way in times:
                            convs.TRANSPOSED_CONV = row_gather if way == "row" else None
                            torch.manual_seed(i)  # the same draws for both ways
                            t0 = time.perf_counter()
                            model(x)
                            if i >= args.warmup:
                                times[way].append((time.perf_counter() - t0) * 1e3)
                col_ms, row_ms = (statistics.median(times[w]) for w in ("column", "row"))
                print(
                    f"| {backbone} | {stage} | `{cfg.stages[stage].short()}` | {n} | {col_ms:.2f} | {row_ms:.2f} | "
                    f"{col_ms / row_ms:.2f} |",
                    flush=True,
                )
    finally:
        convs.TRANSPOSED_CONV = row_gather
    return 0


if __name__ == "__main__":
    sys.exit(main())
