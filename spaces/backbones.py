"""Backbone specifications as data.

A backbone *family definition* (depths, widths, block type) is turned into a
:class:`BackboneSpec` for a concrete input resolution.  Every block's shapes, stride, widths,
groups and SE width are derived here by the usual convolution arithmetic; nothing downstream
keeps per-model lists.

Shapes follow torchvision: ResNet v1.5 (stride on the 3x3 conv, 1x1 stride-s downsample),
RegNetY (3x3 stem to 32 channels, grouped 3x3 conv, squeeze-excitation from the block input
width, 1x1 stride-s downsample whenever stride or width changes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dynas.errors import ConfigError

__all__ = [
    "BlockSpec",
    "StemSpec",
    "BackboneSpec",
    "BACKBONES",
    "get_backbone",
    "list_backbones",
    "conv_out",
    "parse_input_size",
]


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class BlockSpec:
    """One residual block with every shape resolved.

    ``kind`` is ``"basic"`` (3x3 -> 3x3), ``"bottleneck"`` (1x1 -> 3x3 -> 1x1) or
    ``"regnety"`` (1x1 -> grouped 3x3 -> SE -> 1x1).  ``width`` is the gated width: the channels
    that channel skipping selects from (conv1's output, the 3x3 conv's input and output).
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


@dataclass(frozen=True)
class _ResNetDef:
    block: str  # "basic" or "bottleneck"
    depths: tuple[int, ...]
    planes: tuple[int, ...] = (64, 128, 256, 512)

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


@dataclass(frozen=True)
class _RegNetYDef:
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    group_width: int
    se_ratio: float = 0.25
    bottleneck_ratio: float = 1.0
    stem_width: int = 32


BACKBONES: dict[str, _ResNetDef | _RegNetYDef] = {
    "resnet18": _ResNetDef("basic", (2, 2, 2, 2)),
    "resnet34": _ResNetDef("basic", (3, 4, 6, 3)),
    "resnet50": _ResNetDef("bottleneck", (3, 4, 6, 3)),
    "resnet101": _ResNetDef("bottleneck", (3, 4, 23, 3)),
    "resnet152": _ResNetDef("bottleneck", (3, 8, 36, 3)),
    # RegNetY widths/depths/group widths as in the RegNet paper's Y-400MF / Y-800MF rows
    # (also LAUDNet's anchors section 6).
    "regnety_400mf": _RegNetYDef((48, 104, 208, 440), (1, 3, 6, 6), group_width=8),
    "regnety_800mf": _RegNetYDef((64, 144, 320, 784), (1, 3, 8, 2), group_width=16),
}

MIN_INPUT_SIDE = 32


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def parse_input_size(value: object, field: str = "input_size") -> tuple[int, int]:
    """Accept ``224``, ``[224, 224]`` or ``(H, W)``; return ``(H, W)``."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not a size; allowed: an integer >= {MIN_INPUT_SIDE} or [H, W]")
    if isinstance(value, int):
        hw = (value, value)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
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
                    stage=s, index=i, kind=d.block, in_channels=in_ch, width=planes,
                    out_channels=out_ch, stride=stride, groups=1, se_channels=0,
                    in_hw=hw, out_hw=out_hw, has_downsample=stride != 1 or in_ch != out_ch,
                )
            )
            in_ch, hw = out_ch, out_hw
    return BackboneSpec(name, "resnet", input_hw, stem, tuple(blocks), in_ch, 1000)


def _regnety(name: str, d: _RegNetYDef, input_hw: tuple[int, int]) -> BackboneSpec:
    conv_hw = _hw(input_hw, 3, 2, 1)
    stem = StemSpec(3, d.stem_width, 3, 2, 1, conv_hw, False, conv_hw)
    blocks = []
    in_ch, hw = d.stem_width, conv_hw
    for s, (depth, out_ch) in enumerate(zip(d.depths, d.widths)):
        width = int(round(out_ch * d.bottleneck_ratio))
        groups = width // d.group_width
        for i in range(depth):
            stride = 2 if i == 0 else 1
            out_hw = _hw(hw, 3, stride, 1)
            blocks.append(
                BlockSpec(
                    stage=s, index=i, kind="regnety", in_channels=in_ch, width=width,
                    out_channels=out_ch, stride=stride, groups=groups,
                    se_channels=int(round(d.se_ratio * in_ch)),
                    in_hw=hw, out_hw=out_hw, has_downsample=stride != 1 or in_ch != out_ch,
                )
            )
            in_ch, hw = out_ch, out_hw
    return BackboneSpec(name, "regnety", input_hw, stem, tuple(blocks), in_ch, 1000)


@functools.lru_cache(maxsize=128)
def _build(name: str, input_hw: tuple[int, int]) -> BackboneSpec:
    d = BACKBONES[name]
    if isinstance(d, _ResNetDef):
        return _resnet(name, d, input_hw)
    return _regnety(name, d, input_hw)


def get_backbone(name: str, input_size: object = 224) -> BackboneSpec:
    """Return the spec of backbone ``name`` for ``input_size`` (an int or ``(H, W)``)."""
    if name not in BACKBONES:
        raise ConfigError(f"backbone={name!r} is unknown; allowed: {', '.join(list_backbones())}")
    hw = parse_input_size(input_size)
    spec = _build(name, hw)
    if spec.min_side < 1:
        raise ConfigError(f"input_size={input_size!r} is too small for {name}; its last stage would be empty")
    return spec
