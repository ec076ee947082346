"""Convolution throughput by output width: the evidence for the CPU model's column block.

Times ``F.conv2d`` on batches of small channels-last maps with the same number of output
positions (so the same MACs) and 1 ... 16 output columns, for a dense 3x3, a grouped 3x3 and a
1x1 convolution, and prints the median GMAC/s of each and its ratio to the widest map.
Spatial patches of side S give maps S columns wide (``kernels/blocks.py``), so this is what a
1x1 or 2x2 patch costs per MAC next to a whole map.

    python benchmarks/conv_columns.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

WIDTHS = (1, 2, 3, 4, 6, 8, 16)
#: (name, kernel side, channels, groups)
CONVS = (("3x3 dense", 3, 128, 1), ("3x3 grouped (16 ch/group)", 3, 256, 16), ("1x1", 1, 256, 1))
POSITIONS = 6272  # output positions per call: 2 x 56 x 56


def _median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timing_args(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """--threads, --repeats, --warmup of an operator benchmark (this one and ``row_product.py``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = timing_args(__doc__, argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads; median GMAC/s of F.conv2d on channels-last maps one row "
        f"high, {POSITIONS} output positions per call (ratio to {WIDTHS[-1]} columns)"
    )
    print("| convolution | " + " | ".join(f"{w} col" for w in WIDTHS) + " |")
    print("|---|" + "---:|" * len(WIDTHS))
    with torch.inference_mode():
        for name, k, c, groups in CONVS:
            weight = torch.randn(c, c // groups, k, k).contiguous(memory_format=torch.channels_last)
            rates = []
            for w in WIDTHS:
                maps = POSITIONS // w
                # [maps, 1 + k - 1, w + k - 1, C] -> [maps, C, k, w + k - 1] with channels-last strides
                x = torch.randn(maps, k, w + k - 1, c).permute(0, 3, 1, 2)
                ms = _median_ms(lambda: F.conv2d(x, weight, groups=groups), args.repeats, args.warmup)
                rates.append(maps * w * c * (c // groups) * k * k / ms / 1e6)
            cells = [f"{r:.0f} ({r / rates[-1]:.2f})" for r in rates]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
