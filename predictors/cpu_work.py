"""The pieces of the CPU work model (:mod:`dynas.predictors.cpu`): the accumulator of work terms
(:class:`Work`) and the work of a block body's operators as ``kernels/blocks.py`` runs them
(convolutions or row products, BN, ReLU, squeeze-excitation, the gathers of selected weights).

Every count here follows one call of the kernels' code; the comments name the operators.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from dynas.predictors.cpu_paths import folds
from dynas.predictors.cpu_terms import TERMS
from dynas.spaces.backbones import BlockSpec

__all__ = [
    "SMALL_MAP",
    "Work",
    "per_part",
    "bn_relu",
    "shortcut",
    "se_work",
    "grouped_touched",
    "basic_body",
    "pointwise_body",
    "masked_body",
]

_T = {t: i for i, t in enumerate(TERMS)}
SMALL_MAP = 64  # output positions per sample or patch at or below which a conv counts as small-map


class Work:
    """Accumulates the work terms, scaled by ``weight`` (a probability or an expected count)."""

    def __init__(self, column_block: int = 1) -> None:
        self.v = np.zeros(len(TERMS))
        self.weight = 1.0
        self.column_block = column_block
        #: counting a channel part after the first of a block (see ``COST_TERMS``): its weight
        #: gathers count as ``regather_melem`` and its convolutions as ``repeat_conv_calls``
        self.repeat = False

    def add(self, term: str, amount: float) -> None:
        self.v[_T[term]] += self.weight * amount

    def conv(
        self,
        rows: float,
        cin_pg: int,
        cout: int,
        k: int,
        cin_total: int,
        kind: str = "",
        mm: bool = False,
        hw: tuple[int, int] | None = None,
        foldable: bool = True,
    ) -> None:
        """A convolution (``mm``: a matrix product of pixel rows; ``kind="vec"``: of per-sample
        vectors): ``rows`` output positions x ``cout`` outputs, each reading ``cin_pg x k x k``
        inputs; ``cin_total`` input channels stored per position; ``hw``: output rows x columns
        per sample or patch; ``foldable``: a row product that ``row_product`` may fold (a batched
        product, ``bmm``, never is).

        A convolution kernel computes ``column_block`` output columns of a row at once, so an
        output narrower than that costs as if it were that wide: its MACs are counted x
        ``column_block / columns``.  (Measured with oneDNN on a 2-core AMD EPYC: maps one column
        wide, as 1x1 spatial patches give, ran at ~1/4 of the throughput of wide ones, two
        columns at ~1/2, four or more at nearly full rate, for 1x1, 3x3 and grouped convolutions
        alike.)  Matrix products of pixel rows have no columns; a large one (:func:`folds`)
        runs as a 1x1 convolution of the rows folded into 8 columns and is counted as one."""
        macs = rows * cout * cin_pg * k * k
        folded = mm and foldable and kind != "vec" and folds(rows, macs)  # a 1x1 conv over the rows in 8 columns
        if not mm and hw is not None and hw[1] < self.column_block:
            macs *= self.column_block / hw[1]
        area = None if hw is None else hw[0] * hw[1]
        if kind == "stem":
            term = "stem_gmac"
        elif folded:
            term = "pointwise_gmac"
        elif mm and kind == "vec":
            term = "vec_gmac"  # a product of per-sample vectors (maskers, SE, head)
        elif mm:
            term = "mm_gmac"  # a product of pixel (or window) rows
        elif area is not None and area <= SMALL_MAP:
            term = "smallmap_gmac"
        else:
            term = {"": "pointwise_gmac" if k == 1 else "conv3x3_gmac", "grouped": "grouped_gmac"}[kind]
        mm = mm and not folded
        if folded:
            # rows not a multiple of 8 or 7 are zero-padded to one of 8 first (F.pad): never when
            # each sample's or patch's area is such a multiple; an expected row count (gathered
            # pixels) is taken as a multiple of neither with probability 3/4
            whole = abs(rows - round(rows)) < 1e-9
            if area is not None and (area % 8 == 0 or area % 7 == 0):
                pad = 0.0
            else:
                pad = (0.0 if round(rows) % 8 == 0 or round(rows) % 7 == 0 else 1.0) if whole else 0.75
            self.add("gather_melem", pad * rows * cin_total * 1e-6)
            self.add("op_calls", pad)
        self.add(term, macs * 1e-9)
        wterm = "w_mm_melem" if mm else "w_pointwise_melem" if k == 1 or folded else "w_conv3x3_melem"
        self.add(wterm, cout * cin_pg * k * k * 1e-6)
        self.add("conv_io_melem", rows * (cin_total + cout) * 1e-6)
        # a product of per-sample vectors dispatches like an element-wise operator (see TERMS)
        if mm and kind == "vec":
            self.add("op_calls", 1)
        else:
            self.add("mm_calls" if mm else "repeat_conv_calls" if self.repeat else "conv_calls", 1)

    def stream(self, elems: float, calls: float = 1) -> None:
        self.add("stream_melem", elems * 1e-6)
        self.add("op_calls", calls)

    def gather(self, elems: float, calls: float = 1, weights: bool = False) -> None:
        """``elems`` elements moved by ``calls`` gathers; ``weights``: rows or columns of a
        cached weight matrix (selected channels), which a repeated part reads from cache."""
        self.add("regather_melem" if weights and self.repeat else "gather_melem", elems * 1e-6)
        self.add("op_calls", calls)

    def index(self, elems: float, rows: float, calls: float = 1) -> None:
        """``elems`` elements in ``rows`` contiguous runs copied by ``calls`` indexing copies."""
        self.add("index_melem", elems * 1e-6)
        self.add("index_mrows", rows * 1e-6)
        self.add("op_calls", calls)

    def ops(self, calls: float) -> None:
        self.add("op_calls", calls)

    def masker(self) -> None:
        self.add("masker_calls", 1)

    def result(self) -> np.ndarray:
        """The accumulated terms, read-only (the work functions are memoized and share them)."""
        self.v.setflags(write=False)
        return self.v


def per_part(w: Work, weight: float, parts: float, body: Callable[[], None]) -> None:
    """Count ``body`` (one part's work) for ``parts`` expected parts of a block, each x
    ``weight``: the first part as it is, the others as repeats (:attr:`Work.repeat`)."""
    for repeat, share in ((False, min(parts, 1.0)), (True, max(parts - 1.0, 0.0))):
        if share > 0:
            w.weight, w.repeat = weight * share, repeat
            body()
    w.repeat = False


def bn_relu(w: Work, elems: float, relu: bool = True, selected: float = 0) -> None:
    """Eval BN (+ ReLU) over ``elems`` elements; ``selected``: channels whose running statistics
    are gathered first (one gather of the cached [4, C] stack, ``eval_bn``)."""
    if selected:
        w.gather(4 * selected, weights=True)  # cached like the weights: a later part reads it from cache
    w.stream(2 * elems * (2 if relu else 1), 2 if relu else 1)


def shortcut(w: Work, b: BlockSpec, n: int) -> None:
    """The downsample shortcut (1x1 conv + BN), if any."""
    if b.has_downsample:
        w.conv(n * b.out_hw[0] * b.out_hw[1], b.in_channels, b.out_channels, 1, b.in_channels, hw=b.out_hw)
        bn_relu(w, n * b.out_channels * b.out_hw[0] * b.out_hw[1], relu=False)


def se_work(
    w: Work,
    b: BlockSpec,
    rows: float,
    samples: float,
    cw: int,
    patches: float | None,
    linear: bool,
    selected: bool = False,
) -> None:
    """Squeeze-excitation over ``rows`` positions of ``cw`` channels of ``samples`` samples
    (``patches``: gathered patches, None on whole maps; ``linear``: the dynamic path's F.linear,
    else the static module's 1x1 convs; ``selected``: a channel selection, whose SE weights are
    gathered even when it selects every channel)."""
    gathered = patches is not None
    if not b.se_channels:
        return
    if selected or cw != b.width:
        w.gather(3 * cw * b.se_channels, 3, weights=True)  # SE weights (and bias) of the selected channels
    # pool: the mean, or over gathered patches zeros, sum, index_add_ per sample, scale
    w.stream(rows * cw + samples * cw, 4 if gathered else 1)
    # the static module's 1x1 convolutions of one sample's [1, C, 1, 1] take PyTorch's native
    # path (``use_mkldnn``: batch 1, ungrouped, at most 20480 input values): a BLAS vector product
    vec = linear or samples == 1
    w.conv(samples, cw, b.se_channels, 1, cw, kind="vec" if vec else "", mm=vec, hw=(1, 1))
    w.stream(2 * samples * b.se_channels)
    w.conv(samples, b.se_channels, cw, 1, b.se_channels, kind="vec" if vec else "", mm=vec, hw=(1, 1))
    w.stream(2 * samples * cw)  # sigmoid
    if gathered:
        w.gather(patches * cw)  # each patch's sample's scale (index_select)
    w.stream(2 * rows * cw)  # scale


def grouped_touched(b: BlockSpec, G: int, active: int) -> tuple[float, bool]:
    """Expected channels of the conv groups that ``active`` of the ``b.width // G`` gate groups
    (``G`` channels each, chosen uniformly) touch, and whether the selection is always made of
    whole conv groups (no zero-filled copy needed)."""
    gw = b.width // b.groups  # channels per conv group
    if G % gw == 0 or active * G == b.width:  # whole conv groups, or every channel
        return active * G, True
    gates = b.width // G
    per_conv = max(1, math.ceil(gw / G))  # gate groups overlapping one conv group
    p_untouched = math.comb(gates - per_conv, active) / math.comb(gates, active) if gates - per_conv >= active else 0.0
    return b.groups * (1.0 - p_untouched) * gw, False


def basic_body(
    w: Work,
    b: BlockSpec,
    rows_out: float,
    k: int,
    selected: bool,
    mid_rows: float | None = None,
    out_hw: tuple[int, int] | None = None,
    mid_hw: tuple[int, int] | None = None,
) -> None:
    """A basic block's body (``DynamicBasicBlock._sparse_body``) -> ``rows_out`` output positions
    with ``k`` of the gated channels (``selected``: a channel selection); ``mid_rows``: conv1
    output positions of gathered regions (halo included), None on whole maps."""
    cin, cout = b.in_channels, b.out_channels
    mid = rows_out if mid_rows is None else mid_rows  # conv1 output positions (with halo)
    if selected:
        w.gather(k * cin * 9, weights=True)  # conv_rows: rows of the cached channels-last matrix
    w.conv(mid, cin, k, 3, cin, hw=mid_hw)
    bn_relu(w, mid * k, selected=k if selected else 0)
    if mid_rows is not None:
        w.stream(2 * mid * k)  # zero the region positions outside the map (mul_)
    if selected:
        # selected input channels: rows of the cached flipped matrix for a transposed convolution
        # (``conv_inputs``), or of 1x1 patches a column gather of the channels-last matrix
        w.gather(k * cout * 9, weights=True)
    # 1x1 patches: each window is one output pixel, one row product (``one_pixel_conv``)
    w.conv(rows_out, k, cout, 3, k, hw=out_hw, mm=out_hw == (1, 1))
    bn_relu(w, rows_out * cout, relu=False)


def pointwise_body(
    w: Work,
    b: BlockSpec,
    rows_in: float,
    rows_out: float,
    samples: float,
    k: int,
    selected: bool,
    head: str = "map",
    tail: str = "map",
    patches: float | None = None,
    windows: float = 0.0,
    touched: tuple[float, bool] | None = None,
    dynamic: bool = True,
    out_hw: tuple[int, int] | None = None,
    mid_hw: tuple[int, int] | None = None,
) -> None:
    """A 1x1 -> 3x3 -> 1x1 body (bottleneck, RegNetY) on ``rows_in`` input positions ->
    ``rows_out`` output positions of ``samples`` samples with ``k`` gated channels.

    ``head``: conv1 on whole maps (``"map"``) or on gathered pixel rows (``"rows"``);
    ``tail``: the 3x3 conv on whole maps (``"map"``), on gathered windows (``"windows"``) or as
    one product of the output pixels' window rows (``"cols"``, ``_tail_cols``); ``patches``:
    gathered patches (SE per sample over them), None on whole maps; ``windows``: positions of
    the gathered windows the 3x3 conv reads (0 on whole maps)."""
    cin, width, cout = b.in_channels, b.width, b.out_channels
    bottleneck = b.kind == "bottleneck"
    # conv1: a product of pixel rows on gathered rows, and for a bottleneck's selection on
    # whole maps too (``_head_rows``, ``_head_map``); else a 1x1 convolution
    head_mm = head == "rows" or (bottleneck and selected)
    if selected:
        w.gather(k * cin, weights=True)  # rows of conv1's matrix
    w.conv(rows_in, cin, k, 1, cin, mm=head_mm, hw=None if head_mm else mid_hw)
    bn_relu(w, rows_in * k, selected=k if selected else 0)
    if b.groups == 1:
        if selected:
            w.gather(9 * k * (width + k), 2, weights=True)  # rows, then columns, of the cached channels-last matrix
        w.conv(rows_out, k, k, 3, k, hw=out_hw, mm=tail == "cols")
    else:
        gw = width // b.groups
        t_ch, aligned = touched if (selected and touched is not None) else (width, True)
        if selected:
            # touched conv groups (divide, unique, index arithmetic), their kernels
            w.gather(t_ch * gw * 9, 6, weights=True)
            if not aligned:  # selected channels scattered into the touched groups (searchsorted,
                # zeros, index_copy_), outputs picked back
                w.gather(2 * (windows or rows_in) * t_ch + rows_out * k, 4)
        w.conv(rows_out, gw, t_ch, 3, t_ch, kind="grouped", hw=out_hw)
    bn_relu(w, rows_out * k, selected=k if selected else 0)
    se_work(w, b, rows_out, samples, k, patches, linear=dynamic, selected=selected)
    if selected:
        # selected input channels: rows of the bottleneck's cached transpose (a matrix product that
        # never folds), columns of RegNetY's matrix
        w.gather(k * cout, weights=True)
    # conv3: the static 1x1 convolution on whole maps with every channel and in RegNetY; else a
    # product of the pixel rows (``_conv3_rows``)
    rows_mm = bottleneck and (selected or tail != "map")
    w.conv(rows_out, k, cout, 1, k, mm=rows_mm, hw=out_hw, foldable=not (bottleneck and selected))
    bn_relu(w, rows_out * cout, relu=False)


def masked_body(w: Work, b: BlockSpec, n: float) -> None:
    """A bottleneck's dense body, masked (``_masked_body`` with a channel mask): ``n`` samples."""
    hi, wi = b.in_hw
    ho, wo = b.out_hw
    width = b.width
    w.conv(n * hi * wi, b.in_channels, width, 1, b.in_channels, hw=b.in_hw)
    bn_relu(w, n * hi * wi * width)
    w.stream(2 * n * hi * wi * width)  # x channel mask
    w.conv(n * ho * wo, width // b.groups, width, 3, width, kind="" if b.groups == 1 else "grouped", hw=b.out_hw)
    bn_relu(w, n * ho * wo * width)
    w.stream(2 * n * ho * wo * width)  # x channel mask
    w.conv(n * ho * wo, width, b.out_channels, 1, width, hw=b.out_hw)
    bn_relu(w, n * ho * wo * b.out_channels, relu=False)
