"""Predicted cost of each exit of an early-exit config (``ArchConfig.exits``).

An exit after stage ``s`` costs the stem, stages ``0..s`` and its head.  The head is modelled
the way the network's own head is: on GPU targets a global pool (memory) and a fully connected
layer (``gpu.fc_cost``), preceded for the ``"conv"`` head by a dense 1x1 conv over the stage's
map (BN and ReLU folded, as in the blocks); on calibrated CPU targets the own head's work terms
(``cpu.exit_head_work``).  FLOPs count convolutions and matrix products only, 2 per
multiply-accumulate, like :mod:`dynas.predictors.flops`.

:func:`attach_exits` is called by :func:`dynas.predictors.latency.predict` for configs with
exits; it reads the stages' predictions, so exits never change the stages' or the whole
network's numbers: the last exit *is* the prediction (``latency_ms``, FLOPs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from dynas.predictors.gpu import ConvOp, Hardware, conv_cost, fc_cost, memory_cost
from dynas.predictors.result import ExitPrediction, Prediction
from dynas.spaces.backbones import BackboneSpec
from dynas.spaces.config import ArchConfig

__all__ = ["exit_inputs", "head_flops", "gpu_head_ms", "attach_exits"]


def exit_inputs(spec: BackboneSpec, stage: int) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of the map an exit after ``stage`` reads: the stage's output."""
    return spec.stage_blocks(stage)[-1].out_channels, spec.stage_out_hw(stage)


def _width(config: ArchConfig) -> int:
    """The conv head's width, 0 for the light head (the convention of ``cpu.exit_head_work``)."""
    return config.exit_width if config.exit_head == "conv" else 0


def head_flops(cin: int, map_hw: tuple[int, int], classes: int, width: int = 0) -> float:
    """FLOPs per image of an exit head (``width`` 0: light head, else the conv head's width)."""
    fc_in = width or cin
    conv = 2.0 * cin * width * map_hw[0] * map_hw[1]
    return conv + 2.0 * fc_in * classes


@functools.lru_cache(maxsize=None)
def gpu_head_ms(hw: Hardware, cin: int, map_hw: tuple[int, int], classes: int, n: int, width: int = 0) -> float:
    """Latency (ms) of an exit head on ``n`` maps of ``cin`` x ``map_hw`` on a GPU target."""
    h, w = map_hw
    total = 0.0
    if width:
        conv = ConvOp(
            units=n,
            cin=cin,
            cout=width,
            out_h=h,
            out_w=w,
            k=1,
            stride=1,
            groups=1,
            in_row=w,
            dram_in_per_channel=n * h * w,
            cin_active=cin,
            gate_groups=0,
            gate_active=0,
            weights_scale_with_gates=False,
        )
        total += conv_cost(hw, conv).total_s
        cin = width
    total += memory_cost(hw, n * cin * (h * w + 1)).total_s  # global pool, as the own head's
    total += fc_cost(hw, n, cin, classes).total_s
    return total * 1e3


def attach_exits(
    pred: Prediction, stem_flops: float, head_ms: Callable[[int, tuple[int, int], int], float]
) -> Prediction:
    """``pred`` with its :attr:`~Prediction.exits` filled in (unchanged when the config has none).

    ``stem_flops``: the stem's FLOPs per image; ``head_ms(cin, map_hw, width)``: the target's
    latency of one exit head at the prediction's batch size.
    """
    cfg = pred.config
    if not cfg.exits:
        return pred
    spec = cfg.spec
    n = pred.batch_size
    width = _width(cfg)
    exits: list[ExitPrediction] = []
    heads_before = 0.0  # ms of the exit heads already passed (anytime path)
    for k, s in enumerate(cfg.exits):
        cin, map_hw = exit_inputs(spec, s)
        body_ms = pred.stem_ms + sum(p.latency_ms for p in pred.stages[: s + 1])
        body_flops = stem_flops + sum(p.expected_gflops for p in pred.stages[: s + 1]) * 1e9
        h_ms = head_ms(cin, map_hw, width)
        ms = body_ms + h_ms
        exits.append(
            ExitPrediction(
                k,
                s,
                cfg.exit_head,
                ms,
                ms / n,
                body_flops + head_flops(cin, map_hw, spec.num_classes, width),
                h_ms,
                ms + heads_before,
                (ms + heads_before) / n,
            )
        )
        heads_before += h_ms
    anytime = pred.latency_ms + heads_before
    exits.append(
        ExitPrediction(
            len(cfg.exits),
            spec.num_stages - 1,
            "own",
            pred.latency_ms,
            pred.latency_ms_per_image,
            pred.expected_gflops * 1e9,
            pred.head_ms,
            anytime,
            anytime / n,
        )
    )
    return dataclasses.replace(pred, exits=tuple(exits))
