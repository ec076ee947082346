"""Work of the spatial fast path (``kernels/spatial.py``) for the CPU work model
(:mod:`dynas.predictors.cpu`): blocks whose spatial gates pick ``S`` x ``S`` patches of a map
of more than one patch.

Per channel part (samples sharing one channel selection), the kernels find the part's active
patches, then

* basic blocks: gather input regions that carry the whole halo from the zero-padded input (one
  advanced-indexing copy) and run the body on them;
* 1x1-conv1 blocks: run conv1 on the whole maps when the active patches' windows are expected to
  need at least :data:`~dynas.predictors.cpu_paths.DENSE_HEAD_MIN_FRACTION` of its output pixels
  (:func:`dense_head_min_patches`; the active count per sample is exact, so the choice is too),
  else on the gathered needed pixel rows, into a zero-padded buffer; the 3x3 conv then reads each
  patch's window as one row (``window_rows``), or, for 1x1 patches of a bottleneck
  (:data:`~dynas.predictors.cpu_paths.ROWS_MAX_PATCH_PIXELS`), runs as one product of the output
  pixels' window rows;

and adds the patch rows to the shortcut in one ``index_add_``; one ReLU covers the map.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from dynas.predictors.cpu_paths import DENSE_HEAD_MIN_FRACTION, ROWS_MAX_PATCH_PIXELS
from dynas.predictors.cpu_work import Work, basic_body, masked_body, per_part, pointwise_body
from dynas.spaces.backbones import BlockSpec

__all__ = ["covered", "dense_head_min_patches", "patch_work", "selection_ops", "masked_spatial_forward"]


def covered(b: BlockSpec, S: int, k: int) -> float:
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


@functools.lru_cache(maxsize=None)
def dense_head_min_patches(b: BlockSpec, S: int) -> int:
    """The fewest active patches per sample at which conv1 runs on the whole maps (the kernels'
    ``dense_min_patches``): their windows are expected to need at least
    :data:`DENSE_HEAD_MIN_FRACTION` of conv1's output pixels; patches + 1 where no count does.
    The expected need grows with the count, so a bisection finds it."""
    grid = (b.out_hw[0] // S) * (b.out_hw[1] // S)
    pixels = b.in_hw[0] * b.in_hw[1]
    lo, hi = 0, grid + 1  # need(lo) < fraction <= need(hi), need(grid + 1) taken as enough
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if covered(b, S, mid) >= DENSE_HEAD_MIN_FRACTION * pixels else (mid, hi)
    return hi


def selection_ops(w: Work, m: int, n: int, same: float, parts_differ: float, batched: bool) -> None:
    """Operators that split ``m`` running samples of a batch of ``n`` by channel selection.

    ``same``: probability that they share one selection; ``parts_differ``: expected distinct
    selections when they do not; ``batched``: the block kind runs differing selections in one
    batched pass (bottleneck), so it does not split them.  ``_distinct_selections``: (the running
    samples' decisions, index_select,) compare, sum, compare, all, to bool, and when they differ:
    compare, all, to bool, item, the selected channels (index).  ``_channel_parts``: (index_select,)
    compare, then the one selection's channels (index), or unique and per selection its samples
    (compare, index) and channels (index)."""
    if m == 0:
        return
    sub = 1 if m < n else 0
    if m == 1:
        w.ops(sub + 2)
        return
    w.ops(sub + 5 + (1.0 - same) * 5)
    w.ops(same * (sub + 3) + (0.0 if batched else (1.0 - same) * (sub + 2 + 3 * parts_differ)))


def masked_spatial_forward(w: Work, b: BlockSpec, n: int) -> None:
    """``_masked_forward`` of a spatial+channel batch: the masks (repeat_interleave x 3), the
    dense body masked, x spatial mask, + shortcut, ReLU."""
    ho, wo = b.out_hw
    out_elems = n * b.out_channels * ho * wo
    w.stream(2 * n * (b.width + 2 * ho * wo), 3)
    masked_body(w, b, n)
    w.stream(3 * out_elems)  # x spatial mask
    w.stream(3 * out_elems + 2 * out_elems, 2)  # add, relu


def _basic_part(w: Work, b: BlockSpec, S: int, P: float, k: int, selected: bool) -> None:
    """One channel part of a basic block: ``P`` active patches."""
    region = (S + 1) * b.stride + 3  # input region side: the halo of both 3x3 convs
    mid = S + 2
    # ``_spatial_regions``: batch index (index), grid row / col and region rows / cols (8 index
    # arithmetic), the regions (one advanced-indexing copy: a run of C_in per position), the
    # valid-position mask (16 index arithmetic and compares)
    w.ops(1 + 8 + 16)
    w.index(P * region * region * b.in_channels, P * region * region)
    basic_body(w, b, P * S * S, k, selected, mid_rows=P * mid * mid, out_hw=(S, S), mid_hw=(mid, mid))


def _mid_part(w: Work, b: BlockSpec, S: int, nu: float, P: float, k: int, selected: bool, whole: bool, kw) -> None:
    """One channel part of a 1x1-conv1 block (``_spatial_mid``): ``nu`` samples, ``P`` active
    patches; ``kw``: the rest of :func:`pointwise_body`'s arguments."""
    hi, wi = b.in_hw
    L = (S - 1) * b.stride + 3  # window side on conv1's output
    grid_h, grid_w = b.out_hw[0] // S, b.out_hw[1] // S
    hp, wp = max(1 + hi, (grid_h - 1) * S * b.stride + L), max(1 + wi, (grid_w - 1) * S * b.stride + L)
    kp = round(P / nu)
    dense = kp >= dense_head_min_patches(b, S)
    if dense:  # conv1 on the whole maps of the part's samples, then F.pad into the buffer
        if not whole:
            w.gather(nu * b.in_channels * hi * wi)  # the part's samples
        rows_in = nu * hi * wi
        w.gather(nu * hp * wp * k)
    else:
        rows_in = nu * covered(b, S, kp)  # needed pixels
        # need map: zeros, window pixels of the active patches (3 index arithmetic), index_fill_, nonzero
        w.gather(nu * (hi * wi + 1) + P * L * L, 2)
        w.ops(4)
        w.ops(2 + (0 if whole else 1))  # flat pixel of each needed row (index arithmetic)
        w.gather(rows_in * b.in_channels)  # the needed pixel rows
        # zeroed buffer, the rows' buffer positions (8 index arithmetic), their write-back
        w.gather(nu * hp * wp * k + rows_in * k, 2)
        w.ops(8)
    w.ops(3)  # window top-left pixels (index arithmetic)
    if S * S <= ROWS_MAX_PATCH_PIXELS and b.kind == "bottleneck":  # 3x3 windows of the output pixels as rows
        w.index(P * S * S * 9 * k, P * S * S * 3)
        tail, windows = "cols", 0.0
    else:  # each patch's window as one row of the buffer's strided view
        w.index(P * L * L * k, P * L)
        tail, windows = "windows", P * L * L
    pointwise_body(
        w,
        b,
        rows_in,
        P * S * S,
        nu,
        k,
        selected,
        head="map" if dense else "rows",
        tail=tail,
        patches=P,
        windows=windows,
        out_hw=(S, S),
        mid_hw=b.in_hw,
        **kw,
    )


def patch_work(
    w: Work,
    b: BlockSpec,
    n: int,
    S: int,
    kp: int,
    groups: int,
    same: float,
    parts_differ: float,
    k: int,
    touched: tuple[float, bool] | None,
) -> None:
    """Work of a block whose spatial gates run ``kp`` patches of ``S`` x ``S`` per sample
    (channel selections as in ``cpu.block_work``: ``same``, ``parts_differ``), beyond maskers
    and shortcut.  A bottleneck batch whose samples select different channels runs the dense
    convolutions, masked (``_fast_forward``)."""
    ho, wo = b.out_hw
    hi, wi = b.in_hw
    batched = b.kind == "bottleneck"
    P = n * kp  # active patches in the batch
    if groups:
        selection_ops(w, n, n, same, parts_differ, batched)
        if batched and same < 1.0:
            w.weight = 1.0 - same
            masked_spatial_forward(w, b, n)
    for prob, parts in ((same, 1.0), (0.0 if batched else 1.0 - same, parts_differ)):
        if prob <= 0:
            continue
        whole = parts == 1.0  # one part: every sample, no sample gathers
        nu, Pu = n / parts, P / parts

        def part(nu=nu, Pu=Pu, whole=whole) -> None:
            # active patches: compare (index_select of the part's decisions), nonzero; afterwards
            # each patch's batch index (index), its output pixels (index arithmetic), index_add_
            # of the rows into the shortcut
            w.ops(2 + 3 + (0 if whole else 2))
            w.gather(2 * Pu * S * S * b.out_channels)
            if b.kind == "basic":
                _basic_part(w, b, S, Pu, k, bool(groups))
            else:
                _mid_part(w, b, S, nu, Pu, k, bool(groups), whole, {"touched": touched})

        if b.kind == "basic":  # F.pad of the whole input, once for every part
            w.weight = prob
            side = (S + 1) * b.stride + 3
            pad_lo = b.stride + 1
            ph = max(hi + pad_lo, (ho // S - 1) * S * b.stride + side)
            pw = max(wi + pad_lo, (wo // S - 1) * S * b.stride + side)
            w.gather(n * b.in_channels * ph * pw)
        per_part(w, prob, parts, part)
    w.weight = 1.0 - (1.0 - same if batched and groups else 0.0)
    w.stream(2 * n * b.out_channels * ho * wo)  # one ReLU over the map
