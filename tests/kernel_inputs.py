"""Inputs shared by the kernel tests."""

from __future__ import annotations

import torch


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
