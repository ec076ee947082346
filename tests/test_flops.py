"""Dense FLOPs per operator, from torch.utils.flop_counter on the meta-device model."""

from __future__ import annotations

import pytest

from dynas.errors import ConfigError
from dynas.predictors.flops import FlopTable, dense_flops
from dynas.spaces.backbones import get_backbone, list_backbones
from dynas.spaces.torch_model import OPS, block_ops

# Published dense GMACs of the torchvision models at 224x224 (their docs' "GFLOPS"), times 2
# (flop_counter counts a multiply-accumulate as 2 FLOPs); the RegNet sizes torchvision does not
# ship from the RegNet paper's pycls model zoo ("flops (B)", also multiply-adds).
KNOWN_GFLOPS = {
    "resnet18": 2 * 1.81,
    "resnet34": 2 * 3.66,
    "resnet50": 2 * 4.09,
    "resnet101": 2 * 7.80,
    "resnet152": 2 * 11.51,
    "regnety_400mf": 2 * 0.40,
    "regnety_800mf": 2 * 0.83,
    "regnety_1_6gf": 2 * 1.612,
    "regnety_3_2gf": 2 * 3.176,
    "regnety_8gf": 2 * 8.473,
    "regnety_16gf": 2 * 15.912,
    "regnety_32gf": 2 * 32.28,
    "regnetx_400mf": 2 * 0.414,
    "regnetx_800mf": 2 * 0.8,
    "regnetx_1_6gf": 2 * 1.603,
    "regnetx_3_2gf": 2 * 3.177,
    "regnetx_8gf": 2 * 7.995,
    "regnetx_16gf": 2 * 15.941,
    "regnetx_32gf": 2 * 31.736,
    "regnetx_4gf": 2 * 4.0,
    "regnetx_6_4gf": 2 * 6.5,
    "regnetx_12gf": 2 * 12.1,
    "regnety_4gf": 2 * 4.0,
    "regnety_6_4gf": 2 * 6.4,
    "regnety_12gf": 2 * 12.1,
    "densenet121": 2 * 2.834,
    "densenet169": 2 * 3.36,
    "densenet201": 2 * 4.291,
}


@pytest.mark.parametrize("name", list_backbones())
def test_total_close_to_published(name):
    table = dense_flops(name)
    assert table.total_gflops == pytest.approx(KNOWN_GFLOPS[name], rel=0.05)


@pytest.mark.parametrize("name", list_backbones())
@pytest.mark.parametrize("size", [224, (97, 113)])
def test_parts_add_up(name, size):
    table = dense_flops(name, size)
    spec = get_backbone(name, size)
    assert table.input_hw == spec.input_hw
    assert list(table.blocks) == [b.name for b in spec.blocks]
    for b in spec.blocks:
        ops = table.block_flops(b.name)
        assert tuple(ops) == block_ops(b)
        assert all(v > 0 for v in ops.values())
        # the residual add is not counted, so a block is exactly the sum of its operators
        assert sum(ops.values()) == table.block_total_flops(b.name)
    stages = sum(table.stage_flops(s) for s in range(spec.num_stages))
    assert table.stem_flops + stages + table.head_flops == table.total_flops


def _conv_flops(out_hw, c_in, c_out, k, groups=1) -> int:
    """Independent check: 2 FLOPs per multiply-accumulate of a conv (bias not counted)."""
    return 2 * out_hw[0] * out_hw[1] * c_out * (c_in // groups) * k * k


@pytest.mark.parametrize("name", list_backbones())
def test_per_op_flops_match_spec_shapes(name):
    spec = get_backbone(name, (97, 113))
    table = dense_flops(name, (97, 113))
    for b in spec.blocks:
        if b.kind == "basic":
            expected = {
                "conv1": _conv_flops(b.out_hw, b.in_channels, b.width, 3),
                "conv2": _conv_flops(b.out_hw, b.width, b.out_channels, 3),
            }
        elif b.kind == "dense":
            c = b.in_channels + b.out_channels  # the transition reads the dense block's output
            expected = {
                "conv1": _conv_flops(b.in_hw, b.in_channels, b.width, 1),
                "conv2": _conv_flops(b.out_hw, b.width, b.out_channels, 3),
                "downsample": _conv_flops(b.out_hw, c, c // 2, 1),
            }
        else:
            expected = {
                "conv1": _conv_flops(b.in_hw, b.in_channels, b.width, 1),
                "conv2": _conv_flops(b.out_hw, b.width, b.width, 3, b.groups),
                "conv3": _conv_flops(b.out_hw, b.width, b.out_channels, 1),
            }
        if b.kind == "regnety":
            # two 1x1 convs on the pooled 1x1 map: width -> se_channels -> width
            expected["se"] = _conv_flops((1, 1), b.width, b.se_channels, 1) + _conv_flops(
                (1, 1), b.se_channels, b.width, 1
            )
        if b.has_downsample and b.kind != "dense":
            expected["downsample"] = _conv_flops(b.out_hw, b.in_channels, b.out_channels, 1)
        assert table.block_flops(b.name) == {op: expected[op] for op in block_ops(b)}, b.name
    st = spec.stem
    assert table.stem_flops == _conv_flops(st.conv_out_hw, st.in_channels, st.out_channels, st.kernel)
    assert table.head_flops == 2 * spec.head_in * spec.num_classes


def test_lookup_and_errors():
    table = dense_flops("resnet50")
    assert table.op("stages.1.0", "downsample") > 0
    assert table.op("stages.1.1", "downsample") == 0  # no shortcut conv there
    assert table.op("stages.1.1", "se") == 0  # ResNet has no SE
    with pytest.raises(ConfigError, match=r"op='conv4' is unknown; allowed: conv1, conv2, se, conv3, downsample"):
        table.op("stages.1.1", "conv4")
    with pytest.raises(
        ConfigError, match=r"block_name='layer1.0' is unknown for resnet50; allowed: stages.0.0 .. stages.3.2"
    ):
        table.op("layer1.0", "conv1")
    with pytest.raises(ConfigError, match=r"block_name='stages.9.0'"):
        table.block_flops("stages.9.0")
    with pytest.raises(ConfigError, match=r"stage=4 does not exist"):
        table.stage_flops(4)
    with pytest.raises(ConfigError, match=r"backbone='vgg16' is unknown"):
        dense_flops("vgg16")
    with pytest.raises(ConfigError, match=r"input_size=16 is too small"):
        dense_flops("resnet50", 16)
    # the table is read-only: returned dicts are copies
    ops = table.block_flops("stages.0.0")
    ops["conv1"] = 0
    assert table.op("stages.0.0", "conv1") > 0
    with pytest.raises(TypeError):
        table.blocks["stages.0.0"]["conv1"] = 0  # type: ignore[index]


def test_cached_per_backbone_and_size():
    a = dense_flops("resnet18", 224)
    assert dense_flops("resnet18", (224, 224)) is a
    assert dense_flops("resnet18", [224, 224]) is a
    b = dense_flops("resnet18", 160)
    assert isinstance(b, FlopTable) and b is not a
    # FLOPs of a conv net grow with the number of pixels (stem to last stage)
    assert b.total_flops < a.total_flops
    assert b.head_flops == a.head_flops
    assert hash(a) == hash(dense_flops("resnet18"))


def test_every_op_name_is_known():
    spec = get_backbone("regnety_800mf")
    assert set(block_ops(spec.blocks[0])) == set(OPS)
