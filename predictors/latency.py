"""Whole-network latency prediction of a dynamic architecture on a GPU target.

A block's latency is the sum of its operators (``predictors/gpu.py``).  How each paradigm
decomposes a block (LAUDNet's inference kernels, anchors section 2):

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

Rates are budget-mode rates (exactly the configured fraction per sample), so predictions are
deterministic.  Every result is memoized per (target, block shape, stage choice, batch).

On a target with an ``[energy]`` table every stage, the stem, the head and the whole network
also get an energy: their operators' FLOPs and DRAM bytes priced by :mod:`dynas.predictors.energy`
plus the constant power over their latency.  A block with a spatial gate is priced at the masker
placement that costs it the least energy (``block_energy_mj``); ``masker`` and the op breakdown
are the fastest placement's, which the latency is.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import numpy as np

from dynas.errors import ConfigError, TargetError
from dynas.predictors import cpu, gpu
from dynas.predictors.conv_chain import ChainConv, Gate, channel_masker, dense_conv, gate_of, interpolate, ops_total_s
from dynas.predictors.energy import EnergyConstants, ops_energy_mj, static_energy_mj
from dynas.predictors.exits import attach_exits, gpu_head_ms
from dynas.predictors.gpu import ConvOp, Hardware, OpCost, conv_cost, fc_cost, memory_cost
from dynas.predictors.result import OpPrediction, Prediction, StagePrediction
from dynas.predictors.targets import HardwareTarget, load_target
from dynas.spaces.backbones import BackboneSpec, BlockSpec, StemSpec, get_backbone
from dynas.spaces.config import ArchConfig, StageConfig, load_config, stage_runs, uses_layer

__all__ = [
    "predict",
    "predict_blocks",
    "block_ops",
    "block_alternatives",
    "block_energy_mj",
    "stage_work",
    "block_works",
    "clear_caches",
    "Ops",
    "ChainConv",
    "Gate",
    "gate_of",
    "dense_conv",
    "channel_masker",
    "interpolate",
    "ops_total_s",
]

Ops = tuple[tuple[str, OpCost], ...]
_STATIC = StageConfig()


def _hw(target: HardwareTarget) -> Hardware:
    return Hardware(
        target.n_sm,
        target.lanes_per_sm,
        target.clock_hz,
        target.dram_bandwidth_Bps,
        target.l2_speed_frac,
        target.fp32_cycles,
        target.mem_transaction_floats,
        target.launch_us,
        target.bytes_per_element,
    )


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
    cin_active = cv.cin
    if cv.gate_in and gate.groups:
        cin_active = cv.cin * gate.active // gate.groups
    gated_out = cv.gate_out and gate.groups
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
            cin_active=cin_active,
            gate_groups=gate.groups if gated_out else 0,
            gate_active=gate.active if gated_out else 0,
            weights_scale_with_gates=n == 1 and bool(gate.groups),
            channels_last=True,
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


def _block_key(b: BlockSpec) -> BlockSpec:
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
def _stem_head(
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


def _batch(batch_size: Any, target: HardwareTarget) -> int:
    if batch_size is None:
        return target.default_batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is not allowed; allowed: a positive integer")
    return batch_size


def _dense_flops_per_op(spec: BackboneSpec):
    from dynas.predictors.flops import dense_flops  # torch import only when FLOPs are asked for

    return dense_flops(spec.name, spec.input_hw)


def predict(
    config: "ArchConfig | Mapping[str, Any] | str", target: "str | HardwareTarget", batch_size: int | None = None
) -> Prediction:
    """Predict the latency of ``config`` on ``target`` for one forward pass of ``batch_size`` images.

    ``config``: an :class:`ArchConfig`, a dict, a JSON string or a JSON file path (exported files
    included).  ``target``: a built-in target name or a target TOML path.  ``batch_size`` defaults
    to the target's.
    """
    cfg = load_config(config)
    tgt = load_target(target)
    n = _batch(batch_size, tgt)
    return _predict(cfg, tgt, n)


def predict_blocks(
    config: "ArchConfig | Mapping[str, Any] | str", target: "str | HardwareTarget", batch_size: int | None = None
) -> tuple[tuple[float, ...], ...]:
    """[stage][block] predicted latency (ms) of every block of ``config`` (arguments as
    :func:`predict`); each stage's blocks add up to that stage's ``latency_ms``.

    A block with a per-sample gate (layer gates, whole-map spatial gates) is predicted at its
    expected cost over the random choice of which blocks of its stage run."""
    cfg = load_config(config)
    tgt = load_target(target)
    n = _batch(batch_size, tgt)
    spec = cfg.spec
    out = []
    if tgt.kind == "cpu":
        assert tgt.cpu is not None
        cost = tgt.cpu.vector_ms()  # [terms] ms per unit
        for s, (st, runs) in enumerate(zip(cfg.stages, stage_runs(cfg))):
            works = block_works(spec.name, spec.input_hw, s, st, n, runs, tgt.column_block)  # [blocks][terms]
            out.append(tuple(float(w @ cost) for w in works))
        return tuple(out)
    hw = _hw(tgt)
    for s, st in enumerate(cfg.stages):
        out.append(tuple(ops_total_s(block_ops(hw, _block_key(b), st, n)[1]) * 1e3 for b in spec.stage_blocks(s)))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _predict(cfg: ArchConfig, tgt: HardwareTarget, n: int) -> Prediction:
    if tgt.kind == "cpu":
        return _predict_cpu(cfg, tgt, n)
    hw = _hw(tgt)
    spec = cfg.spec
    stem_ops, head_ops = _stem_head(
        hw, spec.stem, spec.head_in, spec.blocks[-1].out_hw, spec.num_classes, n, spec.head_norm
    )
    stem_s, head_s = ops_total_s(stem_ops), ops_total_s(head_ops)
    flops = _dense_flops_per_op(spec)
    stages = tuple(_stage(hw, tgt.energy, spec.name, spec.input_hw, s, st, n) for s, st in enumerate(cfg.stages))
    dyn_ms = (stem_s + head_s) * 1e3 + sum(p.latency_ms for p in stages)
    sta_ms = (stem_s + head_s) * 1e3 + sum(p.static_latency_ms for p in stages)
    expected = (flops.stem_flops + flops.head_flops) / 1e9 + sum(p.expected_gflops for p in stages)
    pred = Prediction(
        config=cfg,
        target=tgt.name,
        batch_size=n,
        latency_ms=dyn_ms,
        latency_ms_per_image=dyn_ms / n,
        static_latency_ms=sta_ms,
        static_latency_ms_per_image=sta_ms / n,
        speedup=sta_ms / dyn_ms,
        latency_ratio=dyn_ms / sta_ms,
        stem_ms=stem_s * 1e3,
        head_ms=head_s * 1e3,
        dense_gflops=flops.total_flops / 1e9,
        expected_gflops=expected,
        stages=stages,
        **_network_energy(tgt.energy, stem_ops, head_ops, stem_s * 1e3, head_s * 1e3, stages, n),
    )
    return attach_exits(pred, flops.stem_flops, lambda cin, m, w: gpu_head_ms(hw, cin, m, spec.num_classes, n, w))


def _network_energy(
    energy: EnergyConstants | None,
    stem_ops: Ops,
    head_ops: Ops,
    stem_ms: float,
    head_ms: float,
    stages: tuple[StagePrediction, ...],
    n: int,
) -> dict[str, float]:
    """The energy fields of a Prediction (none without energy constants: they stay None)."""
    if energy is None:
        return {}
    stem = ops_energy_mj(stem_ops, energy) + static_energy_mj(stem_ms, energy)
    head = ops_energy_mj(head_ops, energy) + static_energy_mj(head_ms, energy)
    dyn = stem + head + sum(p.energy_mj for p in stages)  # type: ignore[misc]  # set with energy
    sta = stem + head + sum(p.static_energy_mj for p in stages)  # type: ignore[misc]
    return dict(
        energy_mj=dyn,
        energy_mj_per_image=dyn / n,
        static_energy_mj=sta,
        static_energy_mj_per_image=sta / n,
        stem_energy_mj=stem,
        head_energy_mj=head,
    )


@functools.lru_cache(maxsize=65536)
def _stage(
    hw: Hardware,
    energy: EnergyConstants | None,
    backbone: str,
    input_hw: tuple[int, int],
    s: int,
    st: StageConfig,
    n: int,
) -> StagePrediction:
    """One stage's prediction (with energy when ``energy`` is given); memoized (by name, not by
    the spec, which is slow to hash)."""
    spec = get_backbone(backbone, input_hw)
    flops = _dense_flops_per_op(spec)
    agg: dict[str, list[float]] = {}
    sched: dict[str, str] = {}
    lat = sta = dense_gf = exp_gf = e_mj = e_static_mj = 0.0
    masker = "none"
    # Blocks with equal shapes cost the same: visit each distinct shape once, with its count.
    distinct: dict[BlockSpec, tuple[BlockSpec, int]] = {}
    for b in spec.stage_blocks(s):
        key = _block_key(b)
        first, count = distinct.get(key, (b, 0))
        distinct[key] = (first, count + 1)
    for key, (b, count) in distinct.items():
        masker, ops = block_ops(hw, key, st, n)
        static_ops = block_ops(hw, key, _STATIC, n)[1]
        block_flops = flops.block_flops(b.name)
        dense_gf += count * sum(block_flops.values())
        exp_gf += count * _expected_block_flops(ops, {name: c.macs for name, c in static_ops}, block_flops, n)
        for name, c in ops:
            a = agg.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            a[0] += count * c.total_s
            a[1] += count * c.compute_s
            a[2] += count * c.memory_s
            a[3] += count * c.launch_s
            sched.setdefault(name, c.schedule)
        lat += count * ops_total_s(ops)
        sta += count * ops_total_s(static_ops)
        if energy is not None:
            e_mj += count * block_energy_mj(hw, energy, key, st, n)
            e_static_mj += count * block_energy_mj(hw, energy, key, _STATIC, n)
    op_preds = tuple(
        OpPrediction(name, a[0] * 1e3, a[1] * 1e3, a[2] * 1e3, a[3] * 1e3, sched[name]) for name, a in agg.items()
    )
    compute = sum(o.compute_ms for o in op_preds)
    memory = sum(o.memory_ms for o in op_preds)
    joules: dict[str, float] = {}
    if energy is not None:
        joules = dict(energy_mj=e_mj, energy_mj_per_image=e_mj / n, static_energy_mj=e_static_mj)
    return StagePrediction(
        stage=s,
        choice=st.short(),
        blocks=spec.stage_depth(s),
        latency_ms=lat * 1e3,
        static_latency_ms=sta * 1e3,
        compute_ms=compute,
        memory_ms=memory,
        launch_ms=sum(o.launch_ms for o in op_preds),
        bound="compute" if compute >= memory else "memory",
        masker=masker,
        dense_gflops=dense_gf / 1e9,
        expected_gflops=exp_gf / 1e9,
        ops=op_preds,
        **joules,
    )


def _expected_block_flops(ops: Ops, static_macs: dict[str, float], block_flops: dict[str, float], n: int) -> float:
    """Per-image expected FLOPs of a block.

    Dense FLOPs of the convs (conv1..3, downsample) come from torch's flop counter; each one's
    executed fraction is its executed MACs over the static op's MACs in the latency model.  Ops
    without a dense twin (maskers, SE layers) add their own executed MACs x 2.
    """
    total = 0.0
    for name, c in ops:
        base = name.split(" ")[0]
        if base in _MAIN_OPS and static_macs.get(base, 0.0) > 0:
            total += block_flops[base] * c.macs / static_macs[base]
        else:
            total += 2.0 * c.macs / n
    return total


_MAIN_OPS = ("conv1", "conv2", "conv3", "downsample")


# ----------------------------------------------------------------------------- measured ("cpu") targets


def _predict_cpu(cfg: ArchConfig, tgt: HardwareTarget, n: int) -> Prediction:
    """Prediction on a calibrated target: work of each part (``predictors/cpu.py``) x fitted costs."""
    assert tgt.cpu is not None
    spec = cfg.spec
    cost = tgt.cpu.vector_ms()
    stem_ms = float(cpu.stem_work(spec.stem, spec.input_hw, n) @ cost)
    head_ms = float(cpu.head_work(spec.head_in, spec.blocks[-1].out_hw, spec.num_classes, n) @ cost)
    runs = stage_runs(cfg)
    stages = tuple(
        _stage_cpu(tgt.cpu, tgt.column_block, spec.name, spec.input_hw, s, st, n, runs[s])
        for s, st in enumerate(cfg.stages)
    )
    _check_exercised(tgt, cfg, n, runs)
    flops = _dense_flops_per_op(spec)
    dyn_ms = stem_ms + head_ms + sum(p.latency_ms for p in stages)
    sta_ms = stem_ms + head_ms + sum(p.static_latency_ms for p in stages)
    expected = (flops.stem_flops + flops.head_flops) / 1e9 + sum(p.expected_gflops for p in stages)
    pred = Prediction(
        config=cfg,
        target=tgt.name,
        batch_size=n,
        latency_ms=dyn_ms,
        latency_ms_per_image=dyn_ms / n,
        static_latency_ms=sta_ms,
        static_latency_ms_per_image=sta_ms / n,
        speedup=sta_ms / dyn_ms,
        latency_ratio=dyn_ms / sta_ms,
        stem_ms=stem_ms,
        head_ms=head_ms,
        dense_gflops=flops.total_flops / 1e9,
        expected_gflops=expected,
        stages=stages,
    )
    return attach_exits(
        pred, flops.stem_flops, lambda cin, m, w: float(cpu.exit_head_work(cin, m, spec.num_classes, n, w) @ cost)
    )


def _check_exercised(tgt: HardwareTarget, cfg: ArchConfig, n: int, runs: tuple[int | None, ...]) -> None:
    """A calibrated target knows nothing of work its calibration never ran (its cost is 0)."""
    missing = tgt.unexercised
    if not missing:
        return
    spec = cfg.spec
    for s, st in enumerate(cfg.stages):
        work = stage_work(spec.name, spec.input_hw, s, st, n, runs[s], tgt.column_block)
        for f in missing:
            if work[cpu.COST_FIELDS.index(f)] > 0:
                raise TargetError(
                    f"target {tgt.name!r} was never calibrated on {cpu.TERMS[cpu.COST_FIELDS.index(f)]} work, which stage "
                    f"{s} ({st.short()}) of {spec.name} needs; allowed: configs of backbones like those it was calibrated "
                    f"on ({tgt.environment.get('backbones', '?')}), or re-run dynas calibrate with more --backbones"
                )


@functools.lru_cache(maxsize=65536)
def stage_work(
    backbone: str, input_hw: tuple[int, int], s: int, st: StageConfig, n: int, runs: int | None, column_block: int = 1
) -> np.ndarray:
    """[terms] work of stage ``s`` under ``st`` (``runs``: per-sample block quota, see stage_runs;
    ``column_block``: the target's, see :func:`dynas.predictors.cpu.block_work`)."""
    work = sum(block_works(backbone, input_hw, s, st, n, runs, column_block))
    work.setflags(write=False)  # memoized and shared
    return work


def block_works(
    backbone: str, input_hw: tuple[int, int], s: int, st: StageConfig, n: int, runs: int | None, column_block: int
) -> list[np.ndarray]:
    """[blocks][terms] work of each block of stage ``s`` (arguments as :func:`stage_work`), the
    stage's own work (:func:`dynas.predictors.cpu.stage_entry_work`) on its first block, where
    it is spent."""
    blocks = get_backbone(backbone, input_hw).stage_blocks(s)
    if blocks[0].kind == "dense":
        raise TargetError(
            f"backbone={backbone!r} has no CPU work model (the calibrated CPU model counts the residual "
            "blocks' kernels, not the dense layers' of kernels/dense.py); allowed: DenseNet on GPU targets, "
            "ResNet and RegNet on CPU targets"
        )
    run_prob = runs / len(blocks) if runs is not None else 1.0
    entry = cpu.stage_entry_work(st)
    return [
        cpu.block_work(_block_key(b), st, n, run_prob, column_block) + (entry if i == 0 else 0.0)
        for i, b in enumerate(blocks)
    ]


@functools.lru_cache(maxsize=65536)
def _stage_cpu(
    costs: "cpu.CpuCosts",
    column_block: int,
    backbone: str,
    input_hw: tuple[int, int],
    s: int,
    st: StageConfig,
    n: int,
    runs: int | None,
) -> StagePrediction:
    spec = get_backbone(backbone, input_hw)
    flops = _dense_flops_per_op(spec)
    blocks = spec.stage_blocks(s)
    run_prob = runs / len(blocks) if runs is not None else 1.0
    work = stage_work(backbone, input_hw, s, st, n, runs, column_block)  # [terms], whole stage
    static = stage_work(backbone, input_hw, s, _STATIC, n, None, column_block)
    per_term = work * costs.vector_ms()  # [terms] ms
    kinds = cpu.TERM_KINDS  # [compute/memory/calls, terms] 0/1
    ops = tuple(
        OpPrediction(term, float(ms), *(float(ms * kinds[r, i]) for r in range(3)), "")
        for i, (term, ms) in enumerate(zip(cpu.TERMS, per_term))
        if ms > 0
    )
    compute, memory, launch = (float(v) for v in kinds @ per_term)
    dense_gf = sum(sum(flops.block_flops(b.name).values()) for b in blocks)
    exp_gf = sum(cpu.expected_block_flops(b, st, flops.block_flops(b.name), run_prob) for b in blocks)
    return StagePrediction(
        stage=s,
        choice=st.short(),
        blocks=len(blocks),
        latency_ms=float(per_term.sum()),
        static_latency_ms=float(static @ costs.vector_ms()),
        compute_ms=compute,
        memory_ms=memory,
        launch_ms=launch,
        bound="compute" if compute >= memory else "memory",
        masker="none" if st.paradigm == "static" else "separate",
        dense_gflops=dense_gf / 1e9,
        expected_gflops=exp_gf / 1e9,
        ops=ops,
    )


def clear_caches() -> None:
    """Drop every memoized operator, block and network result (benchmarks, calibration)."""
    from dynas.predictors.dense_cost import dense_alternatives

    gpu.clear_caches()
    dense_alternatives.cache_clear()
    for fn in (
        block_alternatives,
        block_energy_mj,
        block_ops,
        _stem_head,
        _stage,
        _predict,
        cpu.block_work,
        cpu.stage_entry_work,
        cpu.stem_work,
        cpu.head_work,
        _stage_cpu,
        stage_work,
        cpu.exit_head_work,
        gpu_head_ms,
    ):
        fn.cache_clear()
