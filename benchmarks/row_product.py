"""Row products: the BLAS matrix product against the folded oneDNN 1x1 convolution.

The dynamic kernels multiply gathered pixel rows [M, K] by a weight [N, K] (bottleneck conv1 and
conv3 on selected channels, conv1 on the needed pixels of spatial patches, conv2 of 1x1 patches).
``kernels/convs.py`` runs a product as ``F.linear`` (the BLAS library: MKL in the PyTorch
wheels) or, from ``FOLD_MIN_ROWS`` rows and ``FOLD_MIN_MACS`` multiply-accumulates, as a
oneDNN 1x1 convolution over the rows folded into a map [1, K, M / 8, 8].  This script times
both side by side in one run, on the shapes those products take, and prints the medians and
their ratio, so the thresholds can be checked on another machine.

    python benchmarks/row_product.py --threads 2
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from conv_columns import _median_ms, timing_args  # this directory's operator benchmark helpers

from dynas.kernels import convs

#: (K, N): input and output channels of the products (ResNet-50 / RegNetY widths)
SHAPES = ((64, 64), (128, 128), (256, 64), (1024, 256), (256, 1024), (2048, 512), (512, 2048))
ROWS = (8, 25, 49, 98, 196, 392, 784, 1568, 6272)


def _folded(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernels' own row product with its thresholds lifted: always the folded convolution."""
    saved = convs.FOLD_MIN_ROWS, convs.FOLD_MIN_MACS
    convs.FOLD_MIN_ROWS = convs.FOLD_MIN_MACS = 0
    try:
        return convs.row_product(rows, w)
    finally:
        convs.FOLD_MIN_ROWS, convs.FOLD_MIN_MACS = saved


def main(argv: list[str] | None = None) -> int:
    args = timing_args(__doc__, argv)
    if not torch.backends.mkldnn.is_available():
        print("this torch build has no oneDNN: every row product is a matrix product", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    thresholds = convs.FOLD_MIN_ROWS, convs.FOLD_MIN_MACS
    print(
        f"torch {torch.__version__}, {args.threads} threads; median ms of F.linear / of the folded 1x1 convolution "
        f"(ratio > 1: folding is faster); * = kernels/convs.py folds it "
        f"(M >= {convs.FOLD_MIN_ROWS} and M*K*N >= {convs.FOLD_MIN_MACS:,})"
    )
    print("| K -> N | " + " | ".join(f"M={m}" for m in ROWS) + " |")
    print("|---|" + "---:|" * len(ROWS))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for k, n in SHAPES:
            w = torch.randn(n, k, generator=gen)
            cells = []
            for m in ROWS:
                rows = torch.randn(m, k, generator=gen)
                mm_ms = _median_ms(lambda: F.linear(rows, w), args.repeats, args.warmup)
                fold_ms = _median_ms(lambda: _folded(rows, w), args.repeats, args.warmup)
                star = "*" if m >= thresholds[0] and m * k * n >= thresholds[1] else ""
                cells.append(f"{mm_ms:.3f}/{fold_ms:.3f} {mm_ms / fold_ms:.2f}x{star}")
            print(f"| {k} -> {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
