"""Backbone specifications as data.

A backbone *family definition* (depths, widths, block type) is turned into a
:class:`BackboneSpec` for a concrete input resolution.  Every block's shapes, stride, widths,
groups and SE width are derived here by the usual convolution arithmetic; nothing downstream
keeps per-model lists.

Shapes follow torchvision: ResNet v1.5 (stride on the 3x3 conv, 1x1 stride-s downsample),
RegNetX/Y (3x3 stem to 32 channels, grouped 3x3 conv, squeeze-excitation from the block input
width on Y only, 1x1 stride-s downsample whenever stride or width changes; stage widths and
depths derived from the published design parameters depth, w_0, w_a, w_m, group width, as
torchvision's ``BlockParams.from_init_params`` does), DenseNet (Huang et al., CVPR 2017;
torchvision's DenseNet-BC: 7x7 stem and max pool, dense layers BN-ReLU-1x1 conv to
``bn_size x growth`` channels, BN-ReLU-3x3 conv to ``growth`` new channels that are concatenated
to the layer's input; a transition BN-ReLU-1x1 conv to half the channels and a 2x2 average pool
between dense blocks; BN + ReLU before the classifier).

Each backbone also states the paradigms it offers (:attr:`BackboneSpec.paradigms`), with the
reason for any it leaves out (:attr:`BackboneSpec.paradigm_note`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from dynas.errors import ConfigError

__all__ = [
    "BlockSpec",
    "StemSpec",
    "BackboneSpec",
    "BACKBONES",
    "ALL_PARADIGMS",
    "regnet_stages",
    "transition_of",
    "get_backbone",
    "list_backbones",
    "conv_out",
    "parse_input_size",
]


#: every paradigm dynas knows (:data:`dynas.spaces.config.PARADIGMS` is this tuple)
ALL_PARADIGMS: tuple[str, ...] = ("static", "spatial", "channel", "layer", "spatial+channel", "layer+channel")


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class BlockSpec:
    """One residual block with every shape resolved.

    ``kind`` is ``"basic"`` (3x3 -> 3x3), ``"bottleneck"`` (1x1 -> 3x3 -> 1x1) or
    ``"regnety"`` (1x1 -> grouped 3x3 -> SE -> 1x1; ``se_channels == 0``: RegNetX) or
    ``"dense"`` (a DenseNet layer: BN-ReLU-1x1 conv -> BN-ReLU-3x3 conv).  ``width`` is the gated
    width: the channels that channel skipping selects from (conv1's output, the 3x3 conv's input
    and output; a dense layer's bottleneck).

    A dense layer reads the ``in_channels`` features of its dense block so far (the block's
    input, ``in_channels - index * out_channels`` channels, then ``out_channels`` new ones from
    each layer before it) and adds ``out_channels`` (the growth rate) new ones.  On the last layer
    of a dense block that a transition follows, ``has_downsample`` marks that transition: the
    layer's ``downsample`` operator is BN-ReLU-1x1 conv of the block's output
    (``in_channels + out_channels`` channels) to half as many, then a 2x2 average pool with
    stride 2 (:func:`transition_of`).
    """

    stage: int
    index: int
    kind: str
    in_channels: int
    width: int
    out_channels: int
    stride: int
    groups: int
    se_channels: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    has_downsample: bool

    @property
    def name(self) -> str:
        return f"stages.{self.stage}.{self.index}"


@dataclass(frozen=True)
class StemSpec:
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    conv_out_hw: tuple[int, int]
    maxpool: bool
    out_hw: tuple[int, int]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str
    input_hw: tuple[int, int]
    stem: StemSpec
    blocks: tuple[BlockSpec, ...]
    head_in: int
    num_classes: int
    #: paradigms a stage may use on this backbone (``"static"`` always among them)
    paradigms: tuple[str, ...] = ALL_PARADIGMS
    #: why the paradigms not in :attr:`paradigms` are left out ("" when none is)
    paradigm_note: str = ""
    #: BN + ReLU on the last stage's map before pooling (DenseNet's ``norm5``)
    head_norm: bool = False

    @property
    def num_stages(self) -> int:
        return self.blocks[-1].stage + 1

    def __post_init__(self) -> None:
        # Per-stage block tuples, computed once (not a field: equality and hash ignore it).
        by_stage = tuple(tuple(b for b in self.blocks if b.stage == s) for s in range(self.blocks[-1].stage + 1))
        object.__setattr__(self, "_by_stage", by_stage)
        object.__setattr__(self, "min_side", min(min(b.out_hw) for b in self.blocks))

    def stage_blocks(self, stage: int) -> tuple[BlockSpec, ...]:
        return self._by_stage[stage]

    def stage_out_hw(self, stage: int) -> tuple[int, int]:
        return self.stage_blocks(stage)[0].out_hw

    def stage_width(self, stage: int) -> int:
        return self.stage_blocks(stage)[0].width

    def stage_depth(self, stage: int) -> int:
        return len(self.stage_blocks(stage))


_NO_LAYER = ("static", "spatial", "channel", "spatial+channel")
_NO_SPATIAL = ("static", "channel", "layer", "layer+channel")
_REGNET_NOTE = (
    "no layer skipping on RegNet, as in LAUDNet's RegNet code; RegNetY-400MF and -800MF keep it, "
    "measured and calibrated there"
)
_DENSENET_NOTE = (
    "no spatial skipping on DenseNet: a position a layer skips would still reach every later layer "
    "of its dense block through that layer's BN, so no later layer could skip it"
)


@dataclass(frozen=True)
class _ResNetDef:
    block: str  # "basic" or "bottleneck"
    depths: tuple[int, ...]
    planes: tuple[int, ...] = (64, 128, 256, 512)

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


@dataclass(frozen=True)
class _RegNetDef:
    """RegNet design parameters (Radosavovic et al., CVPR 2020, "Designing Network Design Spaces"):
    ``depth`` blocks whose widths follow w_0 + w_a * j quantized to powers of w_m; ``se_ratio``
    0 = RegNetX."""

    depth: int
    w_0: int
    w_a: float
    w_m: float
    group_width: int
    se_ratio: float = 0.0
    bottleneck_ratio: float = 1.0
    stem_width: int = 32
    paradigms: tuple[str, ...] = _NO_LAYER
    #: how stage widths are made divisible by the group width: "torchvision" (never more than 10%
    #: down, as torchvision's regnet.py) for the sizes torchvision ships, "pycls" (nearest multiple,
    #: as the paper's own code) for the others, so each is the network its published figures are of
    width_rule: str = "torchvision"


@dataclass(frozen=True)
class _DenseNetDef:
    """DenseNet-BC as torchvision builds it: growth rate k, ``bn_size * k`` bottleneck channels."""

    block_config: tuple[int, ...]
    growth_rate: int = 32
    num_init_features: int = 64
    bn_size: int = 4


def _y(depth: int, w_0: int, w_a: float, w_m: float, group_width: int, **kw) -> _RegNetDef:
    return _RegNetDef(depth, w_0, w_a, w_m, group_width, se_ratio=0.25, **kw)


BACKBONES: dict[str, _ResNetDef | _RegNetDef | _DenseNetDef] = {
    "resnet18": _ResNetDef("basic", (2, 2, 2, 2)),
    "resnet34": _ResNetDef("basic", (3, 4, 6, 3)),
    "resnet50": _ResNetDef("bottleneck", (3, 4, 6, 3)),
    "resnet101": _ResNetDef("bottleneck", (3, 4, 23, 3)),
    "resnet152": _ResNetDef("bottleneck", (3, 8, 36, 3)),
    # RegNet design parameters as published (the RegNet paper's pycls model zoo; torchvision's
    # regnet.py uses the same numbers for the sizes it ships).  RegNetY-400MF / -800MF give the
    # widths LAUDNet reports (48, 104, 208, 440) / (64, 144, 320, 784).
    "regnetx_400mf": _RegNetDef(22, 24, 24.48, 2.54, 16),
    "regnetx_800mf": _RegNetDef(16, 56, 35.73, 2.28, 16),
    "regnetx_1_6gf": _RegNetDef(18, 80, 34.01, 2.25, 24),
    "regnetx_3_2gf": _RegNetDef(25, 88, 26.31, 2.25, 48),
    "regnetx_4gf": _RegNetDef(23, 96, 38.65, 2.43, 40, width_rule="pycls"),
    "regnetx_6_4gf": _RegNetDef(17, 184, 60.83, 2.07, 56, width_rule="pycls"),
    "regnetx_8gf": _RegNetDef(23, 80, 49.56, 2.88, 120),
    "regnetx_12gf": _RegNetDef(19, 168, 73.36, 2.37, 112, width_rule="pycls"),
    "regnetx_16gf": _RegNetDef(22, 216, 55.59, 2.1, 128),
    "regnetx_32gf": _RegNetDef(23, 320, 69.86, 2.0, 168),
    "regnety_400mf": _y(16, 48, 27.89, 2.09, 8, paradigms=ALL_PARADIGMS),
    "regnety_800mf": _y(14, 56, 38.84, 2.4, 16, paradigms=ALL_PARADIGMS),
    "regnety_1_6gf": _y(27, 48, 20.71, 2.65, 24),
    "regnety_3_2gf": _y(21, 80, 42.63, 2.66, 24),
    "regnety_4gf": _y(22, 96, 31.41, 2.24, 64, width_rule="pycls"),
    "regnety_6_4gf": _y(25, 112, 33.22, 2.27, 72, width_rule="pycls"),
    "regnety_8gf": _y(17, 192, 76.82, 2.19, 56),
    "regnety_12gf": _y(19, 168, 73.36, 2.37, 112, width_rule="pycls"),
    "regnety_16gf": _y(18, 200, 106.23, 2.48, 112),
    "regnety_32gf": _y(20, 232, 115.89, 2.53, 232),
    "densenet121": _DenseNetDef((6, 12, 24, 16)),
    "densenet169": _DenseNetDef((6, 12, 32, 32)),
    "densenet201": _DenseNetDef((6, 12, 48, 32)),
}


def _make_divisible(v: float, divisor: int) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def regnet_stages(d: _RegNetDef) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(stage widths, stage depths, group widths) of RegNet design ``d``, derived as in the paper
    and torchvision: block j's width w_0 + w_a * j is snapped to w_0 * w_m^round(log_wm((w_0 +
    w_a j) / w_0)), quantized to a multiple of 8; runs of equal width are the stages; each stage's
    bottleneck width is then made divisible by its group width (min(group_width, width)) by
    ``d.width_rule``."""
    block_widths = []
    for j in range(d.depth):
        capacity = round(math.log((j * d.w_a + d.w_0) / d.w_0) / math.log(d.w_m))  # half to even, as torch.round
        block_widths.append(int(round(d.w_0 * d.w_m**capacity / 8) * 8))
    widths: list[int] = []
    depths: list[int] = []
    for w in block_widths:
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    groups = [min(d.group_width, int(w * d.bottleneck_ratio)) for w in widths]
    if d.width_rule == "pycls":
        bottlenecks = [int(round(int(w * d.bottleneck_ratio) / g) * g) for w, g in zip(widths, groups)]
    else:
        bottlenecks = [_make_divisible(int(w * d.bottleneck_ratio), g) for w, g in zip(widths, groups)]
    widths = [int(w / d.bottleneck_ratio) for w in bottlenecks]
    return tuple(widths), tuple(depths), tuple(groups)


MIN_INPUT_SIDE = 32


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def parse_input_size(value: object, field: str = "input_size") -> tuple[int, int]:
    """Accept ``224``, ``[224, 224]`` or ``(H, W)``; return ``(H, W)``."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not a size; allowed: an integer >= {MIN_INPUT_SIDE} or [H, W]")
    if isinstance(value, int):
        hw = (value, value)
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        hw = (int(value[0]), int(value[1]))
    else:
        raise ConfigError(f"{field}={value!r} is not a size; allowed: an integer >= {MIN_INPUT_SIDE} or [H, W]")
    if min(hw) < MIN_INPUT_SIDE:
        raise ConfigError(f"{field}={value!r} is too small; allowed: sides >= {MIN_INPUT_SIDE}")
    return hw


def _hw(hw: tuple[int, int], kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return (conv_out(hw[0], kernel, stride, padding), conv_out(hw[1], kernel, stride, padding))


def _resnet(name: str, d: _ResNetDef, input_hw: tuple[int, int]) -> BackboneSpec:
    conv_hw = _hw(input_hw, 7, 2, 3)
    pool_hw = _hw(conv_hw, 3, 2, 1)
    stem = StemSpec(3, 64, 7, 2, 3, conv_hw, True, pool_hw)
    blocks = []
    in_ch, hw = 64, pool_hw
    for s, (depth, planes) in enumerate(zip(d.depths, d.planes)):
        for i in range(depth):
            stride = (1 if s == 0 else 2) if i == 0 else 1
            out_ch = planes * d.expansion
            out_hw = _hw(hw, 3, stride, 1)  # the 3x3 conv carries the stride
            blocks.append(
                BlockSpec(
                    stage=s,
                    index=i,
                    kind=d.block,
                    in_channels=in_ch,
                    width=planes,
                    out_channels=out_ch,
                    stride=stride,
                    groups=1,
                    se_channels=0,
                    in_hw=hw,
                    out_hw=out_hw,
                    has_downsample=stride != 1 or in_ch != out_ch,
                )
            )
            in_ch, hw = out_ch, out_hw
    return BackboneSpec(name, "resnet", input_hw, stem, tuple(blocks), in_ch, 1000, ALL_PARADIGMS)


def _regnet(name: str, d: _RegNetDef, input_hw: tuple[int, int]) -> BackboneSpec:
    conv_hw = _hw(input_hw, 3, 2, 1)
    stem = StemSpec(3, d.stem_width, 3, 2, 1, conv_hw, False, conv_hw)
    blocks = []
    in_ch, hw = d.stem_width, conv_hw
    for s, (out_ch, depth, group_width) in enumerate(zip(*regnet_stages(d))):
        width = int(round(out_ch * d.bottleneck_ratio))
        groups = width // group_width
        for i in range(depth):
            stride = 2 if i == 0 else 1
            out_hw = _hw(hw, 3, stride, 1)
            blocks.append(
                BlockSpec(
                    stage=s,
                    index=i,
                    kind="regnety",
                    in_channels=in_ch,
                    width=width,
                    out_channels=out_ch,
                    stride=stride,
                    groups=groups,
                    se_channels=int(round(d.se_ratio * in_ch)),
                    in_hw=hw,
                    out_hw=out_hw,
                    has_downsample=stride != 1 or in_ch != out_ch,
                )
            )
            in_ch, hw = out_ch, out_hw
    note = "" if d.paradigms == ALL_PARADIGMS else _REGNET_NOTE
    return BackboneSpec(name, "regnety", input_hw, stem, tuple(blocks), in_ch, 1000, d.paradigms, note)


def _densenet(name: str, d: _DenseNetDef, input_hw: tuple[int, int]) -> BackboneSpec:
    conv_hw = _hw(input_hw, 7, 2, 3)
    pool_hw = _hw(conv_hw, 3, 2, 1)
    stem = StemSpec(3, d.num_init_features, 7, 2, 3, conv_hw, True, pool_hw)
    blocks = []
    c, hw, k = d.num_init_features, pool_hw, d.growth_rate
    for s, layers in enumerate(d.block_config):
        last_stage = s == len(d.block_config) - 1
        for i in range(layers):
            blocks.append(
                BlockSpec(
                    stage=s,
                    index=i,
                    kind="dense",
                    in_channels=c + i * k,
                    width=d.bn_size * k,
                    out_channels=k,
                    stride=1,
                    groups=1,
                    se_channels=0,
                    in_hw=hw,
                    out_hw=hw,
                    has_downsample=i == layers - 1 and not last_stage,
                )
            )
        c += layers * k
        if not last_stage:  # transition: half the channels, 2x2 average pool
            c, hw = c // 2, _hw(hw, 2, 2, 0)
    return BackboneSpec(
        name, "densenet", input_hw, stem, tuple(blocks), c, 1000, _NO_SPATIAL, _DENSENET_NOTE, head_norm=True
    )


def transition_of(b: BlockSpec) -> tuple[int, int, tuple[int, int]]:
    """(input channels, output channels, output map) of the transition after dense layer ``b``
    (one with ``has_downsample``)."""
    c = b.in_channels + b.out_channels
    return c, c // 2, _hw(b.out_hw, 2, 2, 0)


@functools.lru_cache(maxsize=128)
def _build(name: str, input_hw: tuple[int, int]) -> BackboneSpec:
    d = BACKBONES[name]
    if isinstance(d, _ResNetDef):
        return _resnet(name, d, input_hw)
    if isinstance(d, _DenseNetDef):
        return _densenet(name, d, input_hw)
    return _regnet(name, d, input_hw)


def get_backbone(name: str, input_size: object = 224) -> BackboneSpec:
    """Return the spec of backbone ``name`` for ``input_size`` (an int or ``(H, W)``)."""
    if name not in BACKBONES:
        raise ConfigError(f"backbone={name!r} is unknown; allowed: {', '.join(list_backbones())}")
    hw = parse_input_size(input_size)
    spec = _build(name, hw)
    if spec.min_side < 1:
        raise ConfigError(f"input_size={input_size!r} is too small for {name}; its last stage would be empty")
    return spec
