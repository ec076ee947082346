"""Dynamic CNN kernels: maskers, dynamic residual blocks that really skip work, whole networks.

``build_model(config)`` turns an exported :class:`~dynas.spaces.config.ArchConfig` into a
PyTorch model with a fast (skipping) and a reference (dense, then masked) inference path.
"""

import importlib

#: public name -> the module that defines it; imported on first use, so that the torch-free
#: modules of this package (:mod:`dynas.kernels.options`) can be imported without torch.
_EXPORTS = {
    **dict.fromkeys(
        ("PATHS", "DynamicBasicBlock", "DynamicBlock", "DynamicBottleneck", "DynamicRegNetYBlock", "build_block"),
        "dynas.kernels.blocks",
    ),
    **dict.fromkeys(
        ("GATE_MODES", "ChannelMasker", "LayerMasker", "Masker", "SpatialMasker", "budget_count"),
        "dynas.kernels.maskers",
    ),
    **dict.fromkeys(("DynamicNet", "LoadResult", "build_model"), "dynas.kernels.model"),
}

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


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dynas.kernels' has no attribute {name!r}")
