"""Cost of a DenseNet layer (and the transition after a dense block) under a stage choice: the
GPU operators (:func:`dense_alternatives`, for :mod:`dynas.predictors.latency`; the expected
FLOPs follow from their executed multiply-accumulates there).

What the kernels of :mod:`dynas.kernels.dense` do, operator by operator:

* maskers on the pooled features: the layer pools only its own ``k`` new channels (the pooled
  vectors of the features before it are kept), then the MLP (channel groups and / or one layer
  gate);
* BN + ReLU of the input features the layer reads (one memory pass), the 1x1 conv to the
  (gated) bottleneck, the 3x3 conv from it to the ``k`` new channels, written into the block's
  feature buffer (no concatenation copy);
* layer gates: the body on the samples that run the layer, interpolated between the integer
  sample counts around ``rate x batch`` as for residual blocks;
* the input channels a layer reads: those of the block input and of the earlier layers that some
  of its ``m`` running samples ran.  With every layer run independently with probability ``r``,
  an earlier layer's channels are unread with probability ``(1 - r)^m`` (a model assumption: the
  kernels' stage quota makes the choices of one sample dependent);
* the transition after a dense block (the last layer's ``downsample``): BN + ReLU of the
  channels some sample of the batch produced, the 1x1 conv to half the channels, a 2x2 average
  pool.
"""

from __future__ import annotations

import functools
import math

from dynas.predictors.conv_chain import ChainConv, Gate, channel_masker, dense_conv, gate_of, interpolate
from dynas.predictors.gpu import Hardware, OpCost, memory_cost
from dynas.spaces.backbones import BlockSpec, transition_of
from dynas.spaces.config import StageConfig, uses_layer

__all__ = ["dense_alternatives", "live_inputs"]

Ops = tuple[tuple[str, OpCost], ...]


def live_inputs(b: BlockSpec, layers_before: int, rate: float, m: float) -> float:
    """Expected input channels read by a layer whose ``m`` running samples each ran every one of
    the ``layers_before`` earlier layers of the block with probability ``rate``."""
    c0 = b.in_channels - b.index * b.out_channels  # the dense block's input
    unread = (1.0 - rate) ** m if rate < 1.0 else 0.0
    return round(c0 + b.out_channels * layers_before * (1.0 - unread), 3)


def _body(hw: Hardware, b: BlockSpec, m: int, gate: Gate, rate: float) -> list[tuple[str, OpCost]]:
    """BN-ReLU, conv1, conv2 of ``m`` samples (none: no ops)."""
    if m <= 0:
        return []
    live = live_inputs(b, b.index, rate, m)
    hw_elems = b.in_hw[0] * b.in_hw[1]
    conv1 = ChainConv("conv1", b.in_channels, b.width, 1, 1, 1, False, True)
    conv2 = ChainConv("conv2", b.width, b.out_channels, 3, 1, 1, True, False)
    return [
        ("norm1 relu", memory_cost(hw, int(round(2 * m * live * hw_elems)))),
        ("conv1", dense_conv(hw, conv1, m, b.in_hw, gate, cin_live=live if live < b.in_channels else None)),
        ("conv2", dense_conv(hw, conv2, m, b.in_hw, gate)),
    ]


def _transition(hw: Hardware, b: BlockSpec, n: int, rate: float) -> list[tuple[str, OpCost]]:
    """The transition after the dense block of its last layer ``b``, on the whole batch."""
    if not b.has_downsample:
        return []
    c_in, c_out, out_hw = transition_of(b)
    live = live_inputs(b, b.index + 1, rate, n)  # every layer of the block, any sample of the batch
    elems = b.out_hw[0] * b.out_hw[1]
    conv = ChainConv("downsample", c_in, c_out, 1, 1, 1, False, False)
    return [
        ("transition norm relu", memory_cost(hw, int(round(2 * n * live * elems)))),
        ("downsample", dense_conv(hw, conv, n, b.out_hw, Gate(0, 0), cin_live=live if live < c_in else None)),
        ("transition pool", memory_cost(hw, n * c_out * (elems + out_hw[0] * out_hw[1]))),
    ]


@functools.lru_cache(maxsize=None)
def dense_alternatives(hw: Hardware, b: BlockSpec, st: StageConfig, n: int) -> tuple[tuple[str, Ops], ...]:
    """(masker placement, ops) of dense layer ``b`` of ``n`` samples under ``st`` (one placement:
    DenseNet has no spatial gates)."""
    p = st.paradigm
    gate = gate_of(b, st)
    if p == "static":
        return (("none", tuple(_body(hw, b, n, gate, 1.0) + _transition(hw, b, n, 1.0))),)
    rate = st.layer_rate
    pool = [("masker pool", memory_cost(hw, n * b.out_channels * b.in_hw[0] * b.in_hw[1]))]  # the new features only
    outputs = (2 if uses_layer(p) else 0) + 2 * gate.groups
    masker = pool + channel_masker(hw, b, n, outputs, pool=False)
    if not uses_layer(p):
        return (("separate", tuple(masker + _body(hw, b, n, gate, 1.0) + _transition(hw, b, n, 1.0))),)
    executed = rate * n  # expected running samples
    lo, hi = math.floor(executed), math.ceil(executed)
    body = interpolate(_body(hw, b, lo, gate, rate), _body(hw, b, hi, gate, rate), executed - lo)
    return (("separate", tuple(masker + body + _transition(hw, b, n, rate))),)
