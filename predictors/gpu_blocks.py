"""GPU operators of one block under a stage choice, and of the stem and head: how each paradigm
decomposes a block into the operators :mod:`dynas.predictors.gpu` times (LAUDNet's inference
kernels, Han et al., TPAMI 2024), for :mod:`dynas.predictors.latency`.

* static: conv chain + downsample + residual add (one element-wise kernel).
* spatial: masker + gathered conv chain + scatter-add fused into the residual.  The masker is
  either fused into the first conv as one extra output channel (the first conv then runs dense
  and the next conv gathers from its output), or a separate pool + 1x1 conv (the first conv then
  runs on gathered patches with the halo the later 3x3 convs need).  Whichever is cheaper wins
  and is reported.  Active patches = ceil(rate x mask grid) per sample.
* channel: masker (global pool + MLP) + convs on the selected channels; the first conv's output,
  the 3x3 conv's input and output, and the last conv's input are gated.  Tiles wait for their
  busiest group (exact expected maximum, see ``gpu.expected_max_density``).
* layer: masker + dense downsample + the block body on the executed samples only; the body's
  cost is interpolated linearly between the integer sample counts around ``rate x batch``.
* spatial+channel / layer+channel: the two compose (one shared masker pass).

DenseNet layers have their own decomposition (:mod:`dynas.predictors.dense_cost`).  Every result
is memoized per (hardware, block shape, stage choice, batch); :func:`block_key` drops a block's
position so that blocks of equal shapes share it.
"""

from __future__ import annotations

import functools
import math

from dynas.predictors.conv_chain import (
    ChainConv,
    Gate,
    channel_masker,
    dense_conv,
    gate_of,
    gated_fields,
    interpolate,
    ops_total_s,
)
from dynas.predictors.energy import EnergyConstants, ops_energy_mj, static_energy_mj
from dynas.predictors.gpu import ConvOp, Hardware, OpCost, conv_cost, fc_cost, memory_cost
from dynas.spaces.backbones import BlockSpec, StemSpec
from dynas.spaces.config import StageConfig, uses_layer

__all__ = ["Ops", "block_alternatives", "block_ops", "block_energy_mj", "block_key", "stem_head_ops"]

Ops = tuple[tuple[str, OpCost], ...]


# ----------------------------------------------------------------------------- conv chains
def _chain(b: BlockSpec) -> tuple[ChainConv, ...]:
    """The block's main-path convs in order (downsample and SE are handled separately)."""
    if b.kind == "basic":
        return (
            ChainConv("conv1", b.in_channels, b.width, 3, b.stride, 1, False, True),
            ChainConv("conv2", b.width, b.out_channels, 3, 1, 1, True, False),
        )
    return (
        ChainConv("conv1", b.in_channels, b.width, 1, 1, 1, False, True),
        ChainConv("conv2", b.width, b.width, 3, b.stride, b.groups, True, True),
        ChainConv("conv3", b.width, b.out_channels, 1, 1, 1, True, False),
    )


def _chain_maps(b: BlockSpec) -> list[tuple[int, int]]:
    """Input map (H, W) of each conv in ``_chain(b)``; the last conv outputs ``b.out_hw``."""
    if b.kind == "basic":
        return [b.in_hw, b.out_hw]
    return [b.in_hw, b.in_hw, b.out_hw]


def _gathered_conv(
    hw: Hardware, cv: ChainConv, n: int, patches: int, out_side: int, from_map: tuple[int, int] | None, gate: Gate
) -> OpCost:
    """A conv on ``n x patches`` gathered units of ``out_side``^2 outputs each.

    ``from_map`` is the dense input map when the gather is fused into this conv's loads (input
    rows are map rows, unique DRAM reads are capped by the map), ``None`` when the input is an
    already-gathered contiguous buffer.
    """
    in_side = (out_side - 1) * cv.stride + cv.k
    units = n * patches
    if from_map is None:
        row, dram_in = in_side, units * in_side * in_side
    else:
        # Halo windows of neighbouring patches overlap, but each patch's window is fetched on its own.
        row, dram_in = from_map[1], units * in_side * in_side
    return conv_cost(
        hw,
        ConvOp(
            units=units,
            cin=cv.cin,
            cout=cv.cout,
            out_h=out_side,
            out_w=out_side,
            k=cv.k,
            stride=cv.stride,
            groups=cv.groups,
            in_row=row,
            dram_in_per_channel=dram_in,
            channels_last=True,
            **gated_fields(cv, gate, n),
        ),
    )


def _se(hw: Hardware, b: BlockSpec, units_elems: int, n: int, cw: int) -> list[tuple[str, OpCost]]:
    """Squeeze-excitation on ``units_elems`` positions x ``cw`` channels (pool, 2 FCs, scale)."""
    return [
        ("se pool", memory_cost(hw, units_elems * cw)),
        ("se fc1", fc_cost(hw, n, cw, b.se_channels)),
        ("se fc2", fc_cost(hw, n, b.se_channels, cw)),
        ("se scale", memory_cost(hw, 2 * units_elems * cw)),
    ]


def _downsample(hw: Hardware, b: BlockSpec, n: int) -> list[tuple[str, OpCost]]:
    if not b.has_downsample:
        return []
    cv = ChainConv("downsample", b.in_channels, b.out_channels, 1, b.stride, 1, False, False)
    return [("downsample", dense_conv(hw, cv, n, b.in_hw, Gate(0, 0)))]


def _active_cw(b: BlockSpec, gate: Gate) -> int:
    return b.width * gate.active // gate.groups if gate.groups else b.width


def _dense_body(hw: Hardware, b: BlockSpec, n: int, gate: Gate) -> list[tuple[str, OpCost]]:
    """conv chain (+SE) on whole maps of ``n`` samples, channel-gated if ``gate``, + residual add."""
    if n <= 0:
        return []
    ops = []
    chain, maps = _chain(b), _chain_maps(b)
    for cv, m in zip(chain, maps):
        ops.append((cv.name, dense_conv(hw, cv, n, m, gate)))
        if b.se_channels and cv.name == "conv2":
            ops += _se(hw, b, n * b.out_hw[0] * b.out_hw[1], n, _active_cw(b, gate))
    out_elems = n * b.out_channels * b.out_hw[0] * b.out_hw[1]
    ops.append(("residual add", memory_cost(hw, 3 * out_elems)))
    return ops


def _spatial_body(
    hw: Hardware, b: BlockSpec, n: int, st: StageConfig, gate: Gate, fused: bool
) -> list[tuple[str, OpCost]]:
    S = st.spatial_granularity
    gh, gw = b.out_hw[0] // S, b.out_hw[1] // S  # mask grid
    patches = max(1, math.ceil(st.rate * gh * gw - 1e-9))  # active patches per sample
    chain, maps = _chain(b), _chain_maps(b)
    # Output side of each conv on a patch: walk back from the block output (S x S).
    sides = [S] * len(chain)
    for j in range(len(chain) - 1, 0, -1):
        sides[j - 1] = (sides[j] - 1) * chain[j].stride + chain[j].k
    ops: list[tuple[str, OpCost]] = []
    if fused:
        first = chain[0]
        ops.append((f"{first.name} (dense, + masker channel)", dense_conv(hw, first, n, maps[0], gate, extra_out=1)))
        ops.append(("masker pool + indices", memory_cost(hw, n * maps[1][0] * maps[1][1] + 2 * n * gh * gw)))
        start, src = 1, maps[1]
    else:
        start, src = 0, maps[0]
    for j in range(start, len(chain)):
        cv = chain[j]
        label = f"{cv.name} (gathered {cv.k}x{cv.k})"
        ops.append((label, _gathered_conv(hw, cv, n, patches, sides[j], src, gate)))
        src = None  # later convs read the contiguous gathered buffer
        if b.se_channels and cv.name == "conv2":
            ops += _se(hw, b, n * patches * S * S, n, _active_cw(b, gate))
    out_active = n * patches * S * S * b.out_channels
    ops.append(("scatter-add + residual", memory_cost(hw, 3 * out_active)))
    return ops


def _spatial_masker(hw: Hardware, b: BlockSpec, n: int, st: StageConfig) -> list[tuple[str, OpCost]]:
    S = st.spatial_granularity
    gh, gw = b.out_hw[0] // S, b.out_hw[1] // S
    pooled = n * b.in_channels * gh * gw
    mask = conv_cost(hw, ConvOp(n, b.in_channels, 2, gh, gw, 1, 1, 1, gw, gh * gw, b.in_channels, 0, 0, False))
    return [
        ("masker pool", memory_cost(hw, n * b.in_channels * b.in_hw[0] * b.in_hw[1] + pooled)),
        ("masker conv", mask),
        ("masker indices", memory_cost(hw, 2 * n * gh * gw)),
    ]


@functools.lru_cache(maxsize=None)
def block_alternatives(hw: Hardware, b: BlockSpec, st: StageConfig, n: int) -> tuple[tuple[str, Ops], ...]:
    """Every (masker placement, ops) one block of ``n`` samples can run as under stage choice
    ``st``: a spatial gate's two masker placements ("fused into conv1" first), else one."""
    if b.kind == "dense":
        from dynas.predictors.dense_cost import dense_alternatives  # it builds on this module's pieces

        return dense_alternatives(hw, b, st, n)
    p = st.paradigm
    gate = gate_of(b, st)
    if p == "static":
        return (("none", tuple(_downsample(hw, b, n) + _dense_body(hw, b, n, gate))),)
    if p == "channel":
        masker = channel_masker(hw, b, n, 2 * gate.groups)
        return (("separate", tuple(masker + _downsample(hw, b, n) + _dense_body(hw, b, n, gate))),)
    if uses_layer(p):
        outputs = 2 + (2 * gate.groups if gate.groups else 0)
        masker = channel_masker(hw, b, n, outputs)
        executed = st.rate * n  # expected executed samples
        lo, hi = math.floor(executed), math.ceil(executed)
        body = interpolate(_dense_body(hw, b, lo, gate), _dense_body(hw, b, hi, gate), executed - lo)
        return (("separate", tuple(masker + _downsample(hw, b, n) + body)),)
    chan = channel_masker(hw, b, n, 2 * gate.groups, pool=False) if gate.groups else []
    fused = chan + _spatial_body(hw, b, n, st, gate, fused=True)
    separate = _spatial_masker(hw, b, n, st) + chan + _spatial_body(hw, b, n, st, gate, fused=False)
    ds = _downsample(hw, b, n)
    return ("fused into conv1", tuple(ds + fused)), ("separate", tuple(ds + separate))


@functools.lru_cache(maxsize=None)
def block_ops(hw: Hardware, b: BlockSpec, st: StageConfig, n: int) -> tuple[str, Ops]:
    """(masker placement, ops) of one block of ``n`` samples under stage choice ``st``: the
    faster of :func:`block_alternatives` (fused into conv1 on a tie)."""
    alts = block_alternatives(hw, b, st, n)
    if len(alts) == 1:
        return alts[0]
    nds = int(b.has_downsample)  # both start with the downsample; compare the rest, as they differ
    return alts[0] if ops_total_s(alts[0][1][nds:]) <= ops_total_s(alts[1][1][nds:]) else alts[1]


@functools.lru_cache(maxsize=None)
def block_energy_mj(hw: Hardware, energy: EnergyConstants, b: BlockSpec, st: StageConfig, n: int) -> float:
    """Energy (mJ) of one block of ``n`` samples, constant power over its latency included, run
    as the one of :func:`block_alternatives` that costs the least energy (which need not be the
    fastest: a placement tuned for energy; each is non-decreasing in every rate, so is the least)."""
    return min(
        ops_energy_mj(ops, energy) + static_energy_mj(ops_total_s(ops) * 1e3, energy)
        for _, ops in block_alternatives(hw, b, st, n)
    )


def block_key(b: BlockSpec) -> BlockSpec:
    """Blocks with equal shapes share cost; drop position fields so the memo is shared (a dense
    layer's index stays: which earlier layers' features it reads depends on it)."""
    return BlockSpec(
        0,
        b.index if b.kind == "dense" else 0,
        b.kind,
        b.in_channels,
        b.width,
        b.out_channels,
        b.stride,
        b.groups,
        b.se_channels,
        b.in_hw,
        b.out_hw,
        b.has_downsample,
    )


@functools.lru_cache(maxsize=None)
def stem_head_ops(
    hw: Hardware, stem: StemSpec, head_in: int, head_hw: tuple[int, int], classes: int, n: int, head_norm: bool = False
) -> tuple[Ops, Ops]:
    cv = ChainConv("stem conv", stem.in_channels, stem.out_channels, stem.kernel, stem.stride, 1, False, False)
    stem_ops = [("stem conv", dense_conv(hw, cv, n, _in_hw_of_stem(stem), Gate(0, 0)))]
    if stem.maxpool:
        ch, cw = stem.conv_out_hw
        stem_ops.append(
            ("stem maxpool", memory_cost(hw, n * stem.out_channels * (ch * cw + stem.out_hw[0] * stem.out_hw[1])))
        )
    head_ops = [
        ("global pool", memory_cost(hw, n * head_in * (head_hw[0] * head_hw[1] + 1))),
        ("fc", fc_cost(hw, n, head_in, classes)),
    ]
    if head_norm:  # DenseNet's norm5 + ReLU before the pool
        head_ops.insert(0, ("head norm relu", memory_cost(hw, 2 * n * head_in * head_hw[0] * head_hw[1])))
    return tuple(stem_ops), tuple(head_ops)


def _in_hw_of_stem(stem: StemSpec) -> tuple[int, int]:
    # Invert conv_out for the stem conv: the input map that gives conv_out_hw (exact for our specs).
    return tuple((o - 1) * stem.stride + stem.kernel - 2 * stem.padding for o in stem.conv_out_hw)  # type: ignore[return-value]
