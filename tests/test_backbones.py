"""The RegNetX / RegNetY / DenseNet backbones: specs from the design parameters, the fast path
against the dense-masked reference (parametrized from the registry), DenseNet's skipped-feature
handling, weights, predictions and refusals."""

from __future__ import annotations

import pytest
import torch

from dynas.errors import ConfigError
from dynas.kernels import build_block, build_model, dense
from dynas.kernels.dense import DynamicDenseLayer, bn_zero_response
from dynas.predictors.cpu_terms import CpuCosts
from dynas.predictors.latency import predict
from dynas.predictors.targets import HardwareTarget
from dynas.spaces.backbones import BACKBONES, get_backbone, list_backbones, regnet_stages
from dynas.spaces.config import ArchConfig, StageConfig, channel_granularities, spatial_granularities
from dynas.spaces.torch_model import build_static_model
from tests.kernel_inputs import randomize_bn

SIZE = 64  # small maps keep CI fast: RegNet 32 / 16 / 8 / 4 / 2, DenseNet 16 / 8 / 4 / 2
REGNETS = [b for b in list_backbones() if get_backbone(b).family == "regnety"]
DENSENETS = [b for b in list_backbones() if get_backbone(b).family == "densenet"]
RTOL = 1e-4


def _close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(fast, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()))


def _choice(spec, stage: int, paradigm: str, rate: float = 0.5) -> StageConfig:
    """``paradigm`` at ``stage`` with a mid-range granularity derived from the spec."""
    sg, cg = spatial_granularities(spec, stage), channel_granularities(spec, stage)
    return StageConfig(
        paradigm,
        rate,
        spatial_granularity=sg[len(sg) // 2] if "spatial" in paradigm else None,
        channel_granularity=cg[len(cg) // 2] if "channel" in paradigm else None,
        channel_rate=rate if "+" in paradigm else None,
    )


# ----------------------------------------------------------------------------- specs

# torchvision's stage widths and depths (regnet.py, BlockParams.from_init_params), and the
# RegNet paper's pycls model zoo for the sizes torchvision does not ship
PUBLISHED_STAGES = {
    "regnetx_400mf": ((32, 64, 160, 400), (1, 2, 7, 12)),
    "regnetx_4gf": ((80, 240, 560, 1360), (2, 5, 14, 2)),
    "regnetx_32gf": ((336, 672, 1344, 2520), (2, 7, 13, 1)),
    "regnety_800mf": ((64, 144, 320, 784), (1, 3, 8, 2)),
    "regnety_4gf": ((128, 192, 512, 1088), (2, 6, 12, 2)),
    "regnety_8gf": ((224, 448, 896, 2016), (2, 4, 10, 1)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_STAGES))
def test_regnet_stages_follow_the_design_parameters(name):
    widths, depths, _ = regnet_stages(BACKBONES[name])
    assert (widths, depths) == PUBLISHED_STAGES[name]
    spec = get_backbone(name)
    assert tuple(spec.stage_width(s) for s in range(4)) == widths
    assert (spec.blocks[0].se_channels > 0) == name.startswith("regnety")


def test_densenet_spec():
    spec = get_backbone("densenet121")
    assert [spec.stage_depth(s) for s in range(4)] == [6, 12, 24, 16]
    assert [spec.stage_out_hw(s) for s in range(4)] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert spec.head_in == 1024 and spec.head_norm
    first, last = spec.stage_blocks(1)[0], spec.stage_blocks(1)[-1]
    assert (first.in_channels, first.width, first.out_channels) == (128, 128, 32)
    assert last.has_downsample and not spec.blocks[-1].has_downsample  # transitions after stages 0-2
    assert "spatial" not in spec.paradigms and "layer" in spec.paradigms
    assert "layer" not in get_backbone("regnetx_400mf").paradigms and "layer" in get_backbone("regnety_400mf").paradigms


# ----------------------------------------------------------------------------- fast == reference


def _regnet_cases():
    for name in REGNETS:
        spec = get_backbone(name, SIZE)
        for p in spec.paradigms:
            if p != "static":
                yield name, p


@pytest.mark.parametrize("name, paradigm", list(_regnet_cases()))
def test_regnet_blocks_fast_matches_reference(name, paradigm):
    spec = get_backbone(name, SIZE)
    # stage 1: its first block (stride 2, projection) and a later one (identity shortcut)
    for b in spec.stage_blocks(1)[:2]:
        blk = build_block(b, _choice(spec, 1, paradigm))
        randomize_bn(blk)
        blk.eval()
        x = torch.randn(3, b.in_channels, *b.in_hw, generator=torch.Generator().manual_seed(1))
        for mode in ("adaptive", "budget"):
            for m in blk.maskers():
                m.set_gate_mode(mode)
            with torch.no_grad():
                blk.set_path("reference")
                ref = blk(x)
                blk.set_path("fast")
                fast = blk(x)
            assert fast.shape == (3, b.out_channels, *b.out_hw)
            _close(fast, ref)


def _dense_model(name: str, paradigm: str, rate: float = 0.5, size: int = SIZE):
    spec = get_backbone(name, size)
    stages = tuple(_choice(spec, s, paradigm, rate) for s in range(3)) + (StageConfig(),)
    model = build_model(ArchConfig(name, spec.input_hw, stages)).eval()
    randomize_bn(model)
    return model


def _both(model, x: torch.Tensor, mode: str):
    model.set_gate_mode(mode)
    out = {}
    for path in ("reference", "fast"):
        torch.manual_seed(5)  # the random gate mode draws the same decisions on both paths
        with torch.no_grad():
            out[path] = model.set_path(path)(x)
        out[path + "_rates"] = [r["rates"]["primary"] for r in model.flops_readout()]
    return out


# DenseNet-121 in full (both layouts, every gate mode, maps 16 / 8 / 4 / 2); the deeper ones on
# maps 8 / 4 / 2 / 1 in the layout the fast path is built for, to keep CI fast
DENSE_CASES = [
    ("densenet121", SIZE, (torch.contiguous_format, torch.channels_last), ("random", "budget", "adaptive"))
] + [(name, 32, (torch.channels_last,), ("random", "budget")) for name in DENSENETS if name != "densenet121"]


@pytest.mark.parametrize("paradigm", ["layer", "channel", "layer+channel"])
@pytest.mark.parametrize("name, size, layouts, modes", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_densenet_fast_matches_reference(name, size, layouts, modes, paradigm):
    model = _dense_model(name, paradigm, size=size)
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        for layout in layouts:
            for mode in modes:
                out = _both(model, x.contiguous(memory_format=layout), mode)
                _close(out["fast"], out["reference"])
                for a, b in zip(out["fast_rates"], out["reference_rates"]):  # the same decisions
                    torch.testing.assert_close(a, b)


def test_skipped_layers_are_not_read_by_later_layers(monkeypatch):
    # batch 1, layer rate 0.5: later layers' conv1 reads fewer channels than the layer has, and
    # the transitions too; the result is still the reference's (the skipped channels' constant
    # BN response enters as a bias)
    model = _dense_model("densenet121", "layer")
    layers, products = [], []
    real_new, real_product = DynamicDenseLayer.fast_new, dense.row_product

    def fast_new(self, rows, *args):
        layers.append(rows.shape[1] < self.spec.in_channels)
        return real_new(self, rows, *args)

    monkeypatch.setattr(DynamicDenseLayer, "fast_new", fast_new)
    monkeypatch.setattr(
        dense, "row_product", lambda rows, w: products.append((rows.shape[1], w.shape[0])) or real_product(rows, w)
    )
    x = torch.randn(1, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    out = _both(model, x, "random")
    _close(out["fast"], out["reference"])
    assert any(layers), "no dense layer skipped the channels of a skipped layer"
    transitions = [k < 2 * c_out for k, c_out in products if c_out != 128]  # a transition halves its input
    assert transitions and any(transitions), "no transition skipped them"


def test_bn_zero_response_is_what_a_zero_channel_becomes():
    bn = torch.nn.BatchNorm2d(8).eval()
    randomize_bn(bn)
    with torch.no_grad():
        torch.testing.assert_close(torch.relu(bn(torch.zeros(1, 8, 2, 2)))[0, :, 0, 0], bn_zero_response(bn))


def test_channel_gate_reads_selected_bottleneck_channels_only(monkeypatch):
    model = _dense_model("densenet121", "channel", rate=0.25)
    seen = []
    real = dense.conv_inputs
    monkeypatch.setattr(
        dense, "conv_inputs", lambda h, conv, sel, pad: seen.append(h.shape[1]) or real(h, conv, sel, pad)
    )
    x = torch.randn(2, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    out = _both(model, x, "budget")
    _close(out["fast"], out["reference"])
    assert seen and max(seen) == 32  # a quarter of the 128 bottleneck channels


def test_densenet_training_path_runs_and_records_flops():
    model = _dense_model("densenet121", "layer+channel", size=32)
    model.train()
    model.set_temperature(1.0)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    readout = model.flops_readout()
    assert readout and all(r["executed_flops"].shape == (2,) for r in readout)
    assert all(float(r["executed_flops"].detach().max()) <= r["dense_flops"] + 1e-3 for r in readout)


# ----------------------------------------------------------------------------- weights, predictions, refusals


@pytest.mark.parametrize("name", ["densenet121", "regnetx_400mf"])
def test_torchvision_named_state_dict_loads_with_only_maskers_missing(name):
    spec = get_backbone(name, SIZE)
    static = build_static_model(spec).state_dict()
    paradigm = "layer+channel" if name.startswith("densenet") else "spatial+channel"
    model = build_model(ArchConfig(name, spec.input_hw, tuple(_choice(spec, s, paradigm) for s in range(4))))
    res = model.load_pretrained(static, strict=True)
    assert not res.missing_keys and not res.unexpected_keys and res.masker_keys


def test_densenet_predictions_on_gpu_and_cpu_targets():
    static = ArchConfig.static("densenet121")
    layer = ArchConfig.from_dict(
        {
            "backbone": "densenet121",
            "input_size": 224,
            "stages": [{"paradigm": "layer", "rate": 0.5}] * 3 + [{"paradigm": "static"}],
        }
    )
    for target, n in (("v100", 64), ("tx2", 1)):
        a, b = predict(static, target, n), predict(layer, target, n)
        assert a.speedup == pytest.approx(1.0) and b.latency_ms < a.latency_ms
        assert b.expected_gflops < a.expected_gflops == pytest.approx(a.dense_gflops)
    costs = CpuCosts(*(1.0 for _ in CpuCosts._fields))
    cpu = HardwareTarget(name="unit", description="", kind="cpu", default_batch_size=1, cpu=costs, threads=2)
    for n in (1, 8):  # the work model of predictors/cpu_dense.py (tests/test_cpu_work_dense.py)
        a, b = predict(static, cpu, n), predict(layer, cpu, n)
        assert a.speedup == pytest.approx(1.0) and b.latency_ms < a.latency_ms


def test_dense_layer_refuses_spatial_gates():
    b = get_backbone("densenet121", SIZE).blocks[0]
    with pytest.raises(ConfigError, match=r"paradigm='spatial' is not offered on DenseNet layers; allowed: static"):
        DynamicDenseLayer(b, StageConfig("spatial", 0.5, spatial_granularity=4))


def test_every_new_backbone_is_searchable_and_reaches_the_cli_choices():
    from dynas.spaces.searchspace import SearchSpace

    for name in ("densenet121", "regnetx_800mf", "regnety_32gf"):
        assert name in list_backbones()
        space = SearchSpace(name, 224)
        assert set(space.paradigms) == set(get_backbone(name).paradigms)
