"""Whole-network latency prediction of a dynamic architecture on a target.

On a GPU target a block's latency is the sum of its operators (``predictors/gpu.py``), which
:mod:`dynas.predictors.gpu_blocks` lists per paradigm (LAUDNet's inference kernels, Han et al.,
TPAMI 2024); a stage adds its blocks, a network its stages, stem and head.  On a measured
("cpu") target each part's work (``predictors/cpu.py``; DenseNet's layers ``predictors/cpu_dense.py``)
is priced by the target's fitted costs.

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
from typing import Any, Mapping

import numpy as np

from dynas.errors import ConfigError, TargetError
from dynas.predictors import cpu, cpu_dense, gpu
from dynas.predictors.conv_chain import ops_total_s
from dynas.predictors.energy import EnergyConstants, ops_energy_mj, static_energy_mj
from dynas.predictors.exits import attach_exits, gpu_head_cost, gpu_head_ops
from dynas.predictors.gpu import Hardware
from dynas.predictors.gpu_blocks import Ops, block_alternatives, block_energy_mj, block_key, block_ops, stem_head_ops
from dynas.predictors.result import OpPrediction, Prediction, StagePrediction
from dynas.predictors.targets import HardwareTarget, load_target
from dynas.spaces.backbones import BackboneSpec, BlockSpec, get_backbone
from dynas.spaces.config import ArchConfig, StageConfig, load_config, stage_runs

__all__ = [
    "predict",
    "predict_blocks",
    "stage_work",
    "block_works",
    "clear_caches",
]

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
        out.append(tuple(ops_total_s(block_ops(hw, block_key(b), st, n)[1]) * 1e3 for b in spec.stage_blocks(s)))
    return tuple(out)


def _network(
    cfg: ArchConfig,
    tgt: HardwareTarget,
    n: int,
    stem_ms: float,
    head_ms: float,
    stages: tuple[StagePrediction, ...],
    **energy: Any,
) -> Prediction:
    """The network's prediction from its stem, head and stages (GPU and measured targets alike)."""
    flops = _dense_flops_per_op(cfg.spec)
    dyn_ms = stem_ms + head_ms + sum(p.latency_ms for p in stages)
    sta_ms = stem_ms + head_ms + sum(p.static_latency_ms for p in stages)
    return Prediction(
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
        expected_gflops=(flops.stem_flops + flops.head_flops) / 1e9 + sum(p.expected_gflops for p in stages),
        stages=stages,
        **energy,
    )


@functools.lru_cache(maxsize=4096)
def _predict(cfg: ArchConfig, tgt: HardwareTarget, n: int) -> Prediction:
    if tgt.kind == "cpu":
        return _predict_cpu(cfg, tgt, n)
    hw = _hw(tgt)
    spec = cfg.spec
    stem_ops, head_ops = stem_head_ops(
        hw, spec.stem, spec.head_in, spec.blocks[-1].out_hw, spec.num_classes, n, spec.head_norm
    )
    stem_s, head_s = ops_total_s(stem_ops), ops_total_s(head_ops)
    flops = _dense_flops_per_op(spec)
    stages = tuple(_stage(hw, tgt.energy, spec.name, spec.input_hw, s, st, n) for s, st in enumerate(cfg.stages))
    energy = _network_energy(tgt.energy, stem_ops, head_ops, stem_s * 1e3, head_s * 1e3, stages, n)
    pred = _network(cfg, tgt, n, stem_s * 1e3, head_s * 1e3, stages, **energy)
    return attach_exits(
        pred, flops.stem_flops, lambda cin, m, w: gpu_head_cost(hw, tgt.energy, cin, m, spec.num_classes, n, w)
    )


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
        key = block_key(b)
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
    head_ms = float(cpu.head_work(spec.head_in, spec.blocks[-1].out_hw, spec.num_classes, n, spec.head_norm) @ cost)
    runs = stage_runs(cfg)
    stages = tuple(
        _stage_cpu(tgt.cpu, tgt.column_block, spec.name, spec.input_hw, s, st, n, runs[s])
        for s, st in enumerate(cfg.stages)
    )
    _check_exercised(tgt, cfg, n, runs)
    flops = _dense_flops_per_op(spec)
    pred = _network(cfg, tgt, n, stem_ms, head_ms, stages)
    return attach_exits(
        pred,
        flops.stem_flops,
        lambda cin, m, w: (float(cpu.exit_head_work(cin, m, spec.num_classes, n, w) @ cost), None),
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
    entry = cpu.stage_entry_work(st)
    if blocks[0].kind == "dense":  # a dense block's layers (predictors/cpu_dense.py)
        works = [cpu_dense.layer_work(block_key(b), len(blocks), st, n, runs, column_block) for b in blocks]
    else:
        run_prob = runs / len(blocks) if runs is not None else 1.0
        works = [cpu.block_work(block_key(b), st, n, run_prob, column_block) for b in blocks]
    return [work + (entry if i == 0 else 0.0) for i, work in enumerate(works)]


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
    if blocks[0].kind == "dense":
        exp_gf = sum(
            cpu_dense.expected_layer_flops(b, st, flops.block_flops(b.name), len(blocks), runs) for b in blocks
        )
    else:
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
        stem_head_ops,
        _stage,
        _predict,
        cpu.block_work,
        cpu_dense.layer_work,
        cpu.stage_entry_work,
        cpu.stem_work,
        cpu.head_work,
        _stage_cpu,
        stage_work,
        cpu.exit_head_work,
        gpu_head_ops,
    ):
        fn.cache_clear()
