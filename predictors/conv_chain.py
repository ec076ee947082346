"""Cost pieces of a block's convolution chain on a GPU, shared by the block models of
:mod:`dynas.predictors.latency` (ResNet, RegNet) and :mod:`dynas.predictors.dense_cost`
(DenseNet): a conv of the chain, its channel gate, a conv over whole maps, the channel masker,
and interpolation between integer sample counts."""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple

from dynas.predictors.gpu import ConvOp, Hardware, OpCost, conv_cost, fc_cost, memory_cost
from dynas.spaces.backbones import BlockSpec
from dynas.spaces.config import StageConfig, uses_channel

__all__ = [
    "ChainConv",
    "Gate",
    "gate_of",
    "gated_fields",
    "dense_conv",
    "mlp_ops",
    "channel_masker",
    "interpolate",
    "ops_total_s",
]


class ChainConv(NamedTuple):
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    groups: int
    gate_in: bool  # input channels are the gated width
    gate_out: bool  # output channels are the gated width


class Gate(NamedTuple):
    groups: int  # 0 = no channel gating
    active: int


def gate_of(b: BlockSpec, st: StageConfig) -> Gate:
    if not uses_channel(st.paradigm):
        return Gate(0, 0)
    groups = b.width // st.channel_granularity
    active = max(1, min(groups, math.ceil(st.channel_density * groups - 1e-9)))
    return Gate(groups, active)


def gated_fields(cv: ChainConv, gate: Gate, n: int, cin_live: float | None = None) -> dict[str, Any]:
    """The channel-gating fields of ``cv``'s :class:`ConvOp` for ``n`` samples: the input
    channels it reads (the gate's active share of a gated input, else ``cin_live`` or all), the
    gate's groups on a gated output, and whether its weights shrink with the gates (batch 1)."""
    cin_active = cv.cin if cin_live is None else cin_live
    if cv.gate_in and gate.groups:
        cin_active = cv.cin * gate.active // gate.groups
    gated_out = cv.gate_out and gate.groups
    return {
        "cin_active": cin_active,
        "gate_groups": gate.groups if gated_out else 0,
        "gate_active": gate.active if gated_out else 0,
        "weights_scale_with_gates": n == 1 and bool(gate.groups),
    }


def dense_conv(
    hw: Hardware,
    cv: ChainConv,
    n: int,
    in_hw: tuple[int, int],
    gate: Gate,
    extra_out: int = 0,
    cin_live: float | None = None,
) -> OpCost:
    """A conv over whole maps of ``n`` samples, possibly channel-gated; ``cin_live``: input
    channels it reads when fewer than ``cv.cin`` hold data (DenseNet features nobody produced)."""
    out_h = (in_hw[0] + 2 * (cv.k // 2) - cv.k) // cv.stride + 1
    out_w = (in_hw[1] + 2 * (cv.k // 2) - cv.k) // cv.stride + 1
    return conv_cost(
        hw,
        ConvOp(
            units=n,
            cin=cv.cin,
            cout=cv.cout + extra_out,
            out_h=out_h,
            out_w=out_w,
            k=cv.k,
            stride=cv.stride,
            groups=cv.groups,
            in_row=in_hw[1] + 2 * (cv.k // 2),
            dram_in_per_channel=n * in_hw[0] * in_hw[1],
            **gated_fields(cv, gate, n, cin_live),
        ),
    )


def mlp_ops(hw: Hardware, n: int, cin: int, cout: int) -> tuple[OpCost, OpCost]:
    hidden = max(cin // 16, 16)  # LAUDNet masker MLP: reduction 16, hidden at least 16
    return fc_cost(hw, n, cin, hidden), fc_cost(hw, n, hidden, cout)


def channel_masker(hw: Hardware, b: BlockSpec, n: int, outputs: int, pool: bool = True) -> list[tuple[str, OpCost]]:
    fc1, fc2 = mlp_ops(hw, n, b.in_channels, outputs)
    ops = [("masker fc1", fc1), ("masker fc2", fc2)]
    if pool:
        ops.insert(0, ("masker pool", memory_cost(hw, n * b.in_channels * b.in_hw[0] * b.in_hw[1])))
    return ops


def interpolate(lo: list[tuple[str, OpCost]], hi: list[tuple[str, OpCost]], frac: float) -> list[tuple[str, OpCost]]:
    """Per-op linear interpolation between the op lists at floor and ceil of the sample count."""
    lo_map = dict(lo)
    out = []
    for name, h in hi:
        low = lo_map.get(name, OpCost(0.0, 0.0, 0.0, 0.0))
        out.append(
            (
                name,
                OpCost(
                    low.compute_s + frac * (h.compute_s - low.compute_s),
                    low.memory_s + frac * (h.memory_s - low.memory_s),
                    low.launch_s + frac * (h.launch_s - low.launch_s),
                    low.macs + frac * (h.macs - low.macs),
                    h.schedule,
                    low.dram_bytes + frac * (h.dram_bytes - low.dram_bytes),
                ),
            )
        )
    return out


def ops_total_s(ops: Iterable[tuple[str, OpCost]]) -> float:
    return sum(c.total_s for _, c in ops)
