"""Whole dynamic networks: fast path == reference, training, static weights, exported configs, control
errors, and the stage quotas their blocks share."""

from __future__ import annotations

import json

import pytest
import torch

from dynas.errors import ConfigError
from dynas.kernels import (
    DynamicNet,
    LayerMasker,
    Masker,
    SpatialMasker,
    build_block,
    build_model,
)
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import ArchConfig, StageConfig
from dynas.spaces.torch_model import build_static_model
from tests.kernel_inputs import (
    ATOL,
    INPUT,
    RTOL,
    block_spec,
    randomize_bn,
    stage_choice,
)

# ----------------------------------------------------------------------------- whole networks


NETS = {
    "resnet18": [("spatial", 2), ("channel", 4), ("layer", None), ("spatial+channel", 3)],
    "resnet50": [("layer+channel", 8), ("spatial", 3), ("channel", 16), ("spatial", 1)],
    "regnety_400mf": [("layer+channel", 8), ("spatial", 3), ("channel", 13), ("spatial+channel", 1)],
}


def _net_config(backbone: str, rate: float = 0.5) -> ArchConfig:
    stages = []
    for p, gran in NETS[backbone]:
        s = gran if p in ("spatial", "spatial+channel") else None
        g = (gran if p != "spatial+channel" else 4) if "channel" in p else None
        if p == "spatial+channel":
            s, g = 1, 4
        stages.append(stage_choice(p, rate, s, g))
    return ArchConfig(backbone, (INPUT, INPUT), tuple(stages))


@pytest.mark.parametrize("backbone", list(NETS))
def test_whole_network_fast_matches_reference(backbone):
    torch.manual_seed(0)
    model = build_model(_net_config(backbone)).eval()
    randomize_bn(model)
    x = torch.randn(3, 3, INPUT, INPUT)
    for mode in ("adaptive", "budget"):
        model.set_gate_mode(mode)
        with torch.no_grad():
            ref = model.set_path("reference")(x)
            ref_rates = [r["rates"]["primary"] for r in model.flops_readout()]
            fast = model.set_path("fast")(x)
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)
        readout = model.flops_readout()
        assert len(readout) == len(model.spec.blocks)
        for r, rr in zip(readout, ref_rates):
            assert set(r) >= {"stage", "block", "executed_flops", "dense_flops", "rates"}
            assert r["executed_flops"].shape == (3,)
            torch.testing.assert_close(r["rates"]["primary"], rr)


def test_training_step_through_whole_network():
    cfg = _net_config("resnet18")
    model = build_model(cfg.to_dict()).train().set_temperature(1.5)
    out = model(torch.randn(2, 3, INPUT, INPUT))
    readout = model.flops_readout()
    loss = out.square().mean() + sum(r["executed_flops"].mean() / r["dense_flops"] for r in readout)
    loss.backward()
    assert all(p.grad is not None for m in model.maskers() for p in m.parameters())
    assert {m.temperature for m in model.maskers()} == {1.5}


def test_static_config_matches_static_model_exactly():
    for backbone in ("resnet18", "regnety_400mf"):
        spec = get_backbone(backbone, 64)
        torch.manual_seed(0)
        static = build_static_model(spec).eval()
        randomize_bn(static)
        model = build_model(ArchConfig.static(backbone, 64)).eval()
        missing, unexpected = model.load_pretrained(static.state_dict())
        assert missing == [] and unexpected == []
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(model(x), static(x))
        assert model.flops_readout() == []


def test_load_pretrained_static_state_dict(tmp_path):
    cfg = _net_config("resnet50")
    static = build_static_model(cfg.spec).eval()
    randomize_bn(static, seed=5)
    path = tmp_path / "static.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in static.state_dict().items()}}, path)
    model = build_model(cfg)
    res = model.load_pretrained(path)
    missing, unexpected = res
    assert missing == [] and unexpected == []
    assert res.masker_keys and all("_masker." in k for k in res.masker_keys)
    assert len(res.masker_keys) == sum(len(list(m.state_dict())) for m in model.maskers())
    sd = model.state_dict()
    for k, v in static.state_dict().items():
        assert torch.equal(sd[k], v), k
    # with every gate on, the dynamic net is the static one
    model.eval().set_force("on")
    x = torch.randn(2, 3, INPUT, INPUT)
    with torch.no_grad():
        torch.testing.assert_close(model(x), static(x), atol=ATOL, rtol=RTOL)


def test_load_pretrained_reports_mismatches():
    model = build_model(_net_config("resnet18"))
    sd = build_static_model(model.spec).state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.warns(UserWarning, match="missing"):
        missing, unexpected = model.load_pretrained(sd)
    assert missing == ["fc.bias"] and unexpected == ["extra.weight"]
    with pytest.raises(ConfigError, match="masker"):
        model.load_pretrained(sd, strict=True)
    bad = build_static_model(model.spec).state_dict()
    bad["fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConfigError, match="fc.weight"):
        model.load_pretrained(bad)


def test_build_model_from_exported_json(tmp_path):
    cfg = _net_config("regnety_400mf")
    path = tmp_path / "export.json"
    path.write_text(json.dumps({**cfg.to_dict(), "target": "v100", "predictions": {}}))
    model = build_model(path)
    assert isinstance(model, DynamicNet) and model.config == cfg
    names = set(model.state_dict())
    assert "trunk_output.block2.block2-0.f.b.0.weight" in names
    assert "trunk_output.block2.block2-0.spatial_masker.conv.weight" in names
    assert "trunk_output.block1.block1-0.layer_masker.fc1.weight" in names


def test_control_errors():
    model = build_model(_net_config("resnet18")).eval()
    with pytest.raises(ConfigError, match="gate mode"):
        model.set_gate_mode("greedy")
    with pytest.raises(ConfigError, match="path"):
        model.set_path("slow")
    with pytest.raises(ConfigError, match="temperature"):
        model.set_temperature(0)
    with pytest.raises(ConfigError, match="forward"):
        model.flops_readout()
    spec = block_spec("resnet50", 1, 1)
    with pytest.raises(ConfigError, match="spatial_granularity"):
        build_block(spec, StageConfig("spatial", 0.5, spatial_granularity=2))
    assert isinstance(SpatialMasker(8, (2, 2), 0.5), Masker)
    assert LayerMasker.per_sample_budget is False


def test_param_names_extend_static_names():
    for backbone in ("resnet18", "resnet50", "regnety_400mf"):
        cfg = _net_config(backbone)
        static_names = set(build_static_model(cfg.spec, device="meta").state_dict())
        names = set(build_model(cfg).state_dict())
        assert static_names <= names
        assert all("_masker." in k for k in names - static_names)


# ----------------------------------------------------------------------------- stage quotas


@pytest.mark.parametrize("batch", [1, 3])
def test_layer_quotas_carry_the_rounding_across_stages(batch):
    # rate 0.5 on ResNet-50's 3-4-6-3 blocks: 1.5, 2, 3, 1.5 runs wanted; rounding with the
    # remainder carried gives 2-2-3-1 = 8 = half of 16 per sample (not 2-2-3-2 = 9)
    cfg = ArchConfig("resnet50", (71, 71), (StageConfig("layer", 0.5),) * 4)
    model = build_model(cfg).eval().set_gate_mode("budget")
    with torch.no_grad():
        model(torch.randn(batch, 3, 71, 71))
    runs: dict[int, torch.Tensor] = {}
    for r in model.flops_readout():
        runs[r["stage"]] = runs.get(r["stage"], 0) + r["rates"]["layer"]
    assert [runs[s].tolist() for s in range(4)] == [[v] * batch for v in (2.0, 2.0, 3.0, 1.0)]


def test_one_patch_spatial_gates_share_the_stage_quota():
    # at 71x71 ResNet-50's last stage maps are 3x3: S=3 makes one patch per block, a per-sample gate;
    # budget mode then runs round(0.5 * 3) = 2 of the 3 blocks per sample, like a layer gate
    cfg = ArchConfig("resnet50", (71, 71), (StageConfig(),) * 3 + (StageConfig("spatial", 0.5, spatial_granularity=3),))
    model = build_model(cfg).eval().set_gate_mode("budget")
    randomize_bn(model)
    x = torch.randn(1, 3, 71, 71)
    with torch.no_grad():
        fast = model(x)
        runs = sum(float(r["rates"]["spatial"][0]) for r in model.flops_readout())
        ref = model.set_path("reference")(x)
    assert runs == 2.0
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)
