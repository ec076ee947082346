"""Analytical latency of (dynamic) convolution operators on one GPU.

The physics follows the LAUDNet simulator described in ``shared/anchors/laudnet.md`` section 2,
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

__all__ = ["Hardware", "OpCost", "ConvOp", "conv_cost", "memory_cost", "expected_max_density"]


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

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + self.launch_s

    def scaled(self, factor: float) -> "OpCost":
        return OpCost(self.compute_s * factor, self.memory_s * factor, self.launch_s * factor,
                      self.macs * factor, self.schedule)


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
    pmf = [math.comb(successes, x) * math.comb(population - successes, draws - x) / total
           for x in range(draws + 1)]
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
def _emax(groups: int, active: int, per_tile: int, tiles: int) -> float:
    return float(expected_max_density(groups, active, per_tile, np.array([float(tiles)]))[0])


@functools.lru_cache(maxsize=None)
def memory_cost(hw: Hardware, elements: int) -> OpCost:
    """An element-wise / pooling / copy kernel that streams ``elements`` floats through DRAM."""
    return OpCost(0.0, elements * hw.bytes_per_element / hw.dram_bandwidth_Bps, hw.launch_us * 1e-6, 0.0)


def _coalescing(row: np.ndarray, gap: np.ndarray, transaction: int) -> np.ndarray:
    """Useful fraction of fetched floats for rows of ``row`` useful floats followed by ``gap``."""
    t = float(transaction)
    full = row / (np.ceil(row / t) * t)
    return np.where(row > t, full, np.where(row + gap > t, row / t, row / np.maximum(row + gap, 1.0)))


@functools.lru_cache(maxsize=None)
def conv_cost(hw: Hardware, op: ConvOp) -> OpCost:
    """Best-schedule latency of one convolution (see the module docstring for the model)."""
    if op.units <= 0:
        return OpCost(0.0, 0.0, 0.0, 0.0, "skipped")
    lanes = hw.lanes_per_sm
    cin_pg = op.cin_active / op.groups  # active input channels per group
    cout_pg = op.cout / op.groups

    c = _cands(op.cout)
    h = _cands(op.out_h)
    w = _cands(op.out_w)
    # Tiles are cut over (channels, rows, cols) of ONE unit and spread over the SMs; each tile
    # then loops over the units (samples or gathered patches) in steps of P units.  Units do not
    # add parallelism: this is the schedule that makes small patches slow on wide GPUs.
    C, H, W = (a.ravel() for a in np.meshgrid(c, h, w, indexing="ij"))  # each [K]
    n_tiles = np.ceil(op.cout / C) * np.ceil(op.out_h / H) * np.ceil(op.out_w / W)
    waves = np.ceil(n_tiles / hw.n_sm)
    # P only enters the compute term, through ceil(units / P) steps of ceil(P*C*H*W / L) lane
    # rounds (L = lanes x fp32_cycles): the best P is found per distinct tile size C*H*W.
    L = lanes * hw.fp32_cycles
    sizes, inv = np.unique(C * H * W, return_inverse=True)  # [Q], [K]
    p = _cands(op.units)  # [nP]
    rounds = np.ceil(op.units / p)[None, :] * np.ceil(p[None, :] * sizes[:, None] / L)  # [Q, nP]
    best_p = rounds.argmin(axis=1)  # [Q]
    lane_rounds = rounds[np.arange(len(sizes)), best_p][inv]  # [K]: lane rounds of a tile over all units
    P = p[best_p][inv]  # [K]

    if op.gate_groups:
        G = op.cout / op.gate_groups  # channels per group
        per_tile = np.maximum(1, np.round(C / G)).astype(np.int64)  # groups per tile, [K]
        m = np.minimum(n_tiles, hw.n_sm).astype(np.int64)  # tiles per wave, [K]
        keys, kinv = np.unique(per_tile * (hw.n_sm + 1) + m, return_inverse=True)
        dens = np.array([_emax(op.gate_groups, op.gate_active, int(k // (hw.n_sm + 1)), int(k % (hw.n_sm + 1)))
                         for k in keys])
        density = dens[kinv]  # [K]
        mean_density = op.gate_active / op.gate_groups
    else:
        density = 1.0
        mean_density = 1.0

    # Each lane round computes L outputs, each needing cin_pg * k * k MACs at clock x lanes MAC/s.
    compute = lane_rounds * L * density * cin_pg * op.k * op.k / (hw.clock_hz * lanes) * waves

    # Memory: unique DRAM traffic + per-tile L2 traffic with coalescing.
    cout_active = op.cout * mean_density
    w_out = cout_active if op.weights_scale_with_gates else op.cout
    w_in = cin_pg if op.weights_scale_with_gates else op.cin / op.groups
    weights = w_out * w_in * op.k * op.k
    outputs_total = op.units * cout_active * op.out_h * op.out_w
    dram_elems = weights + op.dram_in_per_channel * op.cin_active + outputs_total
    in_h = (H - 1) * op.stride + op.k  # input window of a tile, with halo
    in_w = (W - 1) * op.stride + op.k
    if op.groups == 1:
        in_ch = np.full_like(C, float(op.cin_active))
    else:
        in_ch = np.minimum(op.cin_active, np.ceil(C / cout_pg) * cin_pg)
    gap = np.maximum(op.in_row - in_w, 0.0)
    # A window spanning whole stored rows is one contiguous run; otherwise each row is a run.
    if op.channels_last:
        run, gap = in_ch, np.zeros_like(in_ch)
    else:
        run = np.where(gap > 0, in_w, in_w * in_h)
    coal = _coalescing(run, gap, hw.mem_transaction_floats)
    # L2: each tile fetches its weights once, and per unit its input window and its outputs.
    l2_elems = n_tiles * (C * mean_density * cin_pg * op.k * op.k
                          + op.units * (in_ch * in_h * in_w / coal + C * mean_density * H * W))
    bpe = hw.bytes_per_element
    memory = dram_elems * bpe / hw.dram_bandwidth_Bps + l2_elems * bpe / (hw.dram_bandwidth_Bps * hw.l2_speed_frac)

    total = compute + memory
    i = int(np.argmin(total))
    macs = op.units * cout_active * op.out_h * op.out_w * cin_pg * op.k * op.k
    sched = f"c{int(C[i])} h{int(H[i])} w{int(W[i])} p{int(P[i])}"
    return OpCost(float(compute[i]), float(memory[i]), hw.launch_us * 1e-6, float(macs), sched)
