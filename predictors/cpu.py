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
  probability ``1 - C(P - c, k) / C(P, k)``;
* choices the kernels make from a block's shape follow their thresholds
  (:mod:`dynas.predictors.cpu_paths`, which the kernels import): conv1 on whole maps or on
  gathered rows by expected coverage, products folded into convolutions or not, a bottleneck's
  differing selections batched or run dense and masked.

The pieces: :mod:`dynas.predictors.cpu_work` (the accumulator and a body's operators),
:mod:`dynas.predictors.cpu_spatial` (the spatial patch path); this module composes a block.
DenseNet's layers and transitions: :mod:`dynas.predictors.cpu_dense`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from dynas.predictors.cpu_paths import FOLD_MIN_MACS, FOLD_MIN_ROWS, batching_pays, folds
from dynas.predictors.cpu_spatial import covered, patch_work, selection_ops
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
from dynas.predictors.cpu_work import (
    Work,
    basic_body,
    bn_relu,
    grouped_touched,
    masked_body,
    per_part,
    pointwise_body,
    se_work,
    shortcut,
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
    "FOLD_MIN_ROWS",
    "FOLD_MIN_MACS",
    "folds",
    "Work",
    "se_work",
    "covered",
    "distinct",
    "binomial",
    "same_and_parts",
    "TOPK_OPS",
    "QUOTA_OPS",
    "mlp_masker",
    "block_work",
    "stage_entry_work",
    "stem_work",
    "head_work",
    "exit_head_work",
    "clear_work_caches",
    "expected_block_flops",
    "work_latency_ms",
]

#: candidate widths (output columns a convolution kernel computes at once, see ``Work.conv``)
#: among which ``dynas calibrate`` picks the one that fits its measurements best; 1 = no effect
COLUMN_BLOCKS: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
#: operators a masker dispatches after its logits in the random gate mode (``kernels/maskers.py``):
#: score difference and random scores, then a per-sample top-k (top-k, zeros, scatter) or the
#: stage quota of one-decision gates (full, multiply, compare, two casts, subtract)
TOPK_OPS, QUOTA_OPS = 2 + 3, 2 + 6


def mlp_masker(w: Work, b: BlockSpec, n: int, decisions: int, pooled: bool = False, ops: int | None = None) -> None:
    """A channel (``decisions`` groups) or layer (1) masker: mean, fc1, ReLU, fc2, decisions.

    ``pooled``: its input is already pooled ([N, C, 1, 1], a dense layer's); ``ops``: the
    operators after its logits, if not :data:`QUOTA_OPS` (one decision) or :data:`TOPK_OPS`."""
    w.masker()
    hidden = max(16, b.in_channels // 16)
    area = 1 if pooled else b.in_hw[0] * b.in_hw[1]
    w.stream(n * b.in_channels * (area + 1))  # global mean
    w.conv(n, b.in_channels, hidden, 1, b.in_channels, kind="vec", mm=True)  # fc1
    w.stream(2 * n * hidden)  # relu
    w.conv(n, hidden, 2 * decisions, 1, hidden, kind="vec", mm=True)  # fc2
    w.ops((QUOTA_OPS if decisions == 1 else TOPK_OPS) if ops is None else ops)


def _spatial_masker(w: Work, b: BlockSpec, n: int, S: int) -> None:
    """Adaptive pool to the patch grid, its 1x1 conv as a product of the pooled rows (``_rows``)."""
    w.masker()
    gh, gw = b.out_hw[0] // S, b.out_hw[1] // S  # the patch grid
    w.stream(n * b.in_channels * (b.in_hw[0] * b.in_hw[1] + gh * gw))  # adaptive pool to the grid
    w.conv(n * gh * gw, b.in_channels, 2, 1, b.in_channels, kind="vec", mm=True)
    w.ops(QUOTA_OPS if gh * gw == 1 else TOPK_OPS)


def binomial(n: int, p: float) -> np.ndarray:
    """[n + 1] probabilities of 0..n successes in ``n`` trials of probability ``p``."""
    m = np.arange(n + 1)
    return np.array([math.comb(n, i) for i in m], dtype=np.float64) * p**m * (1 - p) ** (n - m)


def distinct(m: float, M: int) -> float:
    """Expected distinct values among ``m`` uniform draws from ``M``."""
    if M <= 1 or m <= 1:
        return min(m, 1.0) if M >= 1 else 0.0
    if M > 1e12:  # collisions are negligible (and 1 / M would lose precision)
        return float(m)
    return -M * math.expm1(m * math.log1p(-1.0 / M))


def same_and_parts(m: int, M: int) -> tuple[float, float]:
    """Probability that ``m`` samples draw one selection of ``M``, and the expected distinct
    selections given they do not."""
    if m <= 1:
        return 1.0, 1.0
    same = float(M) ** -(m - 1) if M < 1e12 else 0.0
    return same, ((distinct(m, M) - same) / (1.0 - same) if same < 1.0 else 1.0)


def _body(w: Work, b: BlockSpec, m: float, k: int, selected: bool, touched, dynamic: bool = True) -> None:
    """A body on the whole maps of ``m`` samples."""
    if b.kind == "basic":
        basic_body(w, b, m * b.out_hw[0] * b.out_hw[1], k, selected, out_hw=b.out_hw, mid_hw=b.out_hw)
    else:
        hw_in, hw_out = b.in_hw[0] * b.in_hw[1], b.out_hw[0] * b.out_hw[1]
        pointwise_body(
            w,
            b,
            m * hw_in,
            m * hw_out,
            m,
            k,
            selected,
            touched=touched,
            dynamic=dynamic,
            out_hw=b.out_hw,
            mid_hw=b.in_hw,
        )


def _batched_body(w: Work, b: BlockSpec, m: int, k: int) -> None:
    """``DynamicBottleneck._batched_body``: ``m`` samples with different selections of ``k``
    channels; each with its own gathered weights where that pays (:func:`batching_pays`), else
    the dense convolutions, masked (zeros, scatter: the channel mask)."""
    if b.groups != 1 or not batching_pays(b, k):
        w.gather(m * b.width, 2)
        masked_body(w, b, m)
        return
    cin, width, cout = b.in_channels, b.width, b.out_channels
    rows_in, rows_out = m * b.in_hw[0] * b.in_hw[1], m * b.out_hw[0] * b.out_hw[1]
    w.gather(m * k * cin, weights=True)  # each sample's rows of conv1's matrix
    w.conv(rows_in, cin, k, 1, cin, mm=True, foldable=False)  # bmm
    w.gather(rows_in * k)  # the samples side by side as m * k channels (contiguous)
    bn_relu(w, rows_in * k, selected=m * k)
    w.gather(m * k * 9 * (width + k), 2, weights=True)  # each sample's k x k kernels: rows, then gather
    w.conv(rows_out / m, k, m * k, 3, m * k, kind="grouped", hw=b.out_hw)  # one convolution of m groups
    bn_relu(w, rows_out * k, selected=m * k)
    w.gather(m * k * cout, weights=True)  # rows of conv3's cached transpose
    w.conv(rows_out, k, cout, 1, k, mm=True, foldable=False)  # bmm
    bn_relu(w, rows_out * cout, relu=False)


def _scatter_back(w: Work, b: BlockSpec, m: float) -> None:
    """Samples' gather and write-back around a body of ``m`` of the batch's samples: the samples
    (index_select), shortcut rows (index_select), add_, relu_, index_copy_."""
    hw_in, hw_out = b.in_hw[0] * b.in_hw[1], b.out_hw[0] * b.out_hw[1]
    w.gather(m * (b.in_channels * hw_in + 2 * b.out_channels * hw_out), 3)
    w.stream(5 * m * b.out_channels * hw_out, 2)


def _whole_sample_work(
    w: Work, b: BlockSpec, n: int, run_prob: float | None, groups: int, M: int, k: int, touched
) -> None:
    """Work of a block whose gates pick whole samples (layer gates, one-patch spatial gates; each
    sample runs with probability ``run_prob``, None: every sample runs) and channels (``groups``
    gate groups, ``M`` equally likely selections of ``k`` channels), beyond maskers and shortcut."""
    out_elems = n * b.out_channels * b.out_hw[0] * b.out_hw[1]
    dist = binomial(n, run_prob) if run_prob is not None else np.eye(n + 1)[n]  # P(m samples run)
    bottleneck = b.kind == "bottleneck"  # differing selections run batched (or dense, masked)
    p_no_split = 0.0  # probability of one output for the whole batch (no ReLU(shortcut) pass of its own)
    for m, pm in enumerate(dist):
        if pm < 1e-12 or m == 0:
            continue
        same, parts = same_and_parts(m, M) if groups else (1.0, 1.0)
        w.weight = pm
        if groups:
            selection_ops(w, m, n, same, parts, bottleneck)
        # one selection for the running samples: one body; the whole batch without a gather
        w.weight = pm * same
        _body(w, b, m, k, bool(groups), touched)
        if m == n:
            p_no_split += pm * same
            w.stream(5 * out_elems, 2)  # add_, relu_
        else:
            _scatter_back(w, b, m)
        if same >= 1.0:
            continue
        if bottleneck:
            w.weight = pm * (1.0 - same)
            if m < n:
                w.gather(m * b.in_channels * b.in_hw[0] * b.in_hw[1])  # the running samples
            _batched_body(w, b, m, k)
            if m == n:
                p_no_split += pm * (1.0 - same)
                w.stream(5 * out_elems, 2)
            else:
                w.gather(2 * m * b.out_channels * b.out_hw[0] * b.out_hw[1], 2)
                w.stream(5 * m * b.out_channels * b.out_hw[0] * b.out_hw[1], 2)
            continue

        def part(share: float = m / parts) -> None:
            _scatter_back(w, b, share)
            _body(w, b, share, k, True, touched)

        per_part(w, pm * (1.0 - same), parts, part)
    if b.has_downsample:
        # ReLU(shortcut) of the samples that skip; an identity shortcut of a network's block input
        # (a ReLU's output, ``input_nonnegative``) is its own ReLU
        w.weight = 1.0 - p_no_split
        w.stream(2 * out_elems)


@functools.lru_cache(maxsize=None)
def block_work(b: BlockSpec, st: StageConfig, n: int, run_prob: float = 1.0, column_block: int = 1) -> np.ndarray:
    """[len(TERMS)] expected work of one block of ``n`` samples under ``st``.

    ``run_prob``: probability that a sample runs the block (layer gates and whole-map spatial
    gates; see the module docstring); 1 otherwise.  ``column_block``: the target's (see
    ``Work.conv``).
    """
    w = Work(column_block)
    p = st.paradigm
    ho, wo = b.out_hw
    out_elems = n * b.out_channels * ho * wo
    if p == "static":
        shortcut(w, b, n)
        _body(w, b, n, b.width, False, None, dynamic=False)
        w.stream(3 * out_elems + 2 * out_elems, 2)  # add, relu
        return w.result()
    S = st.spatial_granularity if uses_spatial(p) else None
    grid = (ho // S) * (wo // S) if S else 0
    groups = b.width // st.channel_granularity if uses_channel(p) else 0
    active = budget_count(st.channel_density, groups) if groups else 0
    k = active * st.channel_granularity if groups else b.width
    touched = grouped_touched(b, st.channel_granularity, active) if groups and b.groups > 1 else None
    if S:
        _spatial_masker(w, b, n, S)
    if groups:
        mlp_masker(w, b, n, groups)
    if uses_layer(p):
        mlp_masker(w, b, n, 1)
    # sample indices: arange (layer gates: compare, nonzero; a one-patch spatial gate: index_select, compare, index)
    w.ops(1 + (2 if uses_layer(p) else 0) + (3 if S and grid == 1 else 0))
    shortcut(w, b, n)
    M = math.comb(groups, active) if groups else 1
    if not (S and grid > 1):
        per_sample_gate = uses_layer(p) or grid == 1
        _whole_sample_work(w, b, n, run_prob if per_sample_gate else None, groups, M, k, touched)
    else:
        same, parts = same_and_parts(n, M) if groups else (1.0, 1.0)
        patch_work(w, b, n, S, budget_count(st.spatial_rate, grid), groups, same, parts, k, touched)
    return w.result()


@functools.lru_cache(maxsize=None)
def stage_entry_work(st: StageConfig) -> np.ndarray:
    """[len(TERMS)] work of a stage beyond its blocks' (:func:`block_work`): one
    ``dynamic_stages`` for a stage with gates (the cold start of its first gated block), none
    for a static one."""
    w = Work()
    if st.paradigm != "static":
        w.add("dynamic_stages", 1)
    return w.result()


@functools.lru_cache(maxsize=None)
def stem_work(stem: StemSpec, in_hw: tuple[int, int], n: int) -> np.ndarray:
    w = Work()
    ch, cw = stem.conv_out_hw
    w.conv(n * ch * cw, stem.in_channels, stem.out_channels, stem.kernel, stem.in_channels, kind="stem")
    bn_relu(w, n * stem.out_channels * ch * cw)
    if stem.maxpool:
        w.stream(n * stem.out_channels * (ch * cw + stem.out_hw[0] * stem.out_hw[1]))
    return w.result()


@functools.lru_cache(maxsize=None)
def head_work(head_in: int, head_hw: tuple[int, int], classes: int, n: int, norm: bool = False) -> np.ndarray:
    """Global pool and classifier; ``norm``: BN + ReLU on the last map first (DenseNet's norm5)."""
    w = Work()
    if norm:
        bn_relu(w, n * head_in * head_hw[0] * head_hw[1])
    w.stream(n * head_in * (head_hw[0] * head_hw[1] + 1), 2)  # global pool, flatten
    w.conv(n, head_in, classes, 1, head_in, kind="vec", mm=True)
    return w.result()


@functools.lru_cache(maxsize=None)
def exit_head_work(cin: int, head_hw: tuple[int, int], classes: int, n: int, width: int = 0) -> np.ndarray:
    """An exit head: :func:`head_work`, after a 1x1 conv + BN + ReLU to ``width`` channels if > 0."""
    w, rows = Work(), n * head_hw[0] * head_hw[1]
    if width:
        w.conv(rows, cin, width, 1, cin, hw=head_hw)
        bn_relu(w, rows * width)
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


def clear_work_caches() -> None:
    """Forget the memoised work of blocks, stems and heads: call it after changing a path
    threshold of :mod:`~dynas.predictors.cpu_paths` (tests and benchmarks that force a path)."""
    for fn in (block_work, stage_entry_work, stem_work, head_work, exit_head_work):
        fn.cache_clear()
