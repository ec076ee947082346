"""Plain option dataclasses of training, free of torch so that the CLI can read their defaults
without importing it: :class:`TrainingRecipe` (LAUDNet's loss recipe) and :class:`TrainOptions`
(everything ``dynas train`` takes besides the config).  :mod:`dynas.kernels.recipe` and
:mod:`dynas.kernels.fulltrain` use them."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from dynas.errors import ConfigError

__all__ = ["TrainingRecipe", "TrainOptions", "LR_BATCH", "DEVICES"]

#: where ``dynas train`` / ``dynas evaluate`` run: auto = CUDA when available
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainingRecipe:
    """LAUDNet's fine-tuning recipe (Han et al., TPAMI 2024) as plain data."""

    lambda_act: float = 10.0  # weight of the sparsity loss
    alpha_kd: float = 0.5  # weight of the distillation loss
    kd_temperature: float = 4.0
    gumbel_start: float = 5.0
    gumbel_end: float = 0.1
    relax_fraction: float = 1.0 / 3.0  # bounds relax to [0, 1] over this share of training

    def __post_init__(self) -> None:
        for name in ("lambda_act", "alpha_kd"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name}={v!r} is out of range; allowed: a number >= 0")
        for name in ("kd_temperature", "gumbel_start", "gumbel_end"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}={v!r} is out of range; allowed: a number > 0")
        if not 0 < self.relax_fraction <= 1:
            raise ConfigError(f"relax_fraction={self.relax_fraction!r} is out of range; allowed: (0, 1]")


#: the global batch that ``TrainOptions.lr`` is given for (the recipe's 0.08 at 1024)
LR_BATCH = 1024


@dataclass
class TrainOptions:
    """Everything ``dynas train`` takes besides the config (defaults: the recipe's values)."""

    data: str = "synthetic"
    output_dir: str | None = None  # RUN folder: checkpoint.pt, model.pt, metrics.jsonl, config.json
    epochs: int = 100
    max_steps: int | None = None  # stop (and end the schedules) after this many steps
    batch_size: int = 1024  # global: split over the processes
    lr: float = 0.08  # at a global batch of LR_BATCH; scaled linearly
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 1.0
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    weights: str | None = None
    teacher: str | None = None  # default: weights
    distill: bool = True
    input_size: Any = None  # default: the config's
    workers: int = 4  # loader worker processes per training process
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA
    threads: int | None = None
    seed: int = 0
    checkpoint_every: int = 500  # steps; 0: at epoch ends only
    skip_bad_images: bool = False
    log_every: int = 25
    target: str | None = None  # hardware target of the final summary (default: the export's, else v100)

    def __post_init__(self) -> None:
        for name, minimum in (
            ("epochs", 1),
            ("batch_size", 1),
            ("workers", 0),
            ("seed", 0),
            ("checkpoint_every", 0),
            ("log_every", 1),
        ):
            _check_int(name, getattr(self, name), minimum)
        for name in ("max_steps", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name, positive in (("lr", True), ("momentum", False), ("weight_decay", False), ("warmup_epochs", False)):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
                or (positive and v == 0)
            ):
                raise ConfigError(
                    f"{name}={v!r} is out of range; allowed: a finite number {'>' if positive else '>='} 0"
                )
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} is unknown; allowed: {', '.join(DEVICES)}")
        if self.teacher is not None and not self.distill:
            raise ConfigError(f"teacher={self.teacher!r} with distill off; allowed: one of --teacher and --no-distill")
        for name in ("weights", "teacher"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(
                    f"{name}={path!r} is not a file; allowed: a torch.save state dict of the static backbone"
                )

    def fingerprint(self) -> dict[str, Any]:
        """The options that shape the run's trajectory: a checkpoint resumes only with the same."""
        keep = (
            "epochs",
            "max_steps",
            "batch_size",
            "lr",
            "momentum",
            "weight_decay",
            "warmup_epochs",
            "distill",
            "seed",
            "skip_bad_images",
        )
        out = {k: getattr(self, k) for k in keep}
        out.update(asdict(self.recipe))
        teacher = self.teacher or self.weights
        out["teacher"] = os.path.abspath(teacher) if teacher and self.distill else None
        return out


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: an integer >= {minimum}")
