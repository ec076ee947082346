"""Inputs shared by the kernel tests: BN statistics, the blocks they build and how they run both
paths."""

from __future__ import annotations

import torch

from dynas.kernels import DynamicBlock, build_block
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import StageConfig


def randomize_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics/affine so that masking mistakes show up in the output."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)


ATOL = RTOL = 1e-4
INPUT = 71  # stage maps 18 / 9 / 5 / 3 for both ResNet and RegNetY: odd maps, even->odd and odd->odd strides
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (backbone, stage, index) -> (spatial granularities, channel granularities) the kernel tests use
BLOCKS = {
    ("resnet18", 1, 0): ((1, 3), (2, 32)),  # basic, stride 2 + downsample, 18 -> 9
    ("resnet50", 1, 0): ((1, 3), (1, 32)),  # bottleneck, stride 2 + downsample, 18 -> 9
    ("resnet50", 1, 1): ((1, 3), (4, 64)),  # bottleneck, identity shortcut, 9 -> 9
    ("resnet50", 2, 0): ((1, 5), (2, 128)),  # bottleneck, stride 2, odd 9 -> 5
    ("regnety_400mf", 1, 0): ((1, 3), (4, 13)),  # grouped (8 per group) + SE; G=4 inside, G=13 across conv groups
    ("regnety_400mf", 2, 0): ((1, 5), (8, 26)),  # RegNetY, stride 2, odd 9 -> 5; G=8 = whole conv groups
}
DYNAMIC = ("spatial", "channel", "layer", "spatial+channel", "layer+channel")


def block_spec(backbone: str, stage: int, index: int, size: int = INPUT):
    """The BlockSpec of block ``index`` of stage ``stage`` at ``size`` x ``size`` input."""
    return next(b for b in get_backbone(backbone, size).blocks if b.stage == stage and b.index == index)


def stage_choice(paradigm: str, rate: float, s: int | None, g: int | None) -> StageConfig:
    """``paradigm`` at ``rate`` with the granularities it uses of ``s`` (spatial) and ``g`` (channel)."""
    return StageConfig(
        paradigm=paradigm,
        rate=rate,
        spatial_granularity=s if paradigm in ("spatial", "spatial+channel") else None,
        channel_granularity=g if "channel" in paradigm else None,
        channel_rate=rate if "+" in paradigm else None,
    )


def make_block(key, paradigm, rate, gi, device="cpu"):
    """(spec, dynamic block in eval mode) of BLOCKS[key] at its ``gi``-th granularities, random BN."""
    spec = block_spec(*key)
    grans_s, grans_c = BLOCKS[key]
    blk = build_block(spec, stage_choice(paradigm, rate, grans_s[gi], grans_c[gi]))
    torch.manual_seed(1)
    randomize_bn(blk)
    return spec, blk.to(device).eval()


def both_paths(blk: DynamicBlock, x: torch.Tensor):
    """(fast output, reference output, the reference pass's FLOPs readout) of ``blk`` on ``x``."""
    with torch.no_grad():
        blk.set_path("reference")
        ref = blk(x)
        ref_flops = blk.last_flops
        blk.set_path("fast")
        fast = blk(x)
    return fast, ref, ref_flops


def set_gate_mode(blk: DynamicBlock, mode: str) -> None:
    for m in blk.maskers():
        m.set_gate_mode(mode)
