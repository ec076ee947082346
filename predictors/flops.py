"""Dense FLOPs of a backbone, per block operator, counted by ``torch.utils.flop_counter``.

The static model (:func:`dynas.spaces.torch_model.build_static_model`) is run once on the meta
device at batch 1 under :class:`~torch.utils.flop_counter.FlopCounterMode`; its per-module
hierarchy is read back through :func:`~dynas.spaces.torch_model.module_name_for`.  Nothing is
computed by hand-written formulas.

Units: FLOPs per image, a multiply-accumulate counted as 2 FLOPs (flop_counter's convention).
Only convolutions and matrix products are counted (BN, activations, pooling, residual adds and
the SE channel scaling are not), which is also how published GFLOPs figures are usually quoted
(ResNet-50 at 224x224: about 4.1 GMACs = 8.2 GFLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

from dynas.errors import ConfigError
from dynas.spaces.backbones import get_backbone

__all__ = ["FlopTable", "dense_flops", "share_flop_tables"]


@dataclass(frozen=True)
class FlopTable:
    """Dense FLOPs of one backbone at one input size (per image).

    ``blocks`` maps a block name (``BlockSpec.name``, e.g. ``"stages.2.0"``) to the FLOPs of each
    operator the block has (a subset of ``conv1``, ``conv2``, ``se``, ``conv3``, ``downsample``;
    a DenseNet layer's ``downsample`` is the transition after its dense block, which its block
    total includes).
    """

    backbone: str
    input_hw: tuple[int, int]
    total_flops: int
    stem_flops: int
    head_flops: int
    blocks: Mapping[str, Mapping[str, int]] = field(hash=False, repr=False)
    block_totals: Mapping[str, int] = field(hash=False, repr=False)

    @property
    def total_gflops(self) -> float:
        return self.total_flops / 1e9

    def _block(self, block_name: str) -> Mapping[str, int]:
        try:
            return self.blocks[block_name]
        except KeyError:
            names = list(self.blocks)
            raise ConfigError(
                f"block_name={block_name!r} is unknown for {self.backbone}; allowed: {names[0]} .. {names[-1]}"
            ) from None

    def op(self, block_name: str, op: str) -> int:
        """FLOPs of operator ``op`` of block ``block_name``; 0 for an operator the block lacks
        (e.g. ``downsample`` of a non-first block, ``se`` of a ResNet block)."""
        from dynas.spaces.torch_model import OPS

        if op not in OPS:
            raise ConfigError(f"op={op!r} is unknown; allowed: {', '.join(OPS)}")
        return self._block(block_name).get(op, 0)

    def block_flops(self, block_name: str) -> dict[str, int]:
        """``{op: FLOPs}`` for the operators block ``block_name`` has, in execution order."""
        return dict(self._block(block_name))

    def block_total_flops(self, block_name: str) -> int:
        """FLOPs of the whole block module (equals the sum of its operators)."""
        self._block(block_name)
        return self.block_totals[block_name]

    def stage_flops(self, stage: int) -> int:
        """FLOPs of all blocks of ``stage``."""
        prefix = f"stages.{stage}."
        flops = [v for k, v in self.block_totals.items() if k.startswith(prefix)]
        if not flops:
            raise ConfigError(f"stage={stage!r} does not exist in {self.backbone}")
        return sum(flops)


def _module_flops(counts: Mapping[str, Mapping[object, int]], root: str, name: str) -> int:
    # flop_counter names modules "<RootClass>.<path>"; a module that ran no counted op is absent.
    return sum(counts.get(f"{root}.{name}", {}).values())


#: (backbone, (H, W)) -> FlopTable counted in this process or adopted by share_flop_tables
_TABLES: dict[tuple[str, tuple[int, int]], FlopTable] = {}


def _dense_flops(backbone: str, input_hw: tuple[int, int]) -> FlopTable:
    key = (backbone, tuple(input_hw))
    if key not in _TABLES:
        _TABLES[key] = _count_flops(backbone, key[1])
    return _TABLES[key]


def share_flop_tables(tables: Sequence[FlopTable] | None = None) -> tuple[FlopTable, ...]:
    """Hand FLOP tables between processes: returns the tables counted here (no argument), or
    adopts ``tables`` from another process so that predicting there needs neither torch nor a
    recount (search worker processes start in well under a second this way)."""
    for t in tables or ():
        _TABLES.setdefault((t.backbone, tuple(t.input_hw)), t)
    return tuple(_TABLES.values())


def _count_flops(backbone: str, input_hw: tuple[int, int]) -> FlopTable:
    # torch is imported here, not at module level, so that a FlopTable handed to another
    # process (share_flop_tables) unpickles without torch.
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dynas.spaces.torch_model import (
        block_module_name,
        block_ops,
        build_static_model,
        head_module_names,
        module_name_for,
        stem_module_names,
    )

    spec = get_backbone(backbone, input_hw)
    model = build_static_model(spec, device="meta").eval()
    x = torch.empty(1, 3, *input_hw, device="meta")  # [1, 3, H, W]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    blocks: dict[str, Mapping[str, int]] = {}
    totals: dict[str, int] = {}
    for b in spec.blocks:
        ops = {op: _module_flops(counts, root, module_name_for(b, op)) for op in block_ops(b)}
        blocks[b.name] = MappingProxyType(ops)
        # a dense layer's "downsample" is the transition after it, a module of its own
        totals[b.name] = _module_flops(counts, root, block_module_name(b)) + (
            ops.get("downsample", 0) if b.kind == "dense" else 0
        )
    return FlopTable(
        backbone=backbone,
        input_hw=spec.input_hw,
        total_flops=counter.get_total_flops(),
        stem_flops=sum(_module_flops(counts, root, n) for n in stem_module_names(spec)),
        head_flops=sum(_module_flops(counts, root, n) for n in head_module_names(spec)),
        blocks=MappingProxyType(blocks),
        block_totals=MappingProxyType(totals),
    )


def dense_flops(backbone: str, input_size: object = 224) -> FlopTable:
    """Per-operator dense FLOPs of ``backbone`` at ``input_size`` (``224`` or ``(H, W)``), cached."""
    spec = get_backbone(backbone, input_size)  # validates name and size, normalises to (H, W)
    return _dense_flops(backbone, spec.input_hw)
