"""Analytical latency of (dynamic) convolution operators on one GPU.

The physics follows LAUDNet's latency simulator (Han et al., TPAMI 2024; DyNetSimulator in LeapLabTHU/LAUDNet),
rewritten for speed (vectorized schedule search, memoized per operator) and determinism
(channel-skip imbalance as an exact expectation instead of random sampling):

* An operator's output is cut into tiles ``(p, c, h, w)``: ``p`` units (samples or gathered
  patches; only when a tile spans a whole unit), ``c`` output channels, ``h x w`` positions.
  Each tile runs on one SM; tiles run in waves of ``n_sm``.
* compute = MACs per tile / (clock x lanes) / lane efficiency x number of waves, where lane
  efficiency = tile outputs / (tile outputs rounded up to a multiple of lanes x fp32_cycles).
* memory = unique DRAM bytes (weights + inputs + outputs) / DRAM bandwidth + the bytes every
  tile fetches (input window with halo, weights) / (L2 bandwidth x coalescing efficiency).
* latency = compute + memory + launch ("add" mode); the tile with the lowest latency wins.
* A channel-gated output makes a tile wait for its busiest channel group: compute scales with
  the expected *maximum* density over the tiles of a wave (hypergeometric, exact).

Everything here works on plain ints/floats so results can be memoized by argument tuple.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "Hardware",
    "OpCost",
    "ConvOp",
    "conv_cost",
    "memory_cost",
    "expected_max_density",
    "clear_caches",
    "fc_cost",
]


class Hardware(NamedTuple):
    """The subset of a target the operator model reads (hashable, for memoization)."""

    n_sm: int
    lanes_per_sm: int
    clock_hz: float
    dram_bandwidth_Bps: float
    l2_speed_frac: float
    fp32_cycles: int
    mem_transaction_floats: int
    launch_us: float
    bytes_per_element: int


@dataclass(frozen=True)
class OpCost:
    compute_s: float
    memory_s: float
    launch_s: float
    macs: float  # multiply-accumulates actually executed (whole batch)
    schedule: str = ""
    dram_bytes: float = 0.0  # unique bytes moved to and from DRAM (whole batch): the DRAM term of memory_s

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + self.launch_s


class ConvOp(NamedTuple):
    """One convolution as the kernel sees it.

    The output is ``units`` independent units of ``cout x out_h x out_w`` (a unit is a sample
    for a dense conv, a gathered patch for a spatially dynamic one).  Each output position reads
    a ``k x k`` window with ``stride`` from an input stored with rows of ``in_row`` elements.
    """

    units: int
    cin: int  # dense input channels
    cout: int  # dense output channels (tiles are cut over this index)
    out_h: int
    out_w: int
    k: int
    stride: int
    groups: int
    in_row: int  # row length of the stored input (map width, or the gathered patch width)
    dram_in_per_channel: int  # unique input elements per channel read from DRAM (whole batch)
    cin_active: int  # input channels that are read (channel gating on the input side)
    gate_groups: int  # 0: output not gated; else number of output channel groups
    gate_active: int  # active output groups per unit (exact count: budget mode)
    weights_scale_with_gates: bool  # batch 1: only the selected weights are read
    channels_last: bool = False  # gathered kernels read NHWC: one position = cin_active contiguous floats


def _tile_candidates(n: int) -> np.ndarray:
    """Powers of two up to the first one >= n, n/i rounded up for small i, and 1..4."""
    cands = {1, 2, 3, 4}
    p = 1
    while p < n:
        p *= 2
        cands.add(p)
    cands.update(math.ceil(n / i) for i in range(1, 9))
    return np.array(sorted(c for c in cands if c <= max(n, 1) or c == p), dtype=np.float64)


@functools.lru_cache(maxsize=None)
def _cands(n: int) -> np.ndarray:
    return _tile_candidates(n)


@functools.lru_cache(maxsize=None)
def _hypergeom_cdf(population: int, successes: int, draws: int) -> np.ndarray:
    """CDF F[x] = P(X <= x), x = 0..draws, of X ~ Hypergeometric(population, successes, draws)."""
    total = math.comb(population, draws)
    pmf = [math.comb(successes, x) * math.comb(population - successes, draws - x) / total for x in range(draws + 1)]
    return np.minimum(np.cumsum(pmf), 1.0)


def expected_max_density(groups: int, active: int, per_tile: int, tiles: np.ndarray) -> np.ndarray:
    """E[max over ``tiles`` iid tiles of (active groups in tile / per_tile)].

    A unit keeps exactly ``active`` of its ``groups`` channel groups; a tile covers ``per_tile``
    of them, so its active count is hypergeometric.  E[max of m] = sum_x P(max >= x)
    = sum_{x>=1} (1 - F(x-1)^m): exact, deterministic.
    """
    per_tile = max(1, min(per_tile, groups))
    if active >= groups:
        return np.ones_like(tiles, dtype=np.float64)
    if per_tile == groups:
        return np.full_like(tiles, active / groups, dtype=np.float64)
    cdf = _hypergeom_cdf(groups, active, per_tile)[:-1]  # F(0..per_tile-1), shape [per_tile]
    m = np.maximum(tiles, 1.0)[:, None]  # shape [T, 1]
    return (1.0 - cdf[None, :] ** m).sum(axis=1) / per_tile  # shape [T]


@functools.lru_cache(maxsize=None)
def memory_cost(hw: Hardware, elements: int) -> OpCost:
    """An element-wise / pooling / copy kernel that streams ``elements`` floats through DRAM."""
    nbytes = elements * hw.bytes_per_element
    return OpCost(0.0, nbytes / hw.dram_bandwidth_Bps, hw.launch_us * 1e-6, 0.0, dram_bytes=float(nbytes))


def _coalescing(row: np.ndarray, gap: np.ndarray, transaction: int) -> np.ndarray:
    """Useful fraction of fetched floats for rows of ``row`` useful floats followed by ``gap``."""
    t = float(transaction)
    full = row / (np.ceil(row / t) * t)
    return np.where(row > t, full, np.where(row + gap > t, row / t, row / np.maximum(row + gap, 1.0)))


class _OpTable(NamedTuple):
    """The part of a conv's schedule search that neither the unit count nor the gates change.

    Built for all input channels active and no output imbalance; the gates enter in
    :func:`conv_cost` as scalar factors plus a per-tile imbalance looked up by ``gate_keys``.
    """

    C: np.ndarray  # [K] tile channels
    H: np.ndarray  # [K] tile rows
    W: np.ndarray  # [K] tile cols
    compute_per_round: np.ndarray  # [K] seconds per lane round (waves included), all inputs, no imbalance
    weight_fetch: np.ndarray  # [K] L2 weight elements fetched by all tiles, all inputs and outputs
    window: np.ndarray  # [K] n_tiles x input window (all input channels) per unit
    out_fetch: np.ndarray  # [K] n_tiles x tile outputs per unit, all outputs
    in_w: np.ndarray  # [K] input window width
    in_h: np.ndarray  # [K] input window height
    gap: np.ndarray  # [K] rest of a stored input row after the window
    in_ch: np.ndarray  # [K] input channels a tile reads, all active
    coal_rows: np.ndarray  # [K] coalescing of a channels-first window (rows, or one run if whole rows)
    gate_tiles: tuple[int, ...]  # distinct channel groups per tile; () if not gated
    gate_t_idx: np.ndarray  # [Kg] index into gate_tiles of each distinct (groups per tile, tiles per wave)
    gate_m: np.ndarray  # [Kg] tiles per wave of each distinct pair
    gate_inv: np.ndarray  # [K] index into the distinct pairs


@functools.lru_cache(maxsize=None)
def _op_table(hw: Hardware, op: ConvOp) -> _OpTable:
    """Unit- and gate-independent part of ``conv_cost``: ``units``, ``dram_in_per_channel``,
    ``cin_active`` and ``gate_active`` of ``op`` are ignored.

    Spatial and layer rates change only the number of units (patches or samples) and channel
    rates only scale these arrays, so one table serves every rate of a stage choice.
    """
    lanes = hw.lanes_per_sm
    cout_pg = op.cout / op.groups
    # Tiles are cut over (channels, rows, cols) of ONE unit and spread over the SMs; each tile
    # then loops over the units (samples or gathered patches) in steps of P units.  Units do not
    # add parallelism: this is the schedule that makes small patches slow on wide GPUs.
    C, H, W = (
        a.ravel() for a in np.meshgrid(_cands(op.cout), _cands(op.out_h), _cands(op.out_w), indexing="ij")
    )  # each [K]
    n_tiles = np.ceil(op.cout / C) * np.ceil(op.out_h / H) * np.ceil(op.out_w / W)
    waves = np.ceil(n_tiles / hw.n_sm)
    if op.gate_groups:
        G = op.cout / op.gate_groups  # channels per group
        per_tile = np.maximum(1, np.round(C / G)).astype(np.int64)  # groups per tile, [K]
        m = np.minimum(n_tiles, hw.n_sm).astype(np.int64)  # tiles per wave, [K]
        keys, gate_inv = np.unique(per_tile * (hw.n_sm + 1) + m, return_inverse=True)  # [Kg], [K]
        tiles, gate_t_idx = np.unique(keys // (hw.n_sm + 1), return_inverse=True)
        gate_tiles, gate_m = tuple(int(x) for x in tiles), keys % (hw.n_sm + 1)
    else:
        gate_tiles, gate_t_idx, gate_m, gate_inv = (), *(np.zeros(0, dtype=np.int64) for _ in range(3))
    cin_pg = op.cin / op.groups
    L = lanes * hw.fp32_cycles  # a lane round computes L outputs of cin_pg * k * k MACs each
    in_h = (H - 1) * op.stride + op.k  # input window of a tile, with halo
    in_w = (W - 1) * op.stride + op.k
    in_ch = np.full_like(C, float(op.cin)) if op.groups == 1 else np.minimum(op.cin, np.ceil(C / cout_pg) * cin_pg)
    gap = np.maximum(op.in_row - in_w, 0.0)
    return _OpTable(
        C=C,
        H=H,
        W=W,
        compute_per_round=L * cin_pg * op.k * op.k / (hw.clock_hz * lanes) * waves,
        weight_fetch=n_tiles * C * cin_pg * op.k * op.k,
        window=n_tiles * in_ch * in_h * in_w,
        out_fetch=n_tiles * C * H * W,
        in_w=in_w,
        in_h=in_h,
        gap=gap,
        in_ch=in_ch,
        # a window spanning whole stored rows is one contiguous run; otherwise each row is a run
        coal_rows=_coalescing(np.where(gap > 0, in_w, in_w * in_h), gap, hw.mem_transaction_floats),
        gate_tiles=gate_tiles,
        gate_t_idx=gate_t_idx,
        gate_m=gate_m,
        gate_inv=gate_inv,
    )


@functools.lru_cache(maxsize=None)
def _max_density_by_wave(groups: int, active: int, per_tile: int, n_sm: int) -> np.ndarray:
    """[n_sm + 1] expected max density over m tiles, for m = 0..n_sm (index 0 unused)."""
    return expected_max_density(groups, active, per_tile, np.arange(n_sm + 1, dtype=np.float64))


@functools.lru_cache(maxsize=None)
def _density_matrix(groups: int, active: int, tiles: tuple[int, ...], n_sm: int) -> np.ndarray:
    """[len(tiles), n_sm + 1]: expected max density for each groups-per-tile and tiles per wave."""
    return np.stack([_max_density_by_wave(groups, active, t, n_sm) for t in tiles])


@functools.lru_cache(maxsize=None)
def _gate_density(hw: Hardware, template: ConvOp, active: int) -> np.ndarray:
    """[K] expected max density of the tiles of a wave, for ``active`` of ``template.gate_groups`` groups."""
    t = _op_table(hw, template)
    D = _density_matrix(template.gate_groups, active, t.gate_tiles, hw.n_sm)  # [nt, n_sm + 1]
    return D[t.gate_t_idx, t.gate_m][t.gate_inv]  # [Kg] -> [K]


@functools.lru_cache(maxsize=None)
def _channels_last_coalescing(hw: Hardware, template: ConvOp, cin_active: int) -> np.ndarray:
    """[K] coalescing of gathered NHWC reads: a window position is ``in_ch`` contiguous floats."""
    in_ch = _op_table(hw, template).in_ch * (cin_active / template.cin)
    return _coalescing(in_ch, np.zeros_like(in_ch), hw.mem_transaction_floats)


@functools.lru_cache(maxsize=None)
def _tile_sizes(cout: int, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct tile sizes C*H*W [Q] and, per tile in ``_op_table`` order, its index [K]."""
    C, H, W = (a.ravel() for a in np.meshgrid(_cands(cout), _cands(out_h), _cands(out_w), indexing="ij"))  # [K]
    return np.unique(C * H * W, return_inverse=True)


@functools.lru_cache(maxsize=None)
def _lane_rounds(cout: int, out_h: int, out_w: int, units: int, lane_unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Best unit step P per tile and the lane rounds a tile needs for all ``units``.

    P only enters the compute term, through ceil(units / P) steps of ceil(P*C*H*W / L) lane
    rounds, so it is chosen per distinct tile size; tiles are ordered as in ``_op_table``.
    """
    sizes, inv = _tile_sizes(cout, out_h, out_w)  # [Q], [K]
    p = _cands(units)  # [nP]
    rounds = np.ceil(units / p)[None, :] * np.ceil(p[None, :] * sizes[:, None] / lane_unit)  # [Q, nP]
    best = rounds.argmin(axis=1)  # [Q]
    return rounds[np.arange(len(sizes)), best][inv], p[best][inv]  # [K], [K]


@functools.lru_cache(maxsize=None)
def conv_cost(hw: Hardware, op: ConvOp) -> OpCost:
    """Best-schedule latency of one convolution (see the module docstring for the model)."""
    if op.units <= 0:
        return OpCost(0.0, 0.0, 0.0, 0.0, "skipped")
    template = op._replace(units=0, dram_in_per_channel=0, cin_active=op.cin, gate_active=0)
    t = _op_table(hw, template)
    lane_rounds, P = _lane_rounds(op.cout, op.out_h, op.out_w, op.units, hw.lanes_per_sm * hw.fp32_cycles)
    f_in = op.cin_active / op.cin  # share of input channels read
    if op.gate_groups:
        density = _gate_density(hw, template, op.gate_active)  # [K]
        mean_density = op.gate_active / op.gate_groups
    else:
        density, mean_density = 1.0, 1.0
    compute = lane_rounds * t.compute_per_round * (density * f_in)  # [K]
    coal = _channels_last_coalescing(hw, template, op.cin_active) if op.channels_last else t.coal_rows
    l2_elems = t.weight_fetch * (mean_density * f_in) + op.units * (
        t.window * f_in / coal + t.out_fetch * mean_density
    )  # [K]
    bpe = hw.bytes_per_element
    l2 = l2_elems * bpe / (hw.dram_bandwidth_Bps * hw.l2_speed_frac)
    i = int(np.argmin(compute + l2))
    cin_pg = op.cin_active / op.groups
    cout_active = op.cout * mean_density
    if op.weights_scale_with_gates:
        weights = cout_active * cin_pg * op.k * op.k
    else:
        weights = op.cout * (op.cin / op.groups) * op.k * op.k
    out_per_unit = cout_active * op.out_h * op.out_w
    dram_elems = weights + op.dram_in_per_channel * op.cin_active + op.units * out_per_unit
    memory = dram_elems * bpe / hw.dram_bandwidth_Bps + float(l2[i])
    sched = f"c{int(t.C[i])} h{int(t.H[i])} w{int(t.W[i])} p{int(P[i])}"
    return OpCost(
        float(compute[i]),
        memory,
        hw.launch_us * 1e-6,
        op.units * out_per_unit * cin_pg * op.k * op.k,
        sched,
        dram_bytes=float(dram_elems * bpe),
    )


def fc_cost(hw: Hardware, n: int, cin: int, cout: int) -> OpCost:
    """A fully connected layer on ``n`` vectors, as a 1x1 conv on a 1x1 map."""
    return conv_cost(hw, ConvOp(n, cin, cout, 1, 1, 1, 1, 1, 1, n, cin, 0, 0, False))


def clear_caches() -> None:
    """Drop the memoized operator costs and the tables behind them (benchmarks, calibration)."""
    for fn in (
        conv_cost,
        _op_table,
        _tile_sizes,
        _lane_rounds,
        _gate_density,
        _density_matrix,
        _max_density_by_wave,
        _channels_last_coalescing,
        memory_cost,
        _hypergeom_cdf,
    ):
        fn.cache_clear()
