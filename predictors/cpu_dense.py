"""CPU work of DenseNet's dense layers and transitions (``kernels/dense.py``), in the terms of
the residual blocks' model (:mod:`dynas.predictors.cpu`), priced by the same fitted costs.

No term is new: the dense kernels are made of operators the residual model already counts --
BN passes, 1x1 and 3x3 convolutions, row products of pixel rows (folded or not, ``row_product``),
the transposed 3x3 convolution of selected input channels (``conv_inputs``), pixel-row gathers
of live channels (``gather_melem``, like the spatial path's), gathers of selected weight rows,
and dispatched calls.  What follows ``DynamicDenseBlock._fast`` operator by operator:

* the block: one zeroed feature buffer [N, C_in + L k, H, W], the input copied in, the pooled
  vector of each feature kept (the maskers read them; a layer pools only its own k channels);
* each layer: its maskers on the pooled features, the samples whose layer gate is on, split
  into parts by channel selection; each part gathers its samples' rows (unless it is the
  whole batch), the input channels some of its samples produced (``live``; the others enter
  conv1 as the exact bias ``W1[:, dead] @ a[dead]``), BN + ReLU, conv1 as a row product to the
  selected bottleneck channels, BN + ReLU, conv2, the new features written into the buffer;
* the transition after the block: the static module when every channel was produced by some
  sample of the batch, else BN + ReLU of the produced channels, a row product, the dead
  channels' bias, the pool;
* a static stage: torchvision's dense block (each layer concatenates the features so far, the
  block concatenates them all at the end) and the static transition.

Expectations (random gate mode, as ``dynas bench --gates random`` runs): a layer-gated stage of
``L`` layers gives every sample a uniform ``R``-subset of them (``R`` = the stage quota,
:func:`dynas.spaces.config.stage_runs`), independently per sample.  So layer ``i`` runs ``m``
samples with ``m ~ Binomial(n, R / L)``; for a sample that runs layer ``i``, an earlier layer is
one it skipped with probability ``q = 1 - (R - 1) / (L - 1)``, and a set of ``t`` earlier layers
all skipped with probability ``C(L - 1 - t, R - 1) / C(L - 1, R - 1)``.  A part of ``u`` samples
reads the union of their produced channels: an earlier layer's channels are dead (unread) with
probability ``q^u`` (exact: the samples are independent), and the part takes the dead-channel
path when any earlier layer is dead (inclusion-exclusion over those sets, exact for integer
``u``).  Channel selections split the running samples as the residual model does (one part
when all share a selection, else the expected number of distinct selections, each part with an
equal share of the samples; a fractional share interpolates between the integer ones).  The
transition's dead channels: a layer no sample of the batch ran, probability ``(1 - R / L)^n``.

:func:`drawn_block_work` counts one draw (which samples ran which layers, which channels) the
same way; the tests compare it with the operators the kernels dispatch on that draw, and
:func:`layer_work` with the average over simulated draws.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from dynas.predictors.cpu import QUOTA_OPS, TOPK_OPS, binomial, mlp_masker, same_and_parts
from dynas.predictors.cpu_work import Work, bn_relu, per_part
from dynas.spaces.backbones import BlockSpec, transition_of
from dynas.spaces.config import StageConfig, budget_count, uses_channel, uses_layer

__all__ = ["layer_work", "drawn_block_work", "expected_layer_flops", "LIVE_INDEX_OPS", "ZERO_RESPONSE_OPS"]

#: operators of ``_live_channels`` when some channel is dead: arange, nonzero, not, nonzero,
#: arange, the live and dead indices (multiply, two adds each), cat
LIVE_INDEX_OPS = 12
#: operators of ``bn_zero_response``: add, sqrt, multiply, divide, subtract, ReLU
ZERO_RESPONSE_OPS = 6


def _c0(b: BlockSpec) -> int:
    """Channels of the dense block's input."""
    return b.in_channels - b.index * b.out_channels


def _area(hw: tuple[int, int]) -> int:
    return hw[0] * hw[1]


def _dead_bias(w: Work, cin: int, dead: float, cout: int, rows: float) -> None:
    """The dead channels' exact bias: relu(BN(0)) of ``cin`` channels, its ``dead`` entries, the
    weight columns ``[cout, dead]``, their product, and its add to ``rows`` output rows."""
    w.stream(2 * ZERO_RESPONSE_OPS * cin, ZERO_RESPONSE_OPS)  # bn_zero_response
    w.gather(dead)  # its dead entries (index_select)
    w.gather(cout * dead, weights=True)  # W[:, dead] (index_select)
    w.conv(1, dead, cout, 1, dead, kind="vec", mm=True)  # the matrix-vector product (mv)
    w.stream(2 * rows * cout)  # add_


def _block_setup(w: Work, b: BlockSpec, n: int, depth: int) -> None:
    """``_fast``'s buffers: the zeroed features, the input copied in, pooled vectors, ``ran``."""
    c0, hw = _c0(b), _area(b.in_hw)
    w.gather(n * (c0 + depth * b.out_channels) * hw)  # zeros_in_layout [N, C_in + L k, H, W]
    w.gather(n * c0 * hw)  # buf[:, :c0].copy_(x)
    w.ops(1)  # pooled: new_zeros [N, C]
    w.stream(n * c0 * (hw + 1))  # the input's global mean
    w.ops(2)  # its copy into pooled; ran: zeros [N, L]


def _layer_ops(w: Work, b: BlockSpec, n: int, st: StageConfig) -> None:
    """A dynamic layer's work outside its parts: maskers on the pooled features, the running
    samples, the live count of the FLOPs record, the ``ran`` update."""
    if uses_channel(st.paradigm):
        mlp_masker(w, b, n, b.width // st.channel_granularity, pooled=True, ops=TOPK_OPS)
    if uses_layer(st.paradigm):
        # the stage quota is filled (torch.full) at the stage's first gate only
        mlp_masker(w, b, n, 1, pooled=True, ops=QUOTA_OPS - (1 if b.index > 0 else 0))
    w.ops(1 + (2 if uses_layer(st.paradigm) else 0))  # arange; layer gates: compare, nonzero
    w.ops(4 + 2)  # live_count: sum, multiply, add, cast; ran[samples, i] = True (lift_fresh, index_put_)


def _parts_ops(w: Work, m: int, n: int, parts: float, one_selection: bool) -> None:
    """``_channel_parts`` of ``m`` running samples with channel gates: their masks, compare, and
    the split by selection (one sample: index; else unique and one index per selection, or
    compare, sample index and index per part)."""
    w.ops((m != n) + 1)
    if m == 1:
        w.ops(1)
    elif one_selection:
        w.ops(2)
    else:
        w.ops(1 + 3 * parts)


def _part(w: Work, b: BlockSpec, n: int, u: float, dead: float, sel: int, whole: bool) -> None:
    """One part of layer ``b``: ``u`` of the batch's ``n`` samples (``whole``: all of them),
    ``dead`` of its input channels unread (folded into the bias), ``sel`` bottleneck channels
    selected (0: no channel gate)."""
    ci, hw, k = b.in_channels, _area(b.in_hw), b.out_channels
    rows, live, s = u * hw, ci - dead, sel or b.width
    w.ops(4)  # which earlier layers its samples ran: index, any; _live_channels: all, item
    if dead:
        w.ops(LIVE_INDEX_OPS)
    if not whole:
        w.gather(rows * ci)  # its samples' rows of the first ci channels: [n_u * H * W, ci]
    if dead:
        w.gather(rows * live)  # the live channels: [n_u * H * W, |live|]
    bn_relu(w, rows * live, selected=live if dead else 0)
    if sel:
        w.gather(s * ci, weights=True)  # conv1's rows of the selected channels
    if dead:
        w.gather(s * live, weights=True)  # ... its columns of the live channels
    w.conv(rows, live, s, 1, live, mm=True, hw=b.in_hw)  # conv1: row_product, folded when large
    if dead:
        _dead_bias(w, ci, dead, s, rows)
    bn_relu(w, rows * s, selected=s if sel else 0)
    if sel:
        w.gather(s * k * 9, weights=True)  # conv2's flipped rows of the selected channels (conv_inputs)
    w.conv(rows, s, k, 3, s, hw=b.in_hw)
    w.gather(rows * k)  # the new features into the buffer (copy_ or index_put_)
    w.stream(rows * k + u * k)  # their global mean
    w.ops(1)  # ... into pooled (index_put_)


def _block_end(w: Work, dead: float, p_dead: float) -> None:
    """After the last layer: produced (any), all, item; with probability ``p_dead`` some channel
    no sample produced (``dead`` expected channels given that): its indices for the transition."""
    w.ops(3)
    if dead:
        w.weight *= p_dead
        w.ops(2 + LIVE_INDEX_OPS)
        w.weight /= p_dead


def _transition(w: Work, b: BlockSpec, n: int, dead: float) -> None:
    """The transition after the block of its last layer ``b``: the static module (``dead`` = 0),
    else on the produced channels only (``DynamicTransition``)."""
    c_in, c_out, out_hw = transition_of(b)
    hw = _area(b.out_hw)
    rows, live = n * hw, c_in - dead
    if not dead:
        bn_relu(w, rows * c_in)
        w.conv(rows, c_in, c_out, 1, c_in, hw=b.out_hw)
    else:
        w.ops(4)  # keep: ones, lift_fresh, index_put_, nonzero
        w.gather(rows * live)  # the live channels' pixel rows
        bn_relu(w, rows * live, selected=live)
        w.gather(c_out * live, weights=True)  # the weight's live columns
        w.conv(rows, live, c_out, 1, live, mm=True, hw=b.out_hw)
        _dead_bias(w, c_in, dead, c_out, rows)
    w.stream(n * c_out * (hw + _area(out_hw)))  # 2 x 2 average pool


def _static_layer(w: Work, b: BlockSpec, n: int, depth: int) -> None:
    """torchvision's dense layer: cat of the features so far, BN-ReLU-conv1-BN-ReLU-conv2."""
    ci, hw = b.in_channels, _area(b.in_hw)
    rows = n * hw
    w.gather(rows * ci)  # torch.cat(features, 1)
    bn_relu(w, rows * ci)
    w.conv(rows, ci, b.width, 1, ci, hw=b.in_hw)
    bn_relu(w, rows * b.width)
    w.conv(rows, b.width, b.out_channels, 3, b.width, hw=b.in_hw)
    if b.index == depth - 1:
        w.gather(rows * (ci + b.out_channels))  # the block's output: cat of every feature
        if b.has_downsample:
            _transition(w, b, n, 0.0)


# ----------------------------------------------------------------------------- expectations


@functools.lru_cache(maxsize=None)
def _covered(t_max: int, pool: int, runs: int, u: int) -> float:
    """Probability that each of ``t_max`` given layers is run by some of ``u`` independent
    samples, each of which runs a uniform ``runs``-subset of ``pool`` layers that include them.

    Inclusion-exclusion over the sets of ``t`` layers all ``u`` samples miss (one sample misses
    them with probability ``C(pool - t, runs) / C(pool, runs)``), in exact fractions: the terms
    alternate in sign and reach ``C(48, 24) ~ 3e13`` where the sum can be small."""
    total = Fraction(0)
    base = math.comb(pool, runs)
    for t in range(t_max + 1):
        miss = Fraction(math.comb(pool - t, runs), base) if pool - t >= runs else Fraction(0)
        total += (-1) ** t * math.comb(t_max, t) * miss**u
    return min(1.0, max(0.0, float(total)))


def _dead_stats(i: int, depth: int, runs: int, u: float, k: int) -> tuple[float, float]:
    """(probability that some of layer ``i``'s earlier layers is dead for a part of ``u`` samples
    that run it, expected dead channels given that)."""
    if i == 0 or runs >= depth:
        return 0.0, 0.0
    lo = max(1, math.floor(u))
    frac = u - lo
    q = 1.0 - (runs - 1) / (depth - 1)  # a sample that runs layer i skipped a given earlier one

    def at(v: int) -> tuple[float, float]:
        # a sample that runs layer i runs runs - 1 of the other depth - 1 layers
        return 1.0 - _covered(i, depth - 1, runs - 1, v), k * i * q**v

    (p_lo, d_lo), (p_hi, d_hi) = at(lo), at(lo + 1) if frac > 0 else at(lo)
    p, dead = p_lo + frac * (p_hi - p_lo), d_lo + frac * (d_hi - d_lo)
    return p, (dead / p if p > 0 else 0.0)


def _expected_part(w: Work, b: BlockSpec, n: int, u: float, sel: int, whole: bool, depth: int, runs: int) -> None:
    """:func:`_part` in expectation over which earlier layers the part's samples ran."""
    base = w.weight
    p_dead, dead = _dead_stats(b.index, depth, runs, u, b.out_channels)
    for weight, d in ((1.0 - p_dead, 0.0), (p_dead, dead)):
        if weight > 1e-12:
            w.weight = base * weight
            _part(w, b, n, u, d, sel, whole)
    w.weight = base


@functools.lru_cache(maxsize=None)
def layer_work(
    b: BlockSpec, depth: int, st: StageConfig, n: int, runs: int | None, column_block: int = 1
) -> np.ndarray:
    """[len(TERMS)] expected work of dense layer ``b`` (of a block of ``depth`` layers) of ``n``
    samples under ``st``; ``runs``: the stage quota of a layer-gated stage (None: every layer
    runs).  The block's buffers count on its first layer, its end and the transition after it
    on its last."""
    w = Work(column_block)
    if st.paradigm == "static":
        _static_layer(w, b, n, depth)
        return w.result()
    R = runs if uses_layer(st.paradigm) and runs is not None else depth
    if b.index == 0:
        _block_setup(w, b, n, depth)
    _layer_ops(w, b, n, st)
    groups = b.width // st.channel_granularity if uses_channel(st.paradigm) else 0
    active = budget_count(st.channel_density, groups) if groups else 0
    sel = active * st.channel_granularity if groups else 0
    M = math.comb(groups, active) if groups else 1
    dist = binomial(n, R / depth) if R < depth else np.eye(n + 1)[n]  # P(m samples run layer i)
    for m, pm in enumerate(dist):
        if pm < 1e-12 or m == 0:
            continue
        same, parts = same_and_parts(m, M) if groups else (1.0, 1.0)
        if groups:
            for weight, one in ((same, True), (1.0 - same, False)):
                if weight > 1e-12:
                    w.weight = pm * weight
                    _parts_ops(w, m, n, parts, one)
        w.weight = pm * same
        _expected_part(w, b, n, m, sel, m == n, depth, R)
        if same < 1.0:
            share = m / parts  # samples per part

            def part(u: float = share) -> None:
                _expected_part(w, b, n, u, sel, False, depth, R)

            per_part(w, pm * (1.0 - same), parts, part)
    w.weight = 1.0
    if b.index == depth - 1:
        p_dead, dead = _produced_dead(depth, R, n, b.out_channels)
        _block_end(w, dead, p_dead)
        if b.has_downsample:
            for weight, d in ((1.0 - p_dead, 0.0), (p_dead, dead)):
                if weight > 1e-12:
                    w.weight = weight
                    _transition(w, b, n, d)
    return w.result()


def _produced_dead(depth: int, runs: int, n: int, k: int) -> tuple[float, float]:
    """(probability that some layer of the block ran for no sample of ``n``, expected channels
    of such layers given that)."""
    if runs >= depth:
        return 0.0, 0.0
    p = 1.0 - _covered(depth, depth, runs, n)
    return p, (k * depth * (1.0 - runs / depth) ** n / p if p > 0 else 0.0)


# ----------------------------------------------------------------------------- one draw


def drawn_block_work(
    blocks: Sequence[BlockSpec],
    st: StageConfig,
    ran: Sequence[Sequence[bool]],
    selections: Sequence[Sequence[tuple[int, ...]]] | None,
    column_block: int = 1,
) -> np.ndarray:
    """[len(TERMS)] work of one dense block's pass for one draw: ``ran[i][j]`` whether sample
    ``j`` ran layer ``i``, ``selections[i][j]`` its selected channel groups there (None: no
    channel gates).  Parts follow ``_channel_parts`` (one per distinct selection, in sorted
    order: the first counts as a first part, the others as repeats)."""
    n, depth = len(ran[0]), len(blocks)
    if st.paradigm == "static":
        return np.sum([layer_work(b, depth, st, n, None, column_block) for b in blocks], axis=0)
    w = Work(column_block)
    _block_setup(w, blocks[0], n, depth)
    for i, b in enumerate(blocks):
        _layer_ops(w, b, n, st)
        samples = [j for j in range(n) if ran[i][j]]
        if not samples:
            continue
        keys = [selections[i][j] for j in samples] if selections is not None else [()] * len(samples)
        groups = b.width // st.channel_granularity if selections is not None else 0
        order = sorted(set(keys), key=lambda key: [g in key for g in range(groups)])  # torch.unique's order
        if selections is not None:
            _parts_ops(w, len(samples), n, len(order), len(order) == 1)
        for p, key in enumerate(order):
            part = [j for j, kj in zip(samples, keys) if kj == key]
            unread = sum(not any(ran[h][j] for j in part) for h in range(i))
            w.repeat = p > 0
            sel = len(key) * st.channel_granularity if selections is not None else 0
            _part(w, b, n, len(part), unread * b.out_channels, sel, len(part) == n)
        w.repeat = False
    last = blocks[-1]
    dead = sum(not any(row) for row in ran) * last.out_channels
    _block_end(w, dead, 1.0)
    if last.has_downsample:
        _transition(w, last, n, dead)
    return w.result()


def expected_layer_flops(b: BlockSpec, st: StageConfig, dense: dict[str, float], depth: int, runs: int | None) -> float:
    """Executed FLOPs per image of dense layer ``b``, as ``DynamicDenseLayer._flops`` counts them
    (each sample's own live channels), in expectation: maskers + l d (conv1 live / C_in + conv2),
    plus the transition x (C_0 + R k) / C_out on the block's last layer."""
    get = lambda op: float(dense.get(op, 0.0))  # noqa: E731
    if st.paradigm == "static":
        return sum(float(v) for v in dense.values())
    hidden = max(16, b.in_channels // 16)
    masker, d = 0.0, 1.0
    if uses_channel(st.paradigm):
        groups = b.width // st.channel_granularity
        d = budget_count(st.channel_density, groups) / groups
        masker += 2.0 * (b.in_channels * hidden + hidden * 2 * groups)
    R = depth
    if uses_layer(st.paradigm):
        masker += 2.0 * (b.in_channels * hidden + hidden * 2)
        R = runs if runs is not None else depth
    # a sample that runs layer i ran (R - 1) / (L - 1) of the earlier ones
    p_earlier = (R - 1) / (depth - 1) if depth > 1 else 1.0
    live = _c0(b) + b.out_channels * b.index * p_earlier
    body = get("conv1") * live / b.in_channels + get("conv2")
    trans = get("downsample") * (_c0(b) + R * b.out_channels) / (b.in_channels + b.out_channels)
    return masker + (R / depth) * d * body + trans
