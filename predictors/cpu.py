"""Latency model of dynas's own kernels on a measured device (target kind ``"cpu"``).

The GPU model (``gpu.py``) simulates tiles on SMs from a spec sheet.  A CPU runs each operator
on a few threads through caches, and what costs time there is what ``dynas.kernels`` actually
does: dense convolutions, products of gathered pixel rows, gathers and scatters of rows, and a
fixed cost per dispatched operator.  So this model walks the fast path of
``kernels/blocks.py`` operator by operator and counts *work*, in the terms of
:data:`~dynas.predictors.cpu_terms.COST_TERMS` (multiply-accumulates of each kind of
convolution or product, elements moved by each kind of copy, calls of each kind of operator;
one row per term, with what it counts).  A target gives one cost per unit of each term
(``ms_per_gmac``, ``ms_per_melem``, ``ms_per_mrow``, ``us_per_call``), fitted to measurements
by ``dynas calibrate`` (:mod:`dynas.predictors.calibration`).  Latency = the sum of work x
cost: linear in the costs, so the fit is a non-negative least-squares problem and each fitted
cost stays a physical quantity (an effective throughput, a bandwidth, an overhead).

Decisions are those of the ``random`` gate mode: exact budget counts, chosen uniformly and
independently per sample.  Work that depends on the choice is taken as an exact expectation:

* layer gates (and spatial gates whose one patch is the whole map): a sample runs ``k`` of the
  stage's ``D`` blocks (:func:`dynas.spaces.config.stage_runs`), so each block runs each sample
  with probability ``k / D``; the number of samples a block runs is binomial, and the gather
  path (some but not all samples) is weighted by its probability;
* channel gates: samples are grouped by identical selections; the expected number of distinct
  selections among ``m`` samples drawn from ``M = C(G, k)`` equally likely ones is
  ``M (1 - (1 - 1/M)^m)``;
* spatial gates on 1x1-conv1 blocks: conv1 runs once per *needed* pixel; a pixel covered by the
  3x3 windows of ``c`` of the ``P`` patches is needed unless all ``c`` are off:
  probability ``1 - C(P - c, k) / C(P, k)``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from dynas.predictors.cpu_terms import (
    CALL_TERMS,
    COMPUTE_TERMS,
    COST_FIELDS,
    COST_TERMS,
    LATER_PART_FIELDS,
    MEMORY_TERMS,
    TERM_KINDS,
    TERMS,
    CpuCosts,
)
from dynas.spaces.backbones import BlockSpec, StemSpec
from dynas.spaces.config import StageConfig, budget_count, uses_channel, uses_layer, uses_spatial

__all__ = [
    "COST_TERMS",
    "TERMS",
    "COST_FIELDS",
    "LATER_PART_FIELDS",
    "COLUMN_BLOCKS",
    "COMPUTE_TERMS",
    "MEMORY_TERMS",
    "CALL_TERMS",
    "TERM_KINDS",
    "CpuCosts",
    "block_work",
    "stage_entry_work",
    "stem_work",
    "head_work",
    "exit_head_work",
    "expected_block_flops",
    "work_latency_ms",
]

_T = {t: i for i, t in enumerate(TERMS)}
_SMALL_MAP = 64  # output positions per sample or patch at or below which a conv counts as small-map
#: candidate widths (output columns a convolution kernel computes at once, see ``_Work.conv``)
#: among which ``dynas calibrate`` picks the one that fits its measurements best; 1 = no effect
COLUMN_BLOCKS: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
#: a row product (``mm``) of at least this many rows and multiply-accumulates runs as a 1x1
#: convolution of the rows folded into 8 columns (``row_product`` in ``kernels/convs.py``,
#: whose constants these mirror; a test checks that they agree)
FOLD_MIN_ROWS, FOLD_MIN_MACS = 64, 8_000_000


def folds(rows: float, macs: float) -> bool:
    """Whether a row product of ``rows`` rows and ``macs`` multiply-accumulates runs folded."""
    return rows >= FOLD_MIN_ROWS and macs >= FOLD_MIN_MACS


class _Work:
    """Accumulates the work terms, scaled by ``weight`` (a probability or an expected count)."""

    def __init__(self, column_block: int = 1) -> None:
        self.v = np.zeros(len(TERMS))
        self.weight = 1.0
        self.column_block = column_block
        #: counting a channel part after the first of a block (see :data:`COST_TERMS`): its weight
        #: gathers count as ``regather_melem`` and its convolutions as ``repeat_conv_calls``
        self.repeat = False

    def _add(self, term: str, amount: float) -> None:
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
    ) -> None:
        """A convolution (``mm``: a matrix product of pixel rows; ``kind="vec"``: of per-sample
        vectors): ``rows`` output positions x
        ``cout`` outputs, each reading ``cin_pg x k x k`` inputs; ``cin_total`` input channels
        stored per position; ``hw``: output rows x columns per sample or patch.

        A convolution kernel computes ``column_block`` output columns of a row at once, so an
        output narrower than that costs as if it were that wide: its MACs are counted x
        ``column_block / columns``.  (Measured with oneDNN on a 2-core AMD EPYC: maps one column
        wide, as 1x1 spatial patches give, ran at ~1/4 of the throughput of wide ones, two
        columns at ~1/2, four or more at nearly full rate, for 1x1, 3x3 and grouped convolutions
        alike.)  Matrix products of pixel rows have no columns; a large one (:func:`folds`)
        runs as a 1x1 convolution of the rows folded into 8 columns and is counted as one."""
        macs = rows * cout * cin_pg * k * k
        folded = mm and folds(rows, macs)  # a 1x1 convolution over the rows folded into 8 columns
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
        elif area is not None and area <= _SMALL_MAP:
            term = "smallmap_gmac"
        else:
            term = {"": "pointwise_gmac" if k == 1 else "conv3x3_gmac", "grouped": "grouped_gmac"}[kind]
        mm = mm and not folded
        if folded:
            # rows not a multiple of 8 or 7 are zero-padded to one of 8 first: never when each
            # sample's or patch's area is such a multiple; an expected row count (gathered
            # pixels) is taken as a multiple of neither with probability 3/4
            whole = abs(rows - round(rows)) < 1e-9
            if area is not None and (area % 8 == 0 or area % 7 == 0):
                pad = 0.0
            else:
                pad = (0.0 if round(rows) % 8 == 0 or round(rows) % 7 == 0 else 1.0) if whole else 0.75
            self._add("gather_melem", pad * rows * cin_total * 1e-6)
            self._add("op_calls", pad)
        self._add(term, macs * 1e-9)
        wterm = "w_mm_melem" if mm else "w_pointwise_melem" if k == 1 or folded else "w_conv3x3_melem"
        self._add(wterm, cout * cin_pg * k * k * 1e-6)
        self._add("conv_io_melem", rows * (cin_total + cout) * 1e-6)
        # a product of per-sample vectors dispatches like an element-wise operator (see TERMS)
        self._add(
            "op_calls"
            if mm and kind == "vec"
            else "mm_calls"
            if mm
            else "repeat_conv_calls"
            if self.repeat
            else "conv_calls",
            1,
        )

    def stream(self, elems: float, calls: float = 1) -> None:
        self._add("stream_melem", elems * 1e-6)
        self._add("op_calls", calls)

    def gather(self, elems: float, calls: float = 1, weights: bool = False) -> None:
        """``elems`` elements moved by ``calls`` gathers; ``weights``: rows or columns of a
        cached weight matrix (selected channels), which a repeated part reads from cache."""
        self._add("regather_melem" if weights and self.repeat else "gather_melem", elems * 1e-6)
        self._add("op_calls", calls)

    def index(self, elems: float, rows: float, calls: float = 1) -> None:
        self._add("index_melem", elems * 1e-6)
        self._add("index_mrows", rows * 1e-6)
        self._add("op_calls", calls)

    def ops(self, calls: float) -> None:
        self._add("op_calls", calls)

    def masker(self) -> None:
        self._add("masker_calls", 1)

    def result(self) -> np.ndarray:
        """The accumulated terms, read-only (the work functions are memoized and share them)."""
        self.v.setflags(write=False)
        return self.v


#: operators that split a batch by channel selection (``DynamicBlock._channel_parts``): once
#: (index_select, compare, unique, arange), then per distinct selection its samples (compare,
#: index) and its channels (nonzero, multiply, add)
_SELECTION_OPS, _PART_SELECTION_OPS = 4, 5
#: operators a masker dispatches after its logits in the random gate mode (``kernels/maskers.py``):
#: score difference and random scores, then a per-sample top-k (top-k, zeros, scatter) or the
#: stage quota of one-decision gates (full, multiply, compare, two casts, subtract)
_TOPK_OPS, _QUOTA_OPS = 2 + 3, 2 + 6


def _mlp_masker(w: _Work, b: BlockSpec, n: int, decisions: int) -> None:
    w.masker()
    hidden = max(16, b.in_channels // 16)
    w.stream(n * b.in_channels * (b.in_hw[0] * b.in_hw[1] + 1))  # global mean
    w.conv(n, b.in_channels, hidden, 1, b.in_channels, kind="vec", mm=True)  # fc1
    w.stream(2 * n * hidden)  # relu
    w.conv(n, hidden, 2 * decisions, 1, hidden, kind="vec", mm=True)  # fc2
    w.ops(_QUOTA_OPS if decisions == 1 else _TOPK_OPS)


def _spatial_masker(w: _Work, b: BlockSpec, n: int, S: int) -> None:
    w.masker()
    gh, gw = b.out_hw[0] // S, b.out_hw[1] // S  # the patch grid
    w.stream(n * b.in_channels * (b.in_hw[0] * b.in_hw[1] + gh * gw))  # adaptive pool to the grid
    w.conv(n * gh * gw, b.in_channels, 2, 1, b.in_channels, hw=(gh, gw))
    w.ops(_QUOTA_OPS if gh * gw == 1 else _TOPK_OPS)


def _bn_relu(w: _Work, elems: float, relu: bool = True, selected: bool = False) -> None:
    w.stream(2 * elems * (2 if relu else 1), 2 if relu else 1)
    if selected:
        w.gather(0, 4)  # the selected running statistics


def _shortcut(w: _Work, b: BlockSpec, n: int) -> None:
    if b.has_downsample:
        w.conv(n * b.out_hw[0] * b.out_hw[1], b.in_channels, b.out_channels, 1, b.in_channels, hw=b.out_hw)
        _bn_relu(w, n * b.out_channels * b.out_hw[0] * b.out_hw[1], relu=False)


def _se(w: _Work, b: BlockSpec, rows: float, samples: float, cw: int, gathered: bool, linear: bool) -> None:
    """Squeeze-excitation over ``rows`` positions of ``cw`` channels of ``samples`` samples
    (``linear``: the dynamic path's F.linear, else the static module's 1x1 convs)."""
    if not b.se_channels:
        return
    # pool: the module's mean, or over gathered patches zeros, sum, index_add per sample, scale
    w.stream(rows * cw + samples * cw, 4 if gathered else 1)
    # the static module's 1x1 convolutions of one sample's [1, C, 1, 1] take PyTorch's native
    # path (``use_mkldnn``: batch 1, ungrouped, at most 20480 input values): a BLAS vector product
    vec = linear or samples == 1
    w.conv(samples, cw, b.se_channels, 1, cw, kind="vec" if vec else "", mm=vec, hw=(1, 1))
    w.stream(2 * samples * b.se_channels)
    w.conv(samples, b.se_channels, cw, 1, b.se_channels, kind="vec" if vec else "", mm=vec, hw=(1, 1))
    w.stream(2 * samples * cw)  # sigmoid
    if gathered:
        w.gather(samples * cw)  # each patch's sample's scale
    w.stream(2 * rows * cw)  # scale
    if cw != b.width:
        w.gather(3 * cw * b.se_channels, 3, weights=True)  # SE weights of the selected channels


def _grouped_touched(b: BlockSpec, G: int, active: int) -> tuple[float, bool]:
    """Expected channels of the conv groups that ``active`` of the ``b.width // G`` gate groups
    (``G`` channels each, chosen uniformly) touch, and whether the selection is always made of
    whole conv groups (no zero-filled copy needed)."""
    gw = b.width // b.groups  # channels per conv group
    if G % gw == 0:
        return active * G, True
    gates = b.width // G
    per_conv = max(1, math.ceil(gw / G))  # gate groups overlapping one conv group
    p_untouched = math.comb(gates - per_conv, active) / math.comb(gates, active) if gates - per_conv >= active else 0.0
    return b.groups * (1.0 - p_untouched) * gw, False


def _body(
    w: _Work,
    b: BlockSpec,
    rows_in: float,
    rows_out: float,
    samples: float,
    k: int,
    selected: bool,
    mid_rows: float | None = None,
    windows: float = 0.0,
    gathered_se: bool = False,
    touched: tuple[float, bool] | None = None,
    dynamic: bool = True,
    out_hw: tuple[int, int] | None = None,
    mid_hw: tuple[int, int] | None = None,
) -> None:
    """A block body (conv chain, BN, ReLU, SE) on ``rows_in`` input positions -> ``rows_out``
    output positions with ``k`` of the gated channels (``selected``: a channel selection, with
    its weight gathers).  ``mid_rows`` / ``windows``: spatial gathering (see callers)."""
    cin, width, cout = b.in_channels, b.width, b.out_channels
    if b.kind == "basic":
        mid = rows_out if mid_rows is None else mid_rows  # conv1 output positions (with halo)
        if selected:
            w.gather(k * cin * 9, weights=True)
        w.conv(mid, cin, k, 3, cin, hw=mid_hw)
        _bn_relu(w, mid * k, selected=selected)
        if mid_rows is not None:
            w.stream(2 * mid * k)  # zero the padding positions of every region
        if selected:
            # selected input channels: rows of the cached flipped matrix, for a transposed convolution
            # (``conv_inputs`` in kernels/convs.py; a column gather would read the whole matrix)
            w.gather(k * cout * 9, weights=True)
        # 1x1 patches: each window is one output pixel, one matrix product (``one_pixel_conv`` in kernels/convs.py)
        w.conv(rows_out, k, cout, 3, k, hw=out_hw, mm=out_hw == (1, 1))
        _bn_relu(w, rows_out * cout, relu=False)
        return
    # 1x1 -> 3x3 -> 1x1 (bottleneck, RegNetY)
    rows_mm = b.kind == "bottleneck" and (selected or windows > 0)  # pixel-row products (else F.conv2d)
    if selected:
        w.gather(k * cin, weights=True)
    w.conv(rows_in, cin, k, 1, cin, mm=rows_mm or windows > 0, hw=mid_hw)
    _bn_relu(w, rows_in * k, selected=selected)
    if windows:
        w.index(windows * k, windows)  # the strided windows of the zero-padded buffer, copied for the conv
    if b.groups == 1:
        one_pixel = out_hw == (1, 1)  # 1x1 patches: one matrix product of window rows
        if selected and one_pixel:
            w.gather(9 * k * (width + k), 2, weights=True)  # rows, then columns, of the cached channels-last matrix
        elif selected:
            w.gather(
                2 * k * k * 9, 4, weights=True
            )  # the k x k kernels (index arithmetic, gather), then their channels-last copy
        w.conv(rows_out, k, k, 3, k, hw=out_hw, mm=one_pixel)
    else:
        gw = width // b.groups
        t_ch, aligned = touched if (selected and touched is not None) else (width, True)
        if selected:
            w.gather(
                t_ch * gw * 9, 6, weights=True
            )  # touched conv groups (divide, unique, index arithmetic), their kernels
            if not aligned:  # selected channels scattered into the touched groups, outputs picked back
                w.gather(2 * (windows if windows else rows_in) * t_ch + rows_out * k, 4)
        w.conv(rows_out, gw, t_ch, 3, t_ch, kind="grouped", hw=out_hw)
    _bn_relu(w, rows_out * k, selected=selected)
    _se(w, b, rows_out, samples, k, gathered_se, linear=dynamic)
    if selected:
        if b.kind == "bottleneck":
            w.gather(k * cout, weights=True)  # rows of the cached transpose
            if rows_mm and folds(rows_out, rows_out * k * cout):
                w.gather(k * cout, weights=True)  # ... copied back to [C_out, k] for the folded convolution
        else:
            w.gather(k * cout, weights=True)  # selected input channels: columns of the cached channels-last matrix
    w.conv(rows_out, k, cout, 1, k, mm=rows_mm, hw=out_hw)
    _bn_relu(w, rows_out * cout, relu=False)


def _per_part(w: _Work, weight: float, parts: float, body: Callable[[], None]) -> None:
    """Count ``body`` (one part's work) for ``parts`` expected parts of a block, each x
    ``weight``: the first part as it is, the others as repeats (:attr:`_Work.repeat`)."""
    for repeat, share in ((False, min(parts, 1.0)), (True, max(parts - 1.0, 0.0))):
        if share > 0:
            w.weight, w.repeat = weight * share, repeat
            body()
    w.repeat = False


def _binomial(n: int, p: float) -> np.ndarray:
    m = np.arange(n + 1)
    return np.array([math.comb(n, i) for i in m], dtype=np.float64) * p**m * (1 - p) ** (n - m)


def _distinct(m: float, M: int) -> float:
    """Expected distinct values among ``m`` uniform draws from ``M``."""
    if M <= 1 or m <= 1:
        return min(m, 1.0) if M >= 1 else 0.0
    if M > 1e12:  # collisions are negligible (and 1 / M would lose precision)
        return float(m)
    return -M * math.expm1(m * math.log1p(-1.0 / M))


def _covered(b: BlockSpec, S: int, k: int) -> float:
    """Expected needed conv1-output pixels of one sample when ``k`` of its patches are on (1x1-conv1 blocks)."""
    s = b.stride
    L = (S - 1) * s + 3  # 3x3 window length on conv1's output
    counts = []
    for size_mid, size_out in ((b.in_hw[0], b.out_hw[0]), (b.in_hw[1], b.out_hw[1])):
        c = np.zeros(size_mid)
        for i in range(size_out // S):
            lo = i * S * s - 1
            c[max(lo, 0) : min(lo + L, size_mid)] += 1
        counts.append(c)
    cov = np.outer(counts[0], counts[1]).astype(np.int64).ravel()  # [H_mid * W_mid] windows covering each pixel
    P = (b.out_hw[0] // S) * (b.out_hw[1] // S)
    total = math.comb(P, k)
    off = {c: math.comb(P - c, k) / total for c in np.unique(cov)}
    return float(sum(1.0 - off[c] for c in cov))


def _whole_sample_work(
    w: _Work,
    b: BlockSpec,
    n: int,
    run_prob: float | None,
    groups: int,
    M: int,
    k: int,
    touched: tuple[float, bool] | None,
    areas: dict[str, tuple[int, int]],
) -> None:
    """Work of a block whose gates pick whole samples (layer gates, one-patch spatial gates; each
    sample runs with probability ``run_prob``, None: every sample runs) and channels (``groups``
    gate groups, ``M`` equally likely selections of ``k`` channels), beyond maskers and shortcut."""
    ho, wo = b.out_hw
    hi, wi = b.in_hw
    out_elems = n * b.out_channels * ho * wo
    dist = _binomial(n, run_prob) if run_prob is not None else np.eye(n + 1)[n]  # P(m samples run)
    p_no_split = 0.0  # probability of the whole-batch path (no ReLU(shortcut) pass of its own)
    for m, pm in enumerate(dist):
        if pm < 1e-12 or m == 0:
            continue
        w.weight = pm
        parts = _distinct(m, M) if groups else 1.0
        if groups:
            w.ops(_SELECTION_OPS)  # the running samples' selections
            w.weight = pm * parts
            w.ops(_PART_SELECTION_OPS)
        # every sample runs with one selection: the whole batch, no gather (P = M^-(n-1))
        p_whole = (1.0 if not groups or n == 1 else float(M) ** -(n - 1) if M < 1e12 else 0.0) if m == n else 0.0
        if p_whole > 0:
            p_no_split += pm * p_whole
            w.weight = pm * p_whole
            _body(w, b, n * hi * wi, n * ho * wo, n, k, bool(groups), touched=touched, **areas)
            w.stream(5 * out_elems, 2)  # add_, relu_
        if p_whole >= 1.0:
            continue
        pm *= 1.0 - p_whole
        if groups and m == n:
            parts = (parts - p_whole) / (1.0 - p_whole)  # distinct selections, given not all equal
        # gather path: every part gathers its samples and writes them back
        _per_part(
            w,
            pm,
            parts,
            lambda: _body(
                w, b, (m / parts) * hi * wi, (m / parts) * ho * wo, m / parts, k, bool(groups), touched=touched, **areas
            ),
        )
        w.weight = pm
        w.gather(
            m * (b.in_channels * hi * wi + 2 * b.out_channels * ho * wo), 3 * parts
        )  # samples, shortcut rows, write-back
        w.stream(5 * m * b.out_channels * ho * wo, 2 * parts)
    w.weight = 1.0 - p_no_split
    w.stream(2 * out_elems)  # ReLU(shortcut) of the samples that skip


def _patch_work(
    w: _Work,
    b: BlockSpec,
    st: StageConfig,
    n: int,
    S: int,
    grid: int,
    groups: int,
    M: int,
    k: int,
    touched: tuple[float, bool] | None,
) -> None:
    """Work of a block whose spatial gates pick ``S`` x ``S`` patches of a ``grid``-patch map
    (channels as in :func:`_whole_sample_work`), beyond maskers and shortcut."""
    ho, wo = b.out_hw
    hi, wi = b.in_hw
    out_elems = n * b.out_channels * ho * wo
    # spatial: every sample runs `kp` of its `grid` patches; parts = distinct channel selections
    kp = budget_count(st.spatial_rate, grid)
    parts = _distinct(n, M) if groups else 1.0
    P = n * kp  # patches in the batch
    rows_out = P * S * S
    if groups:
        w.ops(_SELECTION_OPS)  # the samples' selections
    # per part (distinct channel selection): its samples and channels, its active patches
    # (index_select, compare, nonzero), their samples and the flat output pixel of each of their
    # positions (index arithmetic)
    w.weight = parts
    w.ops((_PART_SELECTION_OPS if groups else 0) + 3 + 1 + 7)
    if b.kind == "basic":
        region = (S - 1) * b.stride + 3 + 2 * b.stride  # input region side, halo of both convs
        mid = S + 2
        w.weight = 1.0
        w.gather(
            n * b.in_channels * (hi + 2 * b.stride + 2) * (wi + 2 * b.stride + 2)
        )  # F.pad of the whole input, once
        w.index(
            P * region * region * b.in_channels, P * region * region, parts
        )  # the regions: one indexing copy per part
        w.weight = parts
        w.ops(23)  # region rows / columns, their samples, the valid-position mask (index arithmetic)
        _per_part(
            w,
            1.0,
            parts,
            lambda: _body(
                w,
                b,
                P / parts * region * region,
                rows_out / parts,
                n / parts,
                k,
                bool(groups),
                mid_rows=P / parts * mid * mid,
                gathered_se=True,
                touched=touched,
                out_hw=(S, S),
                mid_hw=(mid, mid),
            ),
        )
    else:
        need = n * _covered(b, S, kp)  # needed conv1-output pixels
        L = (S - 1) * b.stride + 3
        ax = [max(1 + hi, (ho // S - 1) * S * b.stride + L), max(1 + wi, (wo // S - 1) * S * b.stride + L)]
        w.weight = 1.0
        # need map: zeros, window pixels of the active patches (index arithmetic), index fill,
        # nonzero, row / column of each needed pixel
        w.gather(n * (hi * wi + 1) + P * L * L, 10 * parts)
        w.gather(need * b.in_channels, parts)  # needed input pixel rows
        w.gather(n * ax[0] * ax[1] * k + need * k, 2 * parts)  # zeroed buffer + write-back of conv1 rows
        w.weight = parts
        w.ops(3 + 6)  # index arithmetic of the pixel rows and of their buffer positions
        _per_part(
            w,
            1.0,
            parts,
            lambda: _body(
                w,
                b,
                need / parts,
                rows_out / parts,
                n / parts,
                k,
                bool(groups),
                windows=P / parts * L * L,
                gathered_se=True,
                touched=touched,
                out_hw=(S, S),
            ),
        )
    w.weight = 1.0
    w.gather(2 * rows_out * b.out_channels, 2 * parts)  # shortcut rows, write-back
    w.stream(5 * rows_out * b.out_channels, 2 * parts)  # add_, relu_
    w.stream(2 * out_elems)  # ReLU(shortcut) everywhere


@functools.lru_cache(maxsize=None)
def block_work(b: BlockSpec, st: StageConfig, n: int, run_prob: float = 1.0, column_block: int = 1) -> np.ndarray:
    """[len(TERMS)] expected work of one block of ``n`` samples under ``st``.

    ``run_prob``: probability that a sample runs the block (layer gates and whole-map spatial
    gates; see the module docstring); 1 otherwise.  ``column_block``: the target's (see
    ``_Work.conv``).
    """
    w = _Work(column_block)
    p = st.paradigm
    ho, wo = b.out_hw
    hi, wi = b.in_hw
    out_elems = n * b.out_channels * ho * wo
    areas = {"out_hw": (ho, wo), "mid_hw": (ho, wo) if b.kind == "basic" else (hi, wi)}  # whole maps
    if p == "static":
        _shortcut(w, b, n)
        _body(w, b, n * hi * wi, n * ho * wo, n, b.width, False, dynamic=False, **areas)
        w.stream(3 * out_elems + 2 * out_elems, 2)  # add, relu
        return w.result()
    S = st.spatial_granularity if uses_spatial(p) else None
    grid = (ho // S) * (wo // S) if S else 0
    groups = b.width // st.channel_granularity if uses_channel(p) else 0
    active = budget_count(st.channel_density, groups) if groups else 0
    k = active * st.channel_granularity if groups else b.width
    touched = _grouped_touched(b, st.channel_granularity, active) if groups and b.groups > 1 else None
    # maskers
    if S:
        _spatial_masker(w, b, n, S)
    if groups:
        _mlp_masker(w, b, n, groups)
    if uses_layer(p):
        _mlp_masker(w, b, n, 1)
    # sample indices: arange (layer gates: compare, nonzero; a one-patch spatial gate: index_select, compare, index)
    w.ops(1 + (2 if uses_layer(p) else 0) + (3 if S and grid == 1 else 0))
    _shortcut(w, b, n)
    per_sample_gate = uses_layer(p) or grid == 1
    spatial = bool(S) and grid > 1
    M = math.comb(groups, active) if groups else 1
    if not spatial:
        _whole_sample_work(w, b, n, run_prob if per_sample_gate else None, groups, M, k, touched, areas)
    else:
        _patch_work(w, b, st, n, S, grid, groups, M, k, touched)
    return w.result()


@functools.lru_cache(maxsize=None)
def stage_entry_work(st: StageConfig) -> np.ndarray:
    """[len(TERMS)] work of a stage beyond its blocks' (:func:`block_work`): one
    ``dynamic_stages`` for a stage with gates (the cold start of its first gated block), none
    for a static one."""
    w = _Work()
    if st.paradigm != "static":
        w._add("dynamic_stages", 1)
    return w.result()


@functools.lru_cache(maxsize=None)
def stem_work(stem: StemSpec, in_hw: tuple[int, int], n: int) -> np.ndarray:
    w = _Work()
    ch, cw = stem.conv_out_hw
    w.conv(n * ch * cw, stem.in_channels, stem.out_channels, stem.kernel, stem.in_channels, kind="stem")
    _bn_relu(w, n * stem.out_channels * ch * cw)
    if stem.maxpool:
        w.stream(n * stem.out_channels * (ch * cw + stem.out_hw[0] * stem.out_hw[1]))
    return w.result()


@functools.lru_cache(maxsize=None)
def head_work(head_in: int, head_hw: tuple[int, int], classes: int, n: int) -> np.ndarray:
    w = _Work()
    w.stream(n * head_in * (head_hw[0] * head_hw[1] + 1), 2)  # global pool, flatten
    w.conv(n, head_in, classes, 1, head_in, kind="vec", mm=True)
    return w.result()


@functools.lru_cache(maxsize=None)
def exit_head_work(cin: int, head_hw: tuple[int, int], classes: int, n: int, width: int = 0) -> np.ndarray:
    """An exit head: :func:`head_work`, after a 1x1 conv + BN + ReLU to ``width`` channels if > 0."""
    w, rows = _Work(), n * head_hw[0] * head_hw[1]
    if width:
        w.conv(rows, cin, width, 1, cin, hw=head_hw)
        _bn_relu(w, rows * width)
    return w.v + head_work(width or cin, head_hw, classes, n)


def expected_block_flops(b: BlockSpec, st: StageConfig, dense: dict[str, float], run_prob: float = 1.0) -> float:
    """Executed FLOPs per image of one block, as ``DynamicBlock.last_flops`` counts them (halo
    not counted): maskers + downsample + l x (conv1 a d + conv2 a d d_in + conv3 a d + se d),
    with ``dense`` the block's dense FLOPs per op (``FlopTable.block_flops``)."""
    p = st.paradigm
    get = lambda op: float(dense.get(op, 0.0))  # noqa: E731
    if p == "static":
        return sum(float(v) for v in dense.values())
    ho, wo = b.out_hw
    a = d = 1.0
    masker = 0.0
    hidden = max(16, b.in_channels // 16)
    if uses_spatial(p):
        grid = (ho // st.spatial_granularity) * (wo // st.spatial_granularity)
        masker += 2.0 * b.in_channels * 2 * grid
        if grid > 1:
            a = budget_count(st.spatial_rate, grid) / grid
    if uses_channel(p):
        groups = b.width // st.channel_granularity
        d = budget_count(st.channel_density, groups) / groups
        masker += 2.0 * (b.in_channels * hidden + hidden * 2 * groups)
    if uses_layer(p):
        masker += 2.0 * (b.in_channels * hidden + hidden * 2)
    d_in = d if (b.kind == "bottleneck" and b.groups == 1) else 1.0
    body = get("conv1") * a * d + get("conv2") * a * d * d_in + get("conv3") * a * d + get("se") * d
    return masker + get("downsample") + run_prob * body


def work_latency_ms(work: np.ndarray, costs: CpuCosts) -> float:
    return float(work @ costs.vector_ms())
