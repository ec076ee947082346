"""Backbone specs, the static torch model built from them, and the architecture config."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynas.errors import ConfigError
from dynas.spaces.backbones import get_backbone, list_backbones
from dynas.spaces.config import (
    ArchConfig,
    StageConfig,
    channel_granularities,
    load_config,
    spatial_granularities,
    uses_channel,
    uses_spatial,
)
from dynas.spaces.torch_model import (
    OPS,
    block_module_name,
    block_ops,
    build_static_model,
    module_name_for,
)

BACKBONES = list_backbones()


# ----------------------------------------------------------------------------- model vs spec


def _conv(module: torch.nn.Module) -> torch.nn.Conv2d:
    """The conv of an op module (the conv itself or a conv+BN(+act) Sequential)."""
    return module if isinstance(module, torch.nn.Conv2d) else module[0]


def _run_with_hooks(spec, x: torch.Tensor):
    """Run the spec's model on x; return logits, {block name: output shape}, stem output shape."""
    model = build_static_model(spec, device=x.device).eval()
    modules = dict(model.named_modules())
    shapes: dict[str, torch.Size] = {}
    for b in spec.blocks:
        modules[block_module_name(b)].register_forward_hook(
            lambda _m, _i, out, name=b.name: shapes.__setitem__(name, out.shape)
        )
    first = modules[block_module_name(spec.blocks[0])]
    # a dense layer's input is the list of features so far: the first is the stem's output
    first.register_forward_pre_hook(
        lambda _m, inp: shapes.__setitem__("stem", (inp[0][0] if isinstance(inp[0], list) else inp[0]).shape)
    )
    with torch.no_grad():
        logits = model(x)
    return model, logits, shapes


def _check_shapes(spec, logits, shapes, n: int) -> None:
    assert tuple(logits.shape) == (n, spec.num_classes)
    assert tuple(shapes["stem"]) == (n, spec.stem.out_channels, *spec.stem.out_hw)
    for b in spec.blocks:
        assert tuple(shapes[b.name]) == (n, b.out_channels, *b.out_hw), b.name


def _expected_conv(b, op: str) -> tuple[int, int, int, int]:
    """(in, out, stride, groups) of an op's conv as the spec describes it."""
    if b.kind == "basic":  # 3x3 (stride) -> 3x3
        table = {"conv1": (b.in_channels, b.width, b.stride, 1), "conv2": (b.width, b.out_channels, 1, 1)}
    elif b.kind == "dense":  # 1x1 -> 3x3 to the growth rate; the transition halves the block's output
        c = b.in_channels + b.out_channels
        return {
            "conv1": (b.in_channels, b.width, 1, 1),
            "conv2": (b.width, b.out_channels, 1, 1),
            "downsample": (c, c // 2, 1, 1),
        }[op]
    else:  # 1x1 -> 3x3 (stride, groups) -> 1x1
        table = {
            "conv1": (b.in_channels, b.width, 1, 1),
            "conv2": (b.width, b.width, b.stride, b.groups),
            "conv3": (b.width, b.out_channels, 1, 1),
        }
    table["downsample"] = (b.in_channels, b.out_channels, b.stride, 1)
    return table[op]


@pytest.mark.parametrize("name", BACKBONES)
def test_meta_model_matches_spec_at_224(name):
    spec = get_backbone(name, 224)
    model, logits, shapes = _run_with_hooks(spec, torch.empty(2, 3, 224, 224, device="meta"))
    _check_shapes(spec, logits, shapes, 2)
    modules = dict(model.named_modules())
    for b in spec.blocks:
        ops = block_ops(b)
        assert set(ops) <= set(OPS)
        assert ("downsample" in ops) == b.has_downsample
        for op in ops:
            mod = modules[module_name_for(b, op)]  # KeyError if the mapping names no module
            if op == "se":
                assert (mod.fc1.in_channels, mod.fc1.out_channels) == (b.width, b.se_channels)
                assert (mod.fc2.in_channels, mod.fc2.out_channels) == (b.se_channels, b.width)
                continue
            conv = mod.conv if b.kind == "dense" and op == "downsample" else _conv(mod)
            got = (conv.in_channels, conv.out_channels, conv.stride[0], conv.groups)
            assert got == _expected_conv(b, op), (b.name, op)


@pytest.mark.parametrize("name", ["resnet18", "regnety_400mf"])
@pytest.mark.parametrize("size", [64, (97, 113)])
def test_cpu_model_matches_spec_on_small_inputs(name, size):
    spec = get_backbone(name, size)
    torch.manual_seed(0)
    x = torch.randn(2, 3, *spec.input_hw)
    _, logits, shapes = _run_with_hooks(spec, x)
    _check_shapes(spec, logits, shapes, 2)
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits[0], logits[1])  # the two inputs give different outputs


# torchvision's published parameter counts: equal counts + equal module names mean
# torchvision state dicts load into these models.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "regnety_400mf": 4_344_144,
    "regnety_800mf": 6_432_512,
    "regnety_1_6gf": 11_202_430,
    "regnety_3_2gf": 19_436_338,
    "regnety_8gf": 39_381_472,
    "regnety_16gf": 83_590_140,
    "regnety_32gf": 145_046_770,
    "regnetx_400mf": 5_495_976,
    "regnetx_800mf": 7_259_656,
    "regnetx_1_6gf": 9_190_136,
    "regnetx_3_2gf": 15_296_552,
    "regnetx_8gf": 39_572_648,
    "regnetx_16gf": 54_278_536,
    "regnetx_32gf": 107_811_560,
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}
# sizes torchvision does not ship: the RegNet paper's pycls model zoo gives parameters in millions
PYCLS_PARAMS_M = {
    "regnetx_4gf": 22.1,
    "regnetx_6_4gf": 26.2,
    "regnetx_12gf": 46.1,
    "regnety_4gf": 20.6,
    "regnety_6_4gf": 30.6,
    "regnety_12gf": 51.8,
}


@pytest.mark.parametrize("name", BACKBONES)
def test_parameter_count_matches_torchvision(name):
    model = build_static_model(get_backbone(name), device="meta")
    n = sum(p.numel() for p in model.parameters())
    if name in TORCHVISION_PARAMS:
        assert n == TORCHVISION_PARAMS[name]
    else:
        assert round(n / 1e6, 1) == PYCLS_PARAMS_M[name]


def test_torchvision_state_dict_names():
    keys = set(build_static_model(get_backbone("resnet50"), device="meta").state_dict())
    for k in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight",
        "layer4.2.bn3.bias",
        "fc.weight",
        "fc.bias",
    ]:
        assert k in keys
    keys = set(build_static_model(get_backbone("regnety_400mf"), device="meta").state_dict())
    for k in [
        "stem.0.weight",
        "stem.1.weight",
        "trunk_output.block1.block1-0.proj.0.weight",
        "trunk_output.block2.block2-2.f.b.0.weight",
        "trunk_output.block4.block4-5.f.se.fc1.bias",
        "trunk_output.block4.block4-5.f.se.fc2.weight",
        "trunk_output.block3.block3-0.f.c.1.running_var",
        "fc.weight",
    ]:
        assert k in keys
    keys = set(build_static_model(get_backbone("densenet121"), device="meta").state_dict())
    for k in [
        "features.conv0.weight",
        "features.norm0.running_mean",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer6.conv2.weight",
        "features.transition1.norm.bias",
        "features.transition3.conv.weight",
        "features.denseblock4.denselayer16.norm2.running_var",
        "features.norm5.weight",
        "classifier.weight",
        "classifier.bias",
    ]:
        assert k in keys


def test_cpu_model_is_initialised():
    model = build_static_model(get_backbone("resnet18", 64))
    w = model.layer1[0].conv1.weight
    assert w.std() > 0 and torch.all(model.layer1[0].bn1.weight == 1)


def test_module_name_for_rejects_missing_ops():
    r18, r50 = get_backbone("resnet18"), get_backbone("resnet50")
    assert module_name_for(r50.blocks[0], "conv2") == "layer1.0.conv2"
    assert module_name_for(r50.blocks[0], "downsample") == "layer1.0.downsample"
    ry = get_backbone("regnety_800mf")
    assert module_name_for(ry.stage_blocks(1)[2], "se") == "trunk_output.block2.block2-2.f.se"
    assert module_name_for(ry.blocks[0], "downsample") == "trunk_output.block1.block1-0.proj"
    with pytest.raises(ConfigError, match="op='se' does not exist in bottleneck block stages.0.0"):
        module_name_for(r50.blocks[0], "se")
    with pytest.raises(ConfigError, match="op='conv3'"):
        module_name_for(r18.blocks[0], "conv3")
    with pytest.raises(ConfigError, match="op='downsample'"):
        module_name_for(r50.blocks[1], "downsample")


# ----------------------------------------------------------------------------- spec facts


def test_resnet50_shapes():
    spec = get_backbone("resnet50")
    assert [spec.stage_out_hw(s) for s in range(4)] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [spec.stage_blocks(s)[-1].out_channels for s in range(4)] == [256, 512, 1024, 2048]
    assert [spec.stage_width(s) for s in range(4)] == [64, 128, 256, 512]
    assert [spec.stage_depth(s) for s in range(4)] == [3, 4, 6, 3]
    assert [spec.stage_blocks(s)[0].stride for s in range(4)] == [1, 2, 2, 2]
    assert spec.head_in == 2048


@pytest.mark.parametrize(
    "name, widths, depths, group_width",
    [("regnety_400mf", [48, 104, 208, 440], [1, 3, 6, 6], 8), ("regnety_800mf", [64, 144, 320, 784], [1, 3, 8, 2], 16)],
)
def test_regnety_shapes(name, widths, depths, group_width):
    spec = get_backbone(name)
    assert [spec.stage_width(s) for s in range(4)] == widths
    assert [spec.stage_depth(s) for s in range(4)] == depths
    assert [spec.stage_out_hw(s) for s in range(4)] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    for b in spec.blocks:
        assert b.groups * group_width == b.width
        assert b.se_channels == round(b.in_channels / 4)


# ----------------------------------------------------------------------------- config errors

STATIC3 = [{"paradigm": "static"}] * 3


def _cfg(stage0: dict, backbone: str = "resnet50", **extra) -> dict:
    return {"backbone": backbone, "input_size": 224, "stages": [stage0] + STATIC3, **extra}


BAD_CONFIGS = [
    ({"backbone": "vgg16", "stages": []}, r"backbone='vgg16' is unknown; allowed: densenet121, densenet169"),
    (
        _cfg({"paradigm": "layer", "rate": 0.5}, "regnetx_800mf"),
        r"stage 0: paradigm='layer' is not offered on regnetx_800mf \(no layer skipping on RegNet.*\); "
        r"allowed: static, spatial, channel, spatial\+channel$",
    ),
    (
        _cfg({"paradigm": "spatial", "spatial_granularity": 8, "rate": 0.5}, "densenet121"),
        r"stage 0: paradigm='spatial' is not offered on densenet121 \(no spatial skipping on DenseNet.*\); "
        r"allowed: static, channel, layer, layer\+channel$",
    ),
    (_cfg({"paradigm": "token", "rate": 0.5}), r"stage 0: paradigm='token' is unknown; allowed: static, spatial"),
    (
        _cfg({"paradigm": "spatial", "spatial_granularity": 5, "rate": 0.5}),
        r"stage 0: spatial_granularity=5 does not divide the stage's 56x56 output map; allowed: 1, 2, 4, 7, 8, 14, 28, 56$",
    ),
    (
        _cfg({"paradigm": "channel", "channel_granularity": 3, "rate": 0.5}),
        r"stage 0: channel_granularity=3 must divide the gated width 64 .*allowed: 1, 2, 4, 8, 16, 32$",
    ),
    (_cfg({"paradigm": "channel", "channel_granularity": 64, "rate": 0.5}), r"channel_granularity=64 .*gated width 64"),
    (
        _cfg({"paradigm": "spatial", "spatial_granularity": 2.5, "rate": 0.5}),
        r"spatial_granularity=2.5 is not an integer",
    ),
    (_cfg({"paradigm": "layer", "rate": 0}), r"stage 0: rate=0 is out of range; allowed: a number in \(0, 1\]"),
    (_cfg({"paradigm": "layer", "rate": -1}), r"rate=-1 is out of range"),
    (_cfg({"paradigm": "layer", "rate": 1.5}), r"rate=1.5 is out of range"),
    (_cfg({"paradigm": "layer", "rate": float("nan")}), r"rate=nan is out of range"),
    (_cfg({"paradigm": "layer", "rate": "0.5"}), r"rate='0.5' is not a number"),
    (_cfg({"paradigm": "layer", "rate": True}), r"rate=True is not a number"),
    (_cfg({"paradigm": "layer"}), r"stage 0: rate=None is not a number"),
    (
        _cfg({"paradigm": "spatial+channel", "spatial_granularity": 4, "channel_granularity": 2, "rate": 0.5}),
        r"stage 0: channel_rate is missing; paradigm 'spatial\+channel' needs",
    ),
    (
        _cfg({"paradigm": "layer+channel", "channel_granularity": 2, "rate": 0.5, "channel_rate": 0}),
        r"channel_rate=0 is out of range",
    ),
    (_cfg({"paradigm": "layer", "rate": 0.5, "speed": 2}), r"stage 0: key 'speed' is unknown"),
    (_cfg({"paradigm": "static", "rate": 0.5}), r"stage 0: field 'rate' is not used by paradigm 'static'"),
    (
        _cfg({"paradigm": "layer", "rate": 0.5, "spatial_granularity": 4}),
        r"field 'spatial_granularity' is not used by paradigm 'layer'",
    ),
    (
        _cfg({"paradigm": "spatial", "spatial_granularity": 4, "rate": 0.5, "channel_rate": 0.5}),
        r"field 'channel_rate' is not used",
    ),
    (_cfg({"paradigm": "layer", "rate": 0.5}, colour="red"), r"config key 'colour' is unknown"),
    ({"backbone": "resnet50", "stages": STATIC3}, r"stages has 3 entries; allowed: exactly 4 for resnet50"),
    ({"backbone": "resnet50", "stages": STATIC3 * 2}, r"stages has 6 entries"),
    ({"backbone": "resnet50", "stages": "static"}, r"stages='static' is not a list"),
    ({"backbone": "resnet50", "input_size": 16, "stages": STATIC3}, r"input_size=16 is too small"),
    ({"backbone": "resnet50", "input_size": [224], "stages": STATIC3}, r"input_size=\[224\] is not a size"),
    ({"stages": STATIC3}, r"backbone=None is missing"),
]


@pytest.mark.parametrize("data, message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_config_raises_one_line_config_error(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(data)
    assert "\n" not in str(info.value)
    # the same dict as a JSON string fails the same way (NaN aside, which JSON cannot carry strictly)
    if "nan" not in message:
        with pytest.raises(ConfigError, match=message):
            load_config(json.dumps(data))


def test_truncated_json_and_bad_sources(tmp_path):
    text = ArchConfig.static("resnet50").to_json()
    with pytest.raises(ConfigError, match=r"config is not valid JSON: .* at line \d+ column \d+"):
        load_config(text[: len(text) // 2])
    path = tmp_path / "cut.json"
    path.write_text(text[:-3])
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="is not an object"):
        ArchConfig.from_json("[1, 2]")
    with pytest.raises(ConfigError, match="is not supported"):
        load_config(42)


def test_input_size_forms():
    a = load_config({"backbone": "resnet18", "input_size": 224, "stages": [{}] * 4})
    b = load_config({"backbone": "resnet18", "input_size": [224, 224], "stages": [{}] * 4})
    assert a == b and a.input_size == (224, 224)
    assert a.to_dict()["input_size"] == 224
    c = load_config({"backbone": "resnet18", "input_size": [97, 113], "stages": [{}] * 4})
    assert c.input_size == (97, 113) and c.to_dict()["input_size"] == [97, 113]
    assert load_config(c.to_json()) == c


def test_config_file_round_trip(tmp_path):
    cfg = load_config(
        _cfg(
            {
                "paradigm": "spatial+channel",
                "spatial_granularity": 8,
                "channel_granularity": 2,
                "rate": 0.35,
                "channel_rate": 0.8,
            }
        )
    )
    path = tmp_path / "cfg.json"
    exported = {**cfg.to_dict(), "target": "v100", "predictions": {"latency_ms": 1.0}}
    path.write_text(json.dumps(exported))
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg
    assert cfg.short() == "S8@0.35+C2@0.80 | static | static | static"


# ----------------------------------------------------------------------------- round trip property

# Sizes whose last stage is non-empty for every backbone, square and not.
SIZES = [224, 160, 64, [97, 113], [128, 96], [33, 250]]


@st.composite
def arch_configs(draw):
    backbone = draw(st.sampled_from(BACKBONES))
    size = draw(st.sampled_from(SIZES))
    spec = get_backbone(backbone, size)
    rates = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)
    stages = []
    for i in range(spec.num_stages):
        p = draw(st.sampled_from(spec.paradigms))  # what the backbone offers
        if p == "static":
            stages.append(StageConfig())
            continue
        stages.append(
            StageConfig(
                paradigm=p,
                rate=draw(rates),
                spatial_granularity=draw(st.sampled_from(spatial_granularities(spec, i))) if uses_spatial(p) else None,
                channel_granularity=draw(st.sampled_from(channel_granularities(spec, i))) if uses_channel(p) else None,
                channel_rate=draw(rates) if p in ("spatial+channel", "layer+channel") else None,
            )
        )
    return ArchConfig(backbone, spec.input_hw, tuple(stages))


@settings(max_examples=150, deadline=None)
@given(arch_configs())
def test_json_round_trip(cfg):
    assert load_config(cfg.to_json()) == cfg
    assert load_config(cfg.to_json(indent=None)) == cfg
    assert load_config(json.loads(cfg.to_json())) == cfg
    assert ArchConfig.from_dict(cfg.to_dict()) == cfg
    assert len(cfg.short().split(" | ")) == len(cfg.stages)


@pytest.mark.parametrize("name", BACKBONES)
def test_granularity_helpers_divide(name):
    spec = get_backbone(name, [97, 113])
    for s in range(spec.num_stages):
        h, w = spec.stage_out_hw(s)
        assert spatial_granularities(spec, s)[0] == 1
        assert all(h % g == 0 and w % g == 0 for g in spatial_granularities(spec, s))
        n = spec.stage_width(s)
        gs = channel_granularities(spec, s)
        assert gs and all(n % g == 0 and n // g >= 2 for g in gs)
        assert set(gs) == {g for g in range(1, n) if n % g == 0 and n // g >= 2}
