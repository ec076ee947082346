"""The CPU kernels' path choices that the CPU work model (:mod:`dynas.predictors.cpu`) mirrors.

``dynas.kernels`` picks between ways of running one product or one block from a few fixed
thresholds; the work model must take the same path to count the right operators, so the
thresholds live here, in the lower layer, and the kernels import them (``tests/test_layout.py``:
predictors never import kernels).  Each is a plain number or a pure function of a block's
shape; the kernels read their own module's name at call time, so tests can still force a path
by patching it there.
"""

from __future__ import annotations

from dynas.spaces.backbones import BlockSpec

__all__ = [
    "FOLD_MIN_ROWS",
    "FOLD_MIN_MACS",
    "folds",
    "DENSE_HEAD_MIN_FRACTION",
    "ROWS_MAX_PATCH_PIXELS",
    "GATHER_MACS_PER_WEIGHT",
    "batching_pays",
]

#: a row product (``row_product`` in ``kernels/convs.py``) runs as a oneDNN 1x1 convolution of
#: the rows folded into 8 (or 7) columns from this many rows and this many multiply-accumulates.
#: ``benchmarks/row_product.py`` on the 2-core AMD EPYC host (AVX2) of Dec 7: under ~1,600 rows
#: the BLAS product ran 1.0-2x faster than the folded convolution, from 6,272 rows the two were
#: within +/-30 % either way (on the host of Dec 2 folding ran 2x faster from 64 rows)
FOLD_MIN_ROWS, FOLD_MIN_MACS = 4096, 8_000_000
#: conv1 of a 1x1-conv1 block runs on the whole maps instead of gathered pixel rows when the
#: active patches' windows are expected to need at least this fraction of its output pixels
#: (``kernels/spatial.py``)
DENSE_HEAD_MIN_FRACTION = 0.65
#: patches of at most this many output pixels run a bottleneck's 3x3 conv as one matrix product
#: of the active output pixels' windows instead of a convolution per window (``kernels/spatial.py``)
ROWS_MAX_PATCH_PIXELS = 1
#: batches whose samples select different channels run each sample with its own gathered weights
#: when the multiply-accumulates a sample skips are at least this many times the weight elements
#: it gathers, else as the dense convolutions, masked (``DynamicBottleneck._batched_body``).
#: At batch 8, channel rate 0.5, G=2, ResNet-50: the gathered pass ran at 0.64-0.79 of the static
#: block's time on 56x56 to 14x14 maps (ratio 340-1900) and 1.5-1.7 on 7x7 (ratio 84-120), where
#: the masked dense pass ran at 1.01-1.05
GATHER_MACS_PER_WEIGHT = 160


def folds(rows: float, macs: float) -> bool:
    """Whether a row product of ``rows`` rows and ``macs`` multiply-accumulates runs folded."""
    return rows >= FOLD_MIN_ROWS and macs >= FOLD_MIN_MACS


def batching_pays(b: BlockSpec, k: int, macs_per_weight: float = GATHER_MACS_PER_WEIGHT, taps: int = 9) -> bool:
    """Whether the multiply-accumulates one sample of bottleneck ``b`` skips with ``k`` of its
    ``b.width`` channels selected pay for gathering its own weights (``macs_per_weight`` each;
    ``taps``: kernel positions of the 3x3 conv)."""
    (hi, wi), (ho, wo) = b.in_hw, b.out_hw
    w = b.width
    saved = hi * wi * b.in_channels * (w - k) + ho * wo * (taps * (w * w - k * k) + b.out_channels * (w - k))
    return saved >= macs_per_weight * k * (b.in_channels + taps * k + b.out_channels)
