"""Property-based tests: config and target-file round trips, and the latency predictor's invariants
on every built-in target and on the calibrated CPU targets ``tests/data/cpu-2core-dec01-ops``
and ``cpu-2core-dec01-night`` (the kernels before and after the basic block's row-gathered conv2).

The config JSON round trip itself is ``test_spaces.py::test_json_round_trip``; here the round
trips are the ones a user goes through besides it (a prediction's JSON back to a config, an
exported file, a target file written by ``dynas calibrate`` read back).

Invariants of a prediction:

* finite and positive, and its breakdown adds up (stages + stem + head = total; ops = stage); on
  a target with energy prices, so does its energy (more in ``test_energy.py``), else it has none;
* non-decreasing in each stage's rate and channel rate, everything else fixed.  On a GPU target
  this holds everywhere.  The calibrated CPU model walks the real kernels, which are faster in
  four places where more work is *on*, so there the property is checked off those places:
  (1) batch > 1: when every sample selects the same channels (all groups on) or runs every
  block, the kernels run the batch whole instead of gathering per selection; (2) layer gates
  (and whole-map spatial gates) in more than one stage: a sample's blocks are rounded with the
  remainder carried to the next stage (``spaces.config.stage_runs``), so raising one stage's
  rate can take a block from a later stage; (3) RegNetY with every channel group of a stage
  on: the grouped 3x3 conv skips its zero-filled copy; (4) spatial rates, patch by patch: a
  row product's row count grows with the active patches, and the kernels run it folded into a
  1x1 convolution from ``FOLD_MIN_ROWS`` rows and ``FOLD_MIN_MACS`` multiply-accumulates, and
  zero-pad its rows to a multiple of 8 unless 8 or 7 divides them (``kernels.convs.row_product``), so one
  more patch can switch a product to the faster path or save a padding copy (a stage of
  RegNetY-400MF with every 1x1 patch on runs without the copies it makes with 31/32 of them).
  (5) channel rates of bottleneck stages: conv1 and conv3 on the selected channels are row
  products whose multiply-accumulates grow with the channels, and crossing ``FOLD_MIN_MACS``
  runs one folded, which can be faster (by up to 0.9 % of a ResNet-50 at 128x96 on
  ``cpu-2core-dec01-night``, 0.2 % on ``-ops``, found by scanning every rate in steps of 1/32).
  So the CPU strategies draw batch 1, at most one per-sample-gated stage, no full channel
  selection on RegNetY, vary no spatial rate of a stage with more than one patch, and compare
  two rates only when the stage runs the same row products unfolded at both.
* rate 1 is static plus the gates' own cost.  On a GPU target, a stage whose gate is a layer
  or channel gate (or both) at rate 1 (channel rate 1) predicts exactly its static latency plus
  the latency of its ``masker ...`` ops in the breakdown.  Spatial gates have no such relation:
  at rate 1 they still gather every patch with its halo and scatter it back, which can cost
  more or less than the dense convs they replace.  On the calibrated CPU target the breakdown
  is by work term, not by op; there a layer gate at rate 1 costs exactly the masker's work plus
  three index ops per block, plus (RegNetY) the dynamic path's squeeze-excitation as F.linear
  instead of the static module's 1x1 convs, plus one cold start of the stage's dynamic path.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dynas.predictors import cpu
from dynas.predictors.energy import EnergyConstants
from dynas.predictors.latency import predict
from dynas.predictors.targets import HardwareTarget, list_targets, load_target, write_target
from dynas.spaces.backbones import get_backbone, list_backbones
from dynas.spaces.config import (
    PARADIGMS,
    ArchConfig,
    StageConfig,
    budget_count,
    channel_granularities,
    load_config,
    spatial_granularities,
    stage_gate_kind,
    stage_runs,
    uses_channel,
    uses_spatial,
)

_DATA = Path(__file__).resolve().parent / "data"
CPU_TARGET = str(_DATA / "cpu-2core-dec01-ops" / "cpu-2core-dec01-ops.toml")
CPU_TARGETS = [
    CPU_TARGET,
    str(_DATA / "cpu-2core-dec01-night" / "cpu-2core-dec01-night.toml"),
    str(_DATA / "cpu-2core-dec02-padonce" / "cpu-2core-dec02-padonce.toml"),
]
GPU_TARGETS = list_targets()
ALL_TARGETS = GPU_TARGETS + CPU_TARGETS
BACKBONES = list_backbones()
#: backbones the properties are drawn from on CPU targets (DenseNet's CPU model: tests/test_cpu_work_dense.py)
CPU_BACKBONES = [b for b in BACKBONES if get_backbone(b).family != "densenet"]
SIZES = [224, 160, 64, (97, 113), (128, 96)]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

rates = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)


def _target_id(t: str) -> str:
    return Path(t).stem


def _stage(draw, spec, i: int, paradigm: str, rate=None, channel_rate=None) -> StageConfig:
    if paradigm == "static":
        return StageConfig()
    return StageConfig(
        paradigm=paradigm,
        rate=draw(rates) if rate is None else rate,
        spatial_granularity=draw(st.sampled_from(spatial_granularities(spec, i))) if uses_spatial(paradigm) else None,
        channel_granularity=draw(st.sampled_from(channel_granularities(spec, i))) if uses_channel(paradigm) else None,
        channel_rate=(draw(rates) if channel_rate is None else channel_rate) if "+" in paradigm else None,
    )


@st.composite
def configs(draw, paradigms=PARADIGMS, rate=None, channel_rate=None, target=None) -> ArchConfig:
    """A config of a drawn backbone (one ``target`` covers, if given) using ``paradigms`` where the backbone offers them."""
    backbone = draw(st.sampled_from(CPU_BACKBONES if target in CPU_TARGETS else BACKBONES))
    spec = get_backbone(backbone, draw(st.sampled_from(SIZES)))
    offered = [p for p in paradigms if p in spec.paradigms] or ["static"]
    stages = tuple(
        _stage(draw, spec, i, draw(st.sampled_from(offered)), rate, channel_rate) for i in range(spec.num_stages)
    )
    return ArchConfig(backbone, spec.input_hw, stages)


def _batch(draw, target: str) -> int:
    if target in CPU_TARGETS:
        return draw(st.integers(1, 8))  # the CPU model sums over every count of running samples
    return draw(st.sampled_from([1, 2, 7, 32, 128, 256]))


# ----------------------------------------------------------------------------- round trips


@SETTINGS
@given(
    cfg=configs(),
    target=st.sampled_from(ALL_TARGETS),
    extra=st.fixed_dictionaries(
        {"batch_size": st.integers(1, 512), "trial": st.integers(0, 10**6), "notes": st.text(max_size=20)}
    ),
)
def test_prediction_json_and_exported_files_load_back_as_the_config(cfg, target, extra):
    assume(target not in CPU_TARGETS or cfg.backbone in CPU_BACKBONES)
    pred = predict(cfg, target, 1)
    printed = json.loads(json.dumps(pred.to_dict()))  # what `dynas predict --json` prints
    assert load_config(printed["config"]) == cfg
    assert printed["stages"][0]["choice"] == cfg.stages[0].short()
    exported = {**cfg.to_dict(), "target": {"name": pred.target}, "predictions": printed, **extra}
    assert load_config(json.dumps(exported)) == cfg


_free_text = st.text(max_size=12)  # any character TOML must escape, control characters and DEL included
_records = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda k: k != "unexercised"),
    st.one_of(
        _free_text, st.integers(-(10**6), 10**6), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
    ),
    max_size=4,
)
_cost = st.floats(min_value=0.0, max_value=1e9, allow_nan=False)
_positive = st.floats(min_value=1e-6, max_value=1e15, allow_nan=False)


@st.composite
def hardware_targets(draw) -> HardwareTarget:
    common = dict(
        name=draw(st.text(min_size=1, max_size=12)),
        description=draw(_free_text),
        default_batch_size=draw(st.integers(1, 4096)),
        sources=draw(st.dictionaries(st.text(min_size=1, max_size=8), _free_text, max_size=3)),
    )
    if draw(st.booleans()):  # measured: the [environment] and [fit] records are the calibration's
        costs = cpu.CpuCosts(*(draw(_cost) for _ in cpu.COST_FIELDS))
        return HardwareTarget(
            kind="cpu",
            cpu=costs,
            threads=draw(st.integers(1, 512)),
            environment=draw(_records),
            fit=draw(_records),
            **common,
        )
    ints = st.integers(1, 10**5)
    return HardwareTarget(
        kind="gpu",
        n_sm=draw(ints),
        lanes_per_sm=draw(ints),
        clock_hz=draw(_positive),
        dram_bandwidth_Bps=draw(_positive),
        l2_speed_frac=draw(_positive),
        fp32_cycles=draw(ints),
        mem_transaction_floats=draw(ints),
        launch_us=draw(_positive),
        bytes_per_element=draw(st.integers(1, 16)),
        energy=draw(st.none() | st.builds(EnergyConstants, _cost, _cost, _cost)),
        **common,
    )


@settings(max_examples=60, deadline=None)
@given(target=hardware_targets())
def test_target_file_round_trip(tmp_path_factory, target):
    path = write_target(target, tmp_path_factory.mktemp("t") / "t.toml")
    back = load_target(str(path))
    assert back == dataclasses.replace(target, path=back.path)
    assert (back.name, back.description) == (target.name, target.description)
    assert (back.environment, back.fit, back.sources) == (target.environment, target.fit, target.sources)


# ----------------------------------------------------------------------------- finite, positive, adds up


def _check_sound(p, n: int) -> None:
    assert p.batch_size == n
    for v in (p.latency_ms, p.static_latency_ms, p.stem_ms, p.head_ms):
        assert math.isfinite(v) and v > 0
    assert p.latency_ms_per_image == pytest.approx(p.latency_ms / n, rel=1e-12)
    assert p.speedup == pytest.approx(p.static_latency_ms / p.latency_ms, rel=1e-12)
    assert p.latency_ms == pytest.approx(p.stem_ms + p.head_ms + sum(s.latency_ms for s in p.stages), rel=1e-9)
    assert p.static_latency_ms == pytest.approx(
        p.stem_ms + p.head_ms + sum(s.static_latency_ms for s in p.stages), rel=1e-9
    )
    for s in p.stages:
        assert math.isfinite(s.latency_ms) and s.latency_ms > 0 and s.static_latency_ms > 0
        assert all(math.isfinite(o.latency_ms) and o.latency_ms >= 0 for o in s.ops)
        assert sum(o.latency_ms for o in s.ops) == pytest.approx(s.latency_ms, rel=1e-9)
    assert math.isfinite(p.expected_gflops) and p.expected_gflops > 0
    energy = load_target(p.target).energy if p.target in GPU_TARGETS else None
    if energy is None:  # no [energy] table (the calibrated CPU targets): unknown, not 0
        assert p.energy_mj is None and all(s.energy_mj is None for s in p.stages)
        return
    assert math.isfinite(p.energy_mj) and p.energy_mj >= energy.static_power_w * p.latency_ms * (1 - 1e-12) > 0
    assert p.energy_mj == pytest.approx(
        p.stem_energy_mj + p.head_energy_mj + sum(s.energy_mj for s in p.stages), rel=1e-9
    )


@pytest.mark.parametrize("target", ALL_TARGETS, ids=_target_id)
@SETTINGS
@given(data=st.data())
def test_prediction_is_finite_positive_and_adds_up(target, data):
    cfg = data.draw(configs(target=target))
    n = _batch(data.draw, target)
    _check_sound(predict(cfg, target, n), n)


# ----------------------------------------------------------------------------- monotone in every rate


def _one_gated_stage(draw, cfg: ArchConfig) -> ArchConfig:
    """``cfg`` with every stage that has a per-sample gate but one (drawn) made a channel stage:
    the calibrated CPU model is monotone with at most one such stage (module docstring)."""
    spec = cfg.spec
    gated = [i for i, x in enumerate(cfg.stages) if stage_gate_kind(spec, i, x) is not None]
    keep = draw(st.sampled_from(gated)) if gated else None
    return dataclasses.replace(
        cfg,
        stages=tuple(
            _stage(draw, spec, i, "channel") if i in gated and i != keep else x for i, x in enumerate(cfg.stages)
        ),
    )


def _cpu_varies(cfg: ArchConfig, s: int, field: str) -> bool:
    """Whether the CPU model is monotone in stage ``s``'s ``field``: not the spatial rate of a
    stage with more than one patch (module docstring, place 4)."""
    st_ = cfg.stages[s]
    return not (field == "rate" and uses_spatial(st_.paradigm) and stage_gate_kind(cfg.spec, s, st_) is None)


def _same_unfolded_products(target: str, low: ArchConfig, high: ArchConfig, s: int) -> bool:
    """Whether stage ``s`` runs as many row products unfolded at batch 1 under ``low`` as under
    ``high`` (place 5: no product crossed the folding threshold)."""
    from dynas.predictors.latency import stage_work

    block = load_target(target).column_block
    calls = [
        stage_work(c.backbone, c.input_size, s, c.stages[s], 1, stage_runs(c)[s], block)[cpu.TERMS.index("mm_calls")]
        for c in (low, high)
    ]
    return calls[0] == calls[1]


def _cpu_below_full(cfg: ArchConfig, s: int, field: str, high: float) -> bool:
    """No full channel selection on RegNetY at ``high`` in the stage that varies (place 3)."""
    spec, st_ = cfg.spec, cfg.stages[s]
    varies_density = uses_channel(st_.paradigm) and (field == "channel_rate" or st_.paradigm == "channel")
    if spec.family != "resnet" and varies_density:
        groups = spec.stage_width(s) // st_.channel_granularity
        return budget_count(high, groups) < groups
    return True


@pytest.mark.parametrize("target", ALL_TARGETS, ids=_target_id)
@SETTINGS
@given(data=st.data())
def test_latency_is_non_decreasing_in_each_stage_rate(target, data):
    cfg = data.draw(configs(paradigms=PARADIGMS[1:], target=target))  # every stage dynamic
    cpu_target = target in CPU_TARGETS
    if cpu_target:
        cfg = _one_gated_stage(data.draw, cfg)
    choices = [
        (s, f)
        for s, x in enumerate(cfg.stages)
        for f in (["rate", "channel_rate"] if "+" in x.paradigm else ["rate"])
        if not cpu_target or _cpu_varies(cfg, s, f)
    ]
    assume(choices)
    s, field = data.draw(st.sampled_from(choices))
    low, high = sorted(data.draw(st.tuples(rates, st.one_of(rates, st.just(1.0)))))
    n = 1 if cpu_target else _batch(data.draw, target)
    if cpu_target:
        assume(_cpu_below_full(cfg, s, field, high))
    at = {
        v: dataclasses.replace(
            cfg, stages=tuple(dataclasses.replace(x, **{field: v}) if i == s else x for i, x in enumerate(cfg.stages))
        )
        for v in (low, high)
    }
    if cpu_target:
        assume(_same_unfolded_products(target, at[low], at[high], s))
    slow, fast = predict(at[high], target, n), predict(at[low], target, n)
    assert slow.latency_ms >= fast.latency_ms * (1 - 1e-12), (at[low].short(), low, high, field, s)
    assert slow.stages[s].latency_ms >= fast.stages[s].latency_ms * (1 - 1e-12)


# ----------------------------------------------------------------------------- rate 1 = static + gate cost


def _masker_ms(stage) -> float:
    return sum(o.latency_ms for o in stage.ops if o.name.startswith("masker"))


@pytest.mark.parametrize("target", GPU_TARGETS)
@SETTINGS
@given(data=st.data())
def test_layer_and_channel_gates_at_rate_one_cost_exactly_their_maskers(target, data):
    cfg = data.draw(configs(paradigms=("static", "layer", "channel", "layer+channel"), rate=1.0, channel_rate=1.0))
    n = _batch(data.draw, target)
    p = predict(cfg, target, n)
    for st_, s in zip(cfg.stages, p.stages):
        masker = _masker_ms(s)
        assert (masker > 0) == (st_.paradigm != "static")
        assert s.latency_ms == pytest.approx(s.static_latency_ms + masker, rel=1e-12)
    assert p.latency_ms == pytest.approx(p.static_latency_ms + sum(_masker_ms(s) for s in p.stages), rel=1e-12)


def _layer_gate_work(b, n: int, column_block: int) -> np.ndarray:
    """[terms] what a layer gate at rate 1 adds to a static block of ``n`` samples (module docstring)."""
    w = cpu.Work(column_block)
    cpu.mlp_masker(w, b, n, 1)
    w.ops(3)  # the running samples: arange, compare, nonzero
    rows = n * b.out_hw[0] * b.out_hw[1]
    # the static SE runs 1x1 convolutions on 1x1 maps (one column: the target's column block
    # applies), the dynamic one matrix products
    linear, conv = cpu.Work(column_block), cpu.Work(column_block)
    cpu.se_work(linear, b, rows, n, b.width, None, linear=True)
    cpu.se_work(conv, b, rows, n, b.width, None, linear=False)
    return w.v + linear.v - conv.v


@SETTINGS
@given(cfg=configs(paradigms=("static", "layer"), rate=1.0, target=CPU_TARGET), n=st.integers(1, 8))
def test_cpu_layer_gate_at_rate_one_costs_its_masker(cfg, n):
    target = load_target(CPU_TARGET)
    costs = target.cpu.vector_ms()
    p = predict(cfg, CPU_TARGET, n)
    spec = cfg.spec
    for st_, s in zip(cfg.stages, p.stages):
        extra = np.zeros(len(cpu.TERMS))
        if st_.paradigm == "layer":
            extra = sum(_layer_gate_work(b, n, target.column_block) for b in spec.stage_blocks(s.stage))
            extra[cpu.TERMS.index("dynamic_stages")] += 1  # the cold start of the stage's dynamic path
        assert s.latency_ms == pytest.approx(s.static_latency_ms + float(extra @ costs), rel=1e-12, abs=1e-12)


def test_batch_one_channel_stage_runs_whole_however_many_selections():
    """At batch 1 the one sample's selection runs the stage whole (no gather path), also when a
    stage has more than 10^12 possible selections (found by the monotonicity property above:
    C1@0.75 on ResNet-101's stage 0, comb(64, 48) selections, was predicted slower than C1@1.00)."""

    def at(rate):
        cfg = ArchConfig.from_dict(
            {
                "backbone": "resnet101",
                "input_size": 224,
                "stages": [{"paradigm": "channel", "channel_granularity": 1, "rate": rate}]
                + [{"paradigm": "static"}] * 3,
            }
        )
        return predict(cfg, CPU_TARGET, 1).stages[0]

    low, high = at(0.75), at(1.0)
    assert low.latency_ms < high.latency_ms
    gather = {rate: {o.name: o.latency_ms for o in st.ops}["gather_melem"] for rate, st in ((0.75, low), (1.0, high))}
    assert gather[0.75] <= gather[1.0]  # fewer channels gathered; the old model charged 20x more
