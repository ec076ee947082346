"""The energy model (predictors/energy.py): its invariants on every built-in target, the target
files' [energy] tables (sources, old files, bad tables), and the RAPL counter check.

Invariants of a prediction with energy (every built-in GPU target):

* finite and positive, at least the constant power over the latency (W x ms = mJ), and the
  stem, head and stages add up to the whole network (so do the static network's);
* non-decreasing in each stage's rate and channel rate, everything else fixed;
* a static stage costs the same energy in a static and in a dynamic network, and the dynamic
  network's ``static_energy_mj`` is the static network's ``energy_mj``;
* the DRAM bytes the energy model prices are the bytes the latency model times: an element-wise
  operator's memory time is its DRAM bytes over DRAM bandwidth, a convolution's is that plus its
  (unpriced) L2 time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dynas.cli import main
from dynas.errors import TargetError
from dynas.kernels.calibrate import environment
from dynas.kernels.energy_counter import rapl_status
from dynas.predictors.energy import ENERGY_FIELDS, EnergyConstants
from dynas.predictors.gpu import ConvOp, conv_cost
from dynas.predictors.gpu_blocks import block_ops
from dynas.predictors.latency import _hw, predict
from dynas.predictors.targets import BUILTIN_DIR, list_targets, load_target, write_target
from dynas.spaces.backbones import get_backbone, list_backbones
from dynas.spaces.config import ArchConfig, StageConfig
from dynas.spaces.design import validation_plan

TARGETS = list_targets()
CPU_TARGET = Path(__file__).resolve().parent / "data" / "cpu-2core-dec02-padonce" / "cpu-2core-dec02-padonce.toml"
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZES = [224, 160, 64, (97, 113)]
rates = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)


@st.composite
def configs(draw) -> ArchConfig:
    """A random config of any backbone and paradigms (the validation plan's draw, from a drawn seed)."""
    item = validation_plan(
        list_backbones(), draw(st.sampled_from(SIZES)), (1,), count=1, seed=draw(st.integers(0, 10**6))
    )[0]
    backbone = draw(st.sampled_from(list_backbones()))
    if backbone == item.config.backbone:
        return item.config
    return validation_plan([backbone], item.config.input_size, (1,), count=1, seed=draw(st.integers(0, 10**6)))[
        0
    ].config


def _batch(draw, target: str) -> int:
    return draw(st.sampled_from([1, 2, 7, 32, 128]))


# ----------------------------------------------------------------------------- target files


@pytest.mark.parametrize("target", TARGETS)
def test_every_builtin_target_prices_energy_and_names_each_source(target):
    t = load_target(target)
    assert t.energy is not None
    for f in ENERGY_FIELDS:
        src = t.sources.get(f, "")
        assert src.startswith(("measured: ", "estimate: ")), (target, f, src)  # docs/energy.md: which is which
        assert getattr(t.energy, f) > 0


def _without_energy(tmp_path: Path) -> Path:
    text = (BUILTIN_DIR / "v100.toml").read_text()
    head, rest = text.split("\n[energy]\n")
    path = tmp_path / "old.toml"
    path.write_text(head + "\n[sources]\n" + rest.split("\n[sources]\n")[1])
    return path


def test_a_target_file_without_energy_loads_and_predicts_no_energy(tmp_path, capsys):
    path = _without_energy(tmp_path)
    t = load_target(str(path))
    assert t.energy is None
    p = predict(ArchConfig.static("resnet18", 64), str(path), 2)
    builtin = predict(ArchConfig.static("resnet18", 64), "v100", 2)
    assert p.latency_ms == builtin.latency_ms  # energy changes no latency
    assert p.energy_mj is None and p.energy_mj_per_image is None and p.static_energy_mj is None
    assert all(s.energy_mj is None and s.static_energy_mj is None for s in p.stages)
    assert main(["predict", ArchConfig.static("resnet18", 64).to_json(), "--target", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["energy_mj"] is None and printed["stages"][0]["energy_mj"] is None  # unknown, not 0


def test_a_calibrated_cpu_target_predicts_no_energy():
    p = predict(ArchConfig.static("resnet18", 64), str(CPU_TARGET), 1)
    assert p.energy_mj is None and all(s.energy_mj is None for s in p.stages)


def test_predict_json_prints_batch_per_image_and_stage_energy(capsys):
    cfg = ArchConfig.static("resnet50", 224)
    assert main(["predict", cfg.to_json(), "--target", "orin", "--batch-size", "4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["energy_mj_per_image"] == pytest.approx(d["energy_mj"] / 4, rel=1e-12)
    assert d["energy_mj"] == pytest.approx(
        d["stem_energy_mj"] + d["head_energy_mj"] + sum(s["energy_mj"] for s in d["stages"]), rel=1e-9
    )
    assert all(s["energy_mj_per_image"] == pytest.approx(s["energy_mj"] / 4, rel=1e-12) for s in d["stages"])


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    text = (BUILTIN_DIR / "orin.toml").read_text()
    assert old in text
    if new.endswith("energy = 5\n"):  # a top-level value named energy: the table must go
        text = text.replace("[energy]\n", "[energy_prices]\n")
    path = tmp_path / "t.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    "old, new, fragment",
    [
        ("static_power_w = 6.5\n", "", "energy.static_power_w is missing; allowed: a number >= 0"),
        (
            "static_power_w = 6.5",
            "static_power_w = -1.0",
            "energy.static_power_w=-1.0 is out of range; allowed: a number >= 0",
        ),
        ("pj_per_flop = 10.05", 'pj_per_flop = "10"', "energy.pj_per_flop='10' is out of range"),
        ("pj_per_flop = 10.05", "pj_per_flop = nan", "energy.pj_per_flop=nan is out of range"),
        (
            "static_power_w = 6.5",
            "static_power_w = 6.5\nwatts = 3",
            "energy.watts is unknown; allowed: " + ", ".join(ENERGY_FIELDS),
        ),
        ('kind = "gpu"\n', 'kind = "gpu"\nenergy = 5\n', "[energy] must be a table"),
    ],
)
def test_a_bad_energy_table_is_one_line_and_exit_2(tmp_path, capsys, old, new, fragment):
    path = _edited(tmp_path, old, new)
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert main(["predict", ArchConfig.static("resnet18", 64).to_json(), "--target", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_a_cpu_target_with_an_energy_table_is_refused(tmp_path):
    path = tmp_path / "cpu.toml"
    path.write_text(CPU_TARGET.read_text() + "\n[energy]\npj_per_flop = 1.0\n")
    with pytest.raises(TargetError, match=r"\[energy\] is not allowed on a cpu target"):
        load_target(str(path))


def test_energy_round_trips_through_a_written_target_file(tmp_path):
    t = dataclasses.replace(load_target("orin"), name="copy", energy=EnergyConstants(1.5, 0.0, 3.25))
    back = load_target(str(write_target(t, tmp_path / "copy.toml")))
    assert back.energy == t.energy
    assert back.key != load_target("orin").key  # energy is part of the memo key


# ----------------------------------------------------------------------------- invariants


def _check_energy(p, static_power_w: float) -> None:
    n = p.batch_size
    for e, ms in (
        (p.energy_mj, p.latency_ms),
        (p.static_energy_mj, p.static_latency_ms),
        (p.stem_energy_mj, p.stem_ms),
        (p.head_energy_mj, p.head_ms),
    ):
        assert math.isfinite(e) and e > 0
        assert e >= static_power_w * ms * (1 - 1e-12)
    assert p.energy_mj_per_image == pytest.approx(p.energy_mj / n, rel=1e-12)
    assert p.static_energy_mj_per_image == pytest.approx(p.static_energy_mj / n, rel=1e-12)
    parts = p.stem_energy_mj + p.head_energy_mj
    assert p.energy_mj == pytest.approx(parts + sum(s.energy_mj for s in p.stages), rel=1e-9)
    assert p.static_energy_mj == pytest.approx(parts + sum(s.static_energy_mj for s in p.stages), rel=1e-9)
    for s in p.stages:
        assert s.energy_mj > 0 and s.energy_mj >= static_power_w * s.latency_ms * (1 - 1e-12)
        assert s.static_energy_mj >= static_power_w * s.static_latency_ms * (1 - 1e-12)
        assert s.energy_mj_per_image == pytest.approx(s.energy_mj / n, rel=1e-12)


@pytest.mark.parametrize("target", TARGETS)
@SETTINGS
@given(data=st.data())
def test_energy_is_positive_adds_up_and_covers_the_constant_power(target, data):
    cfg = data.draw(configs())
    p = predict(cfg, target, _batch(data.draw, target))
    _check_energy(p, load_target(target).energy.static_power_w)


@pytest.mark.parametrize("target", TARGETS)
@SETTINGS
@given(data=st.data())
def test_energy_is_non_decreasing_in_each_stage_rate(target, data):
    cfg = data.draw(configs())
    choices = [
        (s, f)
        for s, x in enumerate(cfg.stages)
        if x.paradigm != "static"
        for f in (["rate", "channel_rate"] if "+" in x.paradigm else ["rate"])
    ]
    assume(choices)
    s, field = data.draw(st.sampled_from(choices))
    low, high = sorted(data.draw(st.tuples(rates, st.one_of(rates, st.just(1.0)))))
    at = {
        v: dataclasses.replace(
            cfg, stages=tuple(dataclasses.replace(x, **{field: v}) if i == s else x for i, x in enumerate(cfg.stages))
        )
        for v in (low, high)
    }
    n = _batch(data.draw, target)
    more, less = predict(at[high], target, n), predict(at[low], target, n)
    assert more.energy_mj >= less.energy_mj * (1 - 1e-12), (cfg.short(), s, field, low, high)
    assert more.stages[s].energy_mj >= less.stages[s].energy_mj * (1 - 1e-12)


@pytest.mark.parametrize("target", TARGETS)
@SETTINGS
@given(data=st.data())
def test_a_static_stage_costs_the_same_energy_in_a_static_and_a_dynamic_network(target, data):
    cfg = data.draw(configs())
    s = data.draw(st.integers(0, len(cfg.stages) - 1))
    mixed = dataclasses.replace(cfg, stages=tuple(StageConfig() if i == s else x for i, x in enumerate(cfg.stages)))
    static = ArchConfig.static(cfg.backbone, cfg.input_size)
    n = _batch(data.draw, target)
    p_mixed, p_static = predict(mixed, target, n), predict(static, target, n)
    assert p_mixed.stages[s].energy_mj == p_static.stages[s].energy_mj
    assert p_mixed.stages[s].static_energy_mj == p_static.stages[s].energy_mj
    assert p_mixed.static_energy_mj == pytest.approx(p_static.energy_mj, rel=1e-12)
    assert p_static.energy_mj == pytest.approx(p_static.static_energy_mj, rel=1e-12)


@pytest.mark.parametrize("target", TARGETS)
def test_priced_bytes_are_the_bytes_the_latency_model_times(target):
    hw = _hw(load_target(target))
    op = ConvOp(8, 64, 128, 28, 28, 3, 1, 1, 30, 8 * 30 * 30, 48, 8, 5, False)
    conv = conv_cost(hw, op)
    weights, inputs, outputs = 128 * 64 * 9, 8 * 30 * 30 * 48, 8 * 28 * 28 * 80  # 48 of 64 inputs, 5 of 8 output groups
    assert conv.dram_bytes == (weights + inputs + outputs) * hw.bytes_per_element
    assert conv.memory_s >= conv.dram_bytes / hw.dram_bandwidth_Bps  # + L2 time
    spec = get_backbone("resnet50", 64)
    for name, c in block_ops(hw, spec.stage_blocks(1)[0], StageConfig("spatial", 0.4, 2), 3)[1]:
        assert c.dram_bytes > 0, name
        if c.macs == 0:  # an element-wise kernel: DRAM time only
            assert c.memory_s == pytest.approx(c.dram_bytes / hw.dram_bandwidth_Bps, rel=1e-12), name


# ----------------------------------------------------------------------------- energy counters


def test_no_powercap_is_one_line(tmp_path):
    status = rapl_status(str(tmp_path / "absent"))
    assert not status.readable and "does not exist" in status.line and "\n" not in status.line
    (tmp_path / "empty").mkdir()
    assert "no intel-rapl" in rapl_status(str(tmp_path / "empty")).line
    assert "not the cuda device" in rapl_status(str(tmp_path), device="cuda").line


def test_readable_and_unreadable_rapl_zones(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    (tmp_path / "intel-rapl:0:0").mkdir(parents=True)  # a subzone: not a package, not read
    zone.mkdir()
    (zone / "energy_uj").write_text("123456\n")
    status = rapl_status(str(tmp_path))
    assert status.readable and status.paths == (str(zone / "energy_uj"),)
    assert "fits time only" in status.line  # readable, and still no energy is fitted
    (zone / "energy_uj").write_text("garbage\n")
    assert "cannot be read (ValueError)" in rapl_status(str(tmp_path)).line


def test_a_calibration_records_why_it_measured_no_energy():
    line = environment("cpu")["energy_counters"]
    assert line == rapl_status().line and line.startswith("energy not measured: ")
