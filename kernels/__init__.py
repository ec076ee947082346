"""Dynamic CNN kernels: maskers, dynamic residual blocks that really skip work, whole networks.

``build_model(config)`` turns an exported :class:`~dynas.spaces.config.ArchConfig` into a
PyTorch model with a fast (skipping) and a reference (dense, then masked) inference path.
"""

from dynas.kernels.blocks import (PATHS, DynamicBasicBlock, DynamicBlock, DynamicBottleneck, DynamicRegNetYBlock,
                                  build_block)
from dynas.kernels.maskers import GATE_MODES, ChannelMasker, LayerMasker, Masker, SpatialMasker, budget_count
from dynas.kernels.model import DynamicNet, LoadResult, build_model

__all__ = [
    "GATE_MODES",
    "PATHS",
    "budget_count",
    "Masker",
    "SpatialMasker",
    "ChannelMasker",
    "LayerMasker",
    "DynamicBlock",
    "DynamicBasicBlock",
    "DynamicBottleneck",
    "DynamicRegNetYBlock",
    "build_block",
    "DynamicNet",
    "LoadResult",
    "build_model",
]
