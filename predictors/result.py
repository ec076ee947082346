"""Result types of a latency (and energy) prediction (the shape of ``dynas predict --json``).

Energy fields are None on a target that predicts no energy (no ``[energy]`` table, or a
calibrated "cpu" target): unknown, not zero.  See :mod:`dynas.predictors.energy`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dynas.spaces.config import ArchConfig

__all__ = ["OpPrediction", "StagePrediction", "ExitPrediction", "Prediction"]


@dataclass(frozen=True)
class OpPrediction:
    """One operator (or fused group) of a block, summed over the stage's blocks."""

    name: str  # e.g. "conv2 (gathered 3x3)", "masker (fused into conv1)", "scatter-add + residual"
    latency_ms: float
    compute_ms: float
    memory_ms: float
    launch_ms: float
    schedule: str  # chosen tile, e.g. "c64 h8 w8 p1"; "" for ops without a schedule


@dataclass(frozen=True)
class StagePrediction:
    stage: int
    choice: str  # StageConfig.short()
    blocks: int
    latency_ms: float
    static_latency_ms: float
    compute_ms: float
    memory_ms: float
    launch_ms: float
    bound: str  # "compute" or "memory": the larger of the two parts
    masker: str  # "none", "fused into conv1", "separate"
    dense_gflops: float  # per image
    expected_gflops: float  # per image, at the configured rates
    ops: tuple[OpPrediction, ...] = field(default_factory=tuple)
    energy_mj: float | None = None  # whole batch, constant power over latency_ms included
    energy_mj_per_image: float | None = None
    static_energy_mj: float | None = None  # the same stage static, whole batch


@dataclass(frozen=True)
class ExitPrediction:
    """One exit of an early-exit config: cumulative cost from the input to its output.

    ``latency_ms`` / ``flops`` go straight to this exit (stem, stages up to ``after_stage``, this
    exit's head: what the budget policy runs); ``anytime_latency_ms`` adds the heads of the
    exits before it (what the deadline and confidence policies run to answer here).  The last
    exit is the network's own head (``head="own"``): its ``latency_ms`` is the prediction's.
    FLOPs are per image, like :attr:`Prediction.expected_gflops`.  The energies follow the same
    paths (constant power over those latencies included; the last exit's ``energy_mj`` is the
    prediction's) and are None where the target predicts no energy.
    """

    exit: int  # 0-based, in network order; the last is the own head
    after_stage: int
    head: str  # "light", "conv" or "own"
    latency_ms: float
    latency_ms_per_image: float
    flops: float
    head_ms: float
    anytime_latency_ms: float
    anytime_latency_ms_per_image: float
    energy_mj: float | None = None  # whole batch, straight to this exit
    energy_mj_per_image: float | None = None
    head_energy_mj: float | None = None
    anytime_energy_mj: float | None = None  # the heads of the exits before it included
    anytime_energy_mj_per_image: float | None = None


@dataclass(frozen=True)
class Prediction:
    """Predicted latency (and energy) of one config on one target at one batch size.

    Latencies and energies are for one forward pass of the whole batch unless the name says
    ``per_image``.  FLOPs are per image (multiply-accumulate counted as 2 FLOPs), stem and head
    included.  Energies are None where the target predicts none (module docstring).
    """

    config: ArchConfig
    target: str
    batch_size: int
    latency_ms: float
    latency_ms_per_image: float
    static_latency_ms: float
    static_latency_ms_per_image: float
    speedup: float  # static / dynamic
    latency_ratio: float  # dynamic / static
    stem_ms: float
    head_ms: float
    dense_gflops: float
    expected_gflops: float
    stages: tuple[StagePrediction, ...]
    energy_mj: float | None = None
    energy_mj_per_image: float | None = None
    static_energy_mj: float | None = None  # the static network's, whole batch
    static_energy_mj_per_image: float | None = None
    stem_energy_mj: float | None = None
    head_energy_mj: float | None = None
    exits: tuple[ExitPrediction, ...] = ()  # only for configs with exits; the last is the own head

    @property
    def flops_ratio(self) -> float:
        return self.expected_gflops / self.dense_gflops

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: what ``dynas predict --json`` prints (``exits`` only for configs with exits)."""
        d = asdict(self)
        if not self.exits:
            del d["exits"]  # configs without exits print exactly what they always did
        d["config"] = self.config.to_dict()
        d["input_size"] = list(self.config.input_size)
        d["backbone"] = self.config.backbone
        d["flops"] = {
            "dense_gflops": self.dense_gflops,
            "expected_gflops": self.expected_gflops,
            "ratio": self.flops_ratio,
        }
        return d
