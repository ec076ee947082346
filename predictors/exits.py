"""Predicted cost of each exit of an early-exit config (``ArchConfig.exits``).

An exit after stage ``s`` costs the stem, stages ``0..s`` and its head.  The head is modelled
the way the network's own head is: on GPU targets a global pool (memory) and a fully connected
layer (``gpu.fc_cost``), preceded for the ``"conv"`` head by a dense 1x1 conv over the stage's
map (BN and ReLU folded, as in the blocks); on calibrated CPU targets the own head's work terms
(``cpu.exit_head_work``).  FLOPs count convolutions and matrix products only, 2 per
multiply-accumulate, like :mod:`dynas.predictors.flops`.

:func:`attach_exits` is called by :func:`dynas.predictors.latency.predict` for configs with
exits; it reads the stages' predictions, so exits never change the stages' or the whole
network's numbers: the last exit *is* the prediction (``latency_ms``, FLOPs, ``energy_mj``).
On targets with energy prices an exit's energy is priced as the network's
(:mod:`dynas.predictors.energy`): the stem's and stages' energies plus its head's operators and
the constant power over the head's latency.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from dynas.predictors.energy import EnergyConstants, ops_energy_mj, static_energy_mj
from dynas.predictors.gpu import ConvOp, Hardware, OpCost, conv_cost, fc_cost, memory_cost
from dynas.predictors.result import ExitPrediction, Prediction
from dynas.spaces.backbones import BackboneSpec
from dynas.spaces.config import ArchConfig

__all__ = ["exit_inputs", "head_flops", "gpu_head_ops", "gpu_head_ms", "gpu_head_cost", "attach_exits"]


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
def gpu_head_ops(
    hw: Hardware, cin: int, map_hw: tuple[int, int], classes: int, n: int, width: int = 0
) -> tuple[tuple[str, OpCost], ...]:
    """The ``(name, cost)`` operators of an exit head on ``n`` maps of ``cin`` x ``map_hw`` on a
    GPU target (whole batch): the conv head's 1x1 conv, the global pool, the fully connected layer."""
    h, w = map_hw
    ops: list[tuple[str, OpCost]] = []
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
        ops.append(("conv", conv_cost(hw, conv)))
        cin = width
    ops.append(("pool", memory_cost(hw, n * cin * (h * w + 1))))  # [n, cin, h, w] -> [n, cin], as the own head's
    ops.append(("fc", fc_cost(hw, n, cin, classes)))  # [n, cin] -> [n, classes]
    return tuple(ops)


def gpu_head_ms(hw: Hardware, cin: int, map_hw: tuple[int, int], classes: int, n: int, width: int = 0) -> float:
    """Latency (ms) of an exit head on ``n`` maps of ``cin`` x ``map_hw`` on a GPU target."""
    return sum(c.total_s for _, c in gpu_head_ops(hw, cin, map_hw, classes, n, width)) * 1e3


def gpu_head_cost(
    hw: Hardware, energy: EnergyConstants | None, cin: int, map_hw: tuple[int, int], classes: int, n: int, width: int
) -> tuple[float, float | None]:
    """``(ms, mJ)`` of an exit head on a GPU target: its latency, and its operators' energy plus
    the constant power over that latency (None without energy constants), as the own head's."""
    ms = gpu_head_ms(hw, cin, map_hw, classes, n, width)
    if energy is None:
        return ms, None
    return ms, ops_energy_mj(gpu_head_ops(hw, cin, map_hw, classes, n, width), energy) + static_energy_mj(ms, energy)


def _energy_fields(mj: float | None, head_mj: float | None, before_mj: float | None, n: int) -> dict[str, float]:
    """The energy fields of an :class:`ExitPrediction` (none without energy: they stay None)."""
    if mj is None or head_mj is None or before_mj is None:
        return {}
    anytime = mj + before_mj
    return dict(
        energy_mj=mj,
        energy_mj_per_image=mj / n,
        head_energy_mj=head_mj,
        anytime_energy_mj=anytime,
        anytime_energy_mj_per_image=anytime / n,
    )


def attach_exits(
    pred: Prediction, stem_flops: float, head_cost: Callable[[int, tuple[int, int], int], tuple[float, float | None]]
) -> Prediction:
    """``pred`` with its :attr:`~Prediction.exits` filled in (unchanged when the config has none).

    ``stem_flops``: the stem's FLOPs per image; ``head_cost(cin, map_hw, width)``: the target's
    ``(latency ms, energy mJ or None)`` of one exit head at the prediction's batch size.  An
    exit's energy adds the stem's, its stages' and its head's, as the prediction's own does.
    """
    cfg = pred.config
    if not cfg.exits:
        return pred
    spec = cfg.spec
    n = pred.batch_size
    width = _width(cfg)
    exits: list[ExitPrediction] = []
    heads_before = 0.0  # ms of the exit heads already passed (anytime path)
    heads_before_mj: float | None = 0.0 if pred.energy_mj is not None else None  # mJ of the same
    for k, s in enumerate(cfg.exits):
        cin, map_hw = exit_inputs(spec, s)
        body_ms = pred.stem_ms + sum(p.latency_ms for p in pred.stages[: s + 1])
        body_flops = stem_flops + sum(p.expected_gflops for p in pred.stages[: s + 1]) * 1e9
        h_ms, h_mj = head_cost(cin, map_hw, width)
        ms = body_ms + h_ms
        mj = None
        if heads_before_mj is not None and h_mj is not None:
            mj = pred.stem_energy_mj + sum(p.energy_mj for p in pred.stages[: s + 1]) + h_mj  # type: ignore[operator, misc]
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
                **_energy_fields(mj, h_mj, heads_before_mj, n),
            )
        )
        heads_before += h_ms
        heads_before_mj = None if heads_before_mj is None or h_mj is None else heads_before_mj + h_mj
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
            **_energy_fields(pred.energy_mj, pred.head_energy_mj, heads_before_mj, n),
        )
    )
    return dataclasses.replace(pred, exits=tuple(exits))
