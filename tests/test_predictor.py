"""Latency predictor: invariants, fidelity to the reference figures, targets, API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import dynas
from dynas.errors import ConfigError, TargetError
from dynas.predictors.fidelity import compare_reference
from dynas.predictors.gpu import expected_max_density
from dynas.predictors.latency import predict, predict_blocks
from dynas.predictors.targets import list_targets, load_target
from dynas.spaces.backbones import list_backbones
from dynas.spaces.config import ArchConfig, StageConfig

RATES = [0.1, 0.25, 0.4, 0.5, 0.65, 0.8, 0.95, 1.0]

# One stage choice per paradigm with granularities valid for every stage of a 224 ResNet.
CHOICES = {
    "spatial S1": dict(paradigm="spatial", spatial_granularity=1),
    "spatial S7": dict(paradigm="spatial", spatial_granularity=7),
    "channel G1": dict(paradigm="channel", channel_granularity=1),
    "channel G4": dict(paradigm="channel", channel_granularity=4),
    "layer": dict(paradigm="layer"),
    "spatial+channel": dict(paradigm="spatial+channel", spatial_granularity=7, channel_granularity=4, channel_rate=0.5),
    "layer+channel": dict(paradigm="layer+channel", channel_granularity=4, channel_rate=0.5),
}


def uniform(backbone: str, rate: float, **choice) -> ArchConfig:
    spec = ArchConfig.static(backbone).spec
    return ArchConfig(backbone, spec.input_hw, tuple(StageConfig(rate=rate, **choice) for _ in range(spec.num_stages)))


@pytest.mark.parametrize("target", ["v100", "tx2", "h100"])
@pytest.mark.parametrize("name", list(CHOICES))
def test_latency_non_decreasing_in_rate(target, name):
    lat = [predict(uniform("resnet50", r, **CHOICES[name]), target).latency_ms for r in RATES]
    assert all(b >= a - 1e-12 for a, b in zip(lat, lat[1:])), lat


@pytest.mark.parametrize("target", ["v100", "rtx3060", "tx2"])
@pytest.mark.parametrize("name", ["spatial S1", "spatial S7", "channel G1", "channel G4", "layer"])
def test_rate_one_is_not_faster_than_static(target, name):
    p = predict(uniform("resnet50", 1.0, **CHOICES[name]), target)
    assert p.latency_ms >= p.static_latency_ms


@pytest.mark.parametrize("backbone", list_backbones())
def test_static_config_predicts_static_latency(backbone):
    p = predict(ArchConfig.static(backbone), "v100")
    assert p.latency_ms == pytest.approx(p.static_latency_ms)
    assert p.expected_gflops == pytest.approx(p.dense_gflops, rel=1e-9)
    assert all(math.isfinite(s.latency_ms) and s.latency_ms > 0 for s in p.stages)


@pytest.mark.parametrize("target", ["v100", "tx2"])
def test_layer_skip_is_fixed_part_plus_rate_times_block(target):
    """Layer skip: latency(rate) is affine in rate (interpolated executed samples)."""
    lat = {r: predict(uniform("resnet50", r, paradigm="layer"), target).latency_ms for r in (0.25, 0.5, 0.75)}
    assert lat[0.5] - lat[0.25] == pytest.approx(lat[0.75] - lat[0.5], rel=0.15)
    static = predict(ArchConfig.static("resnet50"), target).static_latency_ms
    fixed = lat[0.25] - 0.25 * (lat[0.75] - lat[0.25]) / 0.5  # extrapolate to rate 0
    assert 0 < fixed < 0.2 * static  # maskers + downsample + stem/head


@pytest.mark.parametrize("target", ["v100", "tx2"])
def test_larger_batch_never_lowers_batch_latency(target):
    cfg = uniform("resnet50", 0.5, **CHOICES["spatial+channel"])
    lat = [predict(cfg, target, batch_size=n).latency_ms for n in (1, 2, 8, 32, 64)]
    assert all(b >= a for a, b in zip(lat, lat[1:])), lat


def test_granularity_that_does_not_divide_is_rejected_not_rounded():
    cfg = {
        "backbone": "resnet50",
        "stages": [{"paradigm": "spatial", "spatial_granularity": 3, "rate": 0.5}] + [{"paradigm": "static"}] * 3,
    }
    with pytest.raises(ConfigError, match="spatial_granularity=3 does not divide"):
        predict(cfg, "v100")


def test_fine_granularity_costs_latency_on_big_gpu_not_on_tx2():
    """LAUDNet's lesson (Han et al., TPAMI 2024): S=1 is slower than static on V100 at batch 128; on TX2 it pays off."""
    fine = [1, 1, 1, 1]
    cfg = ArchConfig("resnet50", (224, 224), tuple(StageConfig("spatial", 0.5, spatial_granularity=s) for s in fine))
    assert predict(cfg, "v100").latency_ratio > 1.0
    assert predict(cfg, "tx2").latency_ratio < 1.0


def test_reference_figures_are_reproduced():
    """Calibration points: LAUDNet's DyNetSimulator outputs (Han et al., TPAMI 2024)."""
    static, ratios, summary = compare_reference()
    assert summary["static: Spearman"] >= 0.95
    assert summary["static: median |rel err|"] <= 0.10
    assert summary["ratios: max |err|"] <= 0.10
    assert summary["ratios: Spearman"] >= 0.9
    # Ordering of the spatial granularities is the reference's: 1-1-1-1 > 4-4-2-1 > 8-4-7-1.
    sp = ratios[ratios["config"].str.startswith("S")]["dynas"].tolist()
    assert sp[0] > sp[1] > sp[2]


def test_expected_max_density_is_exact_and_bounded():
    import numpy as np

    # one tile covering every group: density is exactly active / groups
    assert expected_max_density(8, 4, 8, np.array([10.0]))[0] == pytest.approx(0.5)
    # one tile of one group: P(active) = 1/2
    assert expected_max_density(8, 4, 1, np.array([1.0]))[0] == pytest.approx(0.5)
    # max over two single-group tiles (hypergeometric, iid approx): 1 - (1/2)^2
    assert expected_max_density(8, 4, 1, np.array([2.0]))[0] == pytest.approx(0.75)
    many = expected_max_density(64, 32, 4, np.array([1.0, 4.0, 80.0]))
    assert 0.5 <= many[0] <= many[1] <= many[2] <= 1.0


def test_prediction_fields_and_json(tmp_path):
    cfg = {
        "backbone": "resnet101",
        "input_size": 224,
        "stages": [
            {"paradigm": "spatial", "spatial_granularity": 8, "rate": 0.5},
            {"paradigm": "channel", "channel_granularity": 2, "rate": 0.5},
            {"paradigm": "layer", "rate": 0.5},
            {"paradigm": "static"},
        ],
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    p = dynas.predict(str(path), "v100")
    assert p.batch_size == 128  # the target's default
    d = json.loads(json.dumps(p.to_dict()))
    for key in ("latency_ms", "latency_ms_per_image", "static_latency_ms", "batch_size", "target", "flops", "stages"):
        assert key in d
    assert d["latency_ms_per_image"] == pytest.approx(d["latency_ms"] / 128)
    assert d["flops"]["expected_gflops"] < d["flops"]["dense_gflops"]
    assert [s["choice"] for s in d["stages"]] == ["S8@0.50", "C2@0.50", "L@0.50", "static"]
    assert d["stages"][0]["masker"] in ("fused into conv1", "separate")
    assert all(s["bound"] in ("compute", "memory") for s in d["stages"])
    assert dynas.predict(cfg, "v100", batch_size=4).batch_size == 4


@pytest.mark.parametrize("name", list_targets())
def test_every_builtin_target_loads_with_sources(name):
    t = load_target(name)
    assert t.n_sm > 0 and t.clock_hz > 0 and t.dram_bandwidth_Bps > 0
    for field in ("n_sm", "lanes_per_sm", "clock_hz", "dram_bandwidth_Bps", "default_batch_size"):
        assert t.sources.get(field), f"{name}: no source for {field}"
    assert predict(ArchConfig.static("resnet18"), name).latency_ms > 0


def test_user_target_file(tmp_path):
    text = load_target("v100").sources and (dynas.predictors.targets.BUILTIN_DIR / "v100.toml").read_text()
    custom = tmp_path / "mygpu.toml"
    custom.write_text(text.replace('name = "v100"', 'name = "mygpu"').replace("n_sm = 80", "n_sm = 40"))
    slow = predict(ArchConfig.static("resnet50"), str(custom))
    fast = predict(ArchConfig.static("resnet50"), "v100")
    assert slow.target == "mygpu" and slow.latency_ms > fast.latency_ms


@pytest.mark.parametrize(
    "body,match",
    [
        ("[hardware]\nn_sm = 80\n", "hardware.lanes_per_sm is missing"),
        (
            "[hardware]\nn_sm = -1\nlanes_per_sm = 64\nclock_hz = 1e9\ndram_bandwidth_Bps = 1e11\n",
            "hardware.n_sm=-1 is out of range",
        ),
        (
            "[hardware]\nn_sm = 'x'\nlanes_per_sm = 64\nclock_hz = 1e9\ndram_bandwidth_Bps = 1e11\n",
            "not a positive integer",
        ),
        ("name = [", "not valid TOML"),
    ],
)
def test_bad_target_files(tmp_path, body, match):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(TargetError, match=match):
        load_target(str(f))


def test_unknown_target_and_bad_batch():
    with pytest.raises(TargetError, match="target='k80' is unknown; allowed: a100"):
        load_target("k80")
    with pytest.raises(ConfigError, match="batch_size=0"):
        predict(ArchConfig.static("resnet50"), "v100", batch_size=0)


CPU_TARGET = str(Path(__file__).resolve().parent / "data" / "cpu-2core-dec01-late" / "cpu-2core-dec01-late.toml")


@pytest.mark.parametrize("target", list_targets() + [CPU_TARGET], ids=lambda t: Path(t).stem)
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "regnety_400mf"])
def test_block_predictions_add_up_to_their_stage(target, backbone):
    spec = ArchConfig.static(backbone).spec
    width = [spec.stage_width(s) for s in range(4)]
    cfg = ArchConfig(
        backbone,
        spec.input_hw,
        (
            StageConfig("spatial", 0.4, spatial_granularity=2),
            StageConfig("layer", 0.6),  # per-sample gate: each block at its expected cost
            StageConfig("channel", 0.3, channel_granularity=width[2] // 8),
            StageConfig("layer+channel", 0.5, channel_granularity=width[3] // 4, channel_rate=0.5),
        ),
    )
    for n in (1, 8):
        pred, blocks = predict(cfg, target, n), predict_blocks(cfg, target, n)
        assert [len(b) for b in blocks] == [spec.stage_depth(s) for s in range(4)]
        for s, stage in enumerate(pred.stages):
            assert min(blocks[s]) > 0
            assert sum(blocks[s]) == pytest.approx(stage.latency_ms, rel=1e-9)
    # blocks of one shape cost the same; the first (stride, projection) differs
    static = predict_blocks(ArchConfig.static(backbone), target, 1)
    assert len(set(static[1][1:])) == 1 and static[1][0] != static[1][1]
