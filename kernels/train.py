"""Fine-tune a dynamic network from a config: ``dynas train`` and :func:`train`.

A small loop that shows the recipe working end to end on CPU; for real training, plug the
pieces of :mod:`dynas.kernels.training` into your own loop the same way.

Per step: Gumbel temperature from :func:`gumbel_temperature`; loss = cross-entropy +
``lambda_act`` x :func:`sparsity_loss` (per-stage targets) [+ ``alpha_kd`` x distillation when
a teacher is given]; SGD with Nesterov momentum 0.9, weight decay 5e-5, cosine learning rate.

Stage targets: each stage's configured activation rate and the FLOPs ratio the stage has at
exactly those rates; training pulls the **adaptive** (learned) gates to both.

The built-in data set (:func:`synthetic_images`) is generated, seeded, and needs no download:
each image is a noisy background with one coloured square covering about a tenth of it, at a
random place; the class is the square's colour.  Most of every image is background, so spatial
skipping has something to skip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dynas.errors import ConfigError
from dynas.kernels.training import TrainingRecipe, distillation_loss, gumbel_temperature, sparsity_loss, stage_flops_ratios
from dynas.spaces.config import load_config

__all__ = ["synthetic_images", "TrainHistory", "train", "stage_rates"]

#: RGB colours of the classes of the synthetic data set
_PALETTE = torch.tensor([
    [1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1], [1.0, 0.1, 1.0],
    [0.1, 1.0, 1.0], [1.0, 0.6, 0.1], [0.6, 0.1, 1.0], [0.6, 1.0, 0.6], [1.0, 1.0, 1.0],
])


def synthetic_images(n: int, size: tuple[int, int], num_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images [n, 3, H, W] and labels [n] (see the module docstring)."""
    if not 2 <= num_classes <= len(_PALETTE):
        raise ConfigError(f"num_classes={num_classes!r} is out of range; allowed: 2..{len(_PALETTE)}")
    g = torch.Generator().manual_seed(seed)
    h, w = size
    x = 0.3 * torch.randn(n, 3, h, w, generator=g)  # background noise, [n, 3, H, W]
    y = torch.randint(0, num_classes, (n,), generator=g)  # [n]
    side_h, side_w = max(2, h // 3), max(2, w // 3)  # square covers ~1/9 of the image
    top = torch.randint(0, h - side_h + 1, (n,), generator=g)
    left = torch.randint(0, w - side_w + 1, (n,), generator=g)
    for i in range(n):
        colour = _PALETTE[y[i]].view(3, 1, 1)  # [3, 1, 1]
        x[i, :, top[i]:top[i] + side_h, left[i]:left[i] + side_w] = colour * 2.0
    return x, y


@dataclass
class TrainHistory:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    stage_rates: list[dict[int, float]] = field(default_factory=list)  # realised rates, training forward
    stage_targets: dict[int, float] = field(default_factory=dict)  # configured rates per dynamic stage
    flops_targets: list[float] = field(default_factory=list)  # FLOPs ratio per stage (budget mode)
    final_rates: dict[int, float] = field(default_factory=dict)  # adaptive mode, held-out data
    final_accuracy: float = math.nan


def stage_rates(readout: list[dict[str, Any]]) -> dict[int, float]:
    """Mean realised activation rate per stage (primary decision) from a ``flops_readout()``."""
    acc: dict[int, list[float]] = {}
    for r in readout:
        rates = r.get("rates") or {}
        if "primary" in rates:
            acc.setdefault(int(r["stage"]), []).append(float(torch.as_tensor(rates["primary"]).detach().float().mean()))
    return {s: sum(v) / len(v) for s, v in sorted(acc.items())}


def _configured_rates(cfg) -> dict[int, float]:
    return {s: st.rate for s, st in enumerate(cfg.stages) if st.paradigm != "static"}


def train(config: Any, *, steps: int = 300, batch_size: int = 32, lr: float = 0.05, num_classes: int = 10,
          input_size: int | None = None, train_size: int = 2048, val_size: int = 256, seed: int = 0,
          teacher: torch.nn.Module | None = None, recipe: TrainingRecipe = TrainingRecipe(),
          log: Callable[[str], None] | None = None, log_every: int = 25) -> tuple[torch.nn.Module, TrainHistory]:
    """Fine-tune ``build_model(config)`` on the synthetic data set; return the model and its history."""
    from dynas.kernels.model import build_model

    for name, value, minimum in (("steps", steps, 1), ("batch_size", batch_size, 1), ("train_size", train_size, 1),
                                 ("val_size", val_size, 1), ("log_every", log_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name}={value!r} is out of range; allowed: an integer >= {minimum}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr={lr!r} is out of range; allowed: a number > 0")
    cfg = load_config(config)
    if input_size is not None:
        cfg = load_config({**cfg.to_dict(), "input_size": input_size})
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    x_all, y_all = synthetic_images(train_size + val_size, cfg.input_size, num_classes, seed)
    x_train, y_train = x_all[:train_size], y_all[:train_size]  # [train_size, 3, H, W], [train_size]
    x_val, y_val = x_all[train_size:], y_all[train_size:]

    # Per-stage targets: the configured rates and the FLOPs ratio at exactly those rates.
    ratios = stage_flops_ratios([{"stage": b.spec.stage, **b.configured_flops()}
                                 for b in model.blocks() if b.paradigm != "static"])
    targets = [float(ratios[s]) if s in ratios else 1.0 for s in range(len(cfg.stages))]
    rate_targets = [st.rate for st in cfg.stages]

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    hist = TrainHistory(stage_targets=_configured_rates(cfg), flops_targets=targets)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, train_size, (batch_size,), generator=g)  # [B]
        x, y = x_train[idx], y_train[idx]  # [B, 3, H, W], [B]
        model.set_temperature(gumbel_temperature(step, steps, recipe))
        logits = model(x)
        readout = model.flops_readout()
        ce = F.cross_entropy(logits, y)
        sp = sparsity_loss(readout, targets, step, steps, recipe=recipe, rate_targets=rate_targets) if readout else ce.new_zeros(())
        loss = ce + recipe.lambda_act * sp
        if teacher is not None and recipe.alpha_kd > 0:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = loss + recipe.alpha_kd * distillation_loss(logits, t_logits, recipe.kd_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist.steps.append(step)
        hist.loss.append(float(loss.detach()))
        hist.ce.append(float(ce.detach()))
        hist.sparsity.append(float(sp.detach()))
        hist.stage_rates.append(stage_rates(readout))
        if log is not None and (step % log_every == 0 or step == steps - 1):
            rates = " ".join(f"s{s}={r:.2f}" for s, r in hist.stage_rates[-1].items())
            log(f"step {step:4d}  loss {hist.loss[-1]:.4f}  ce {hist.ce[-1]:.4f}  sparsity {hist.sparsity[-1]:.4f}  rates {rates}")

    model.eval()
    model.set_gate_mode("adaptive")
    model.set_path("reference")
    with torch.no_grad():
        logits = model(x_val)
    hist.final_rates = stage_rates(model.flops_readout())
    hist.final_accuracy = float((logits.argmax(1) == y_val).float().mean())
    model.set_path("fast")
    return model, hist
