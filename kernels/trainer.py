"""Fine-tune a dynamic network from a config: ``dynas train`` and :func:`train`.

A small loop that shows the recipe working end to end on CPU; for real training, plug the
pieces of :mod:`dynas.kernels.recipe` into your own loop the same way.

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
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from dynas.errors import ConfigError
from dynas.kernels.recipe import TrainingRecipe, distillation_loss, gumbel_temperature, sparsity_loss, stage_flops_ratios
from dynas.spaces.config import load_config
from dynas.spaces.torch_model import replace_classifier

__all__ = ["synthetic_images", "TrainHistory", "train", "finetune", "evaluate", "stage_rates", "realised_rates"]

#: RGB colours of the classes of the synthetic data set
_PALETTE = torch.tensor([
    [1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1], [1.0, 0.1, 1.0],
    [0.1, 1.0, 1.0], [1.0, 0.6, 0.1], [0.6, 0.1, 1.0], [0.6, 1.0, 0.6], [1.0, 1.0, 1.0],
])


def synthetic_images(n: int, size: tuple[int, int], num_classes: int = 10, seed: int = 0, *, noise: float = 0.3,
                     contrast: float = 2.0, side_fraction: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images [n, 3, H, W] and labels [n] (see the module docstring).

    The defaults are the built-in data set.  ``noise`` is the background's standard deviation,
    ``contrast`` the square's colour scale, ``side_fraction`` the image side over the square's
    side (3: the square covers ~1/9 of the image).  Noisier, fainter or smaller squares make a
    harder task.
    """
    if not 2 <= num_classes <= len(_PALETTE):
        raise ConfigError(f"num_classes={num_classes!r} is out of range; allowed: 2..{len(_PALETTE)}")
    if isinstance(side_fraction, bool) or not isinstance(side_fraction, int) or side_fraction < 1:
        raise ConfigError(f"side_fraction={side_fraction!r} is out of range; allowed: an integer >= 1")
    g = torch.Generator().manual_seed(seed)
    h, w = size
    x = noise * torch.randn(n, 3, h, w, generator=g)  # background noise, [n, 3, H, W]
    y = torch.randint(0, num_classes, (n,), generator=g)  # [n]
    side_h, side_w = max(2, h // side_fraction), max(2, w // side_fraction)
    top = torch.randint(0, h - side_h + 1, (n,), generator=g)
    left = torch.randint(0, w - side_w + 1, (n,), generator=g)
    for i in range(n):
        colour = _PALETTE[y[i]].view(3, 1, 1)  # [3, 1, 1]
        x[i, :, top[i]:top[i] + side_h, left[i]:left[i] + side_w] = colour * contrast
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
    """Mean realised activation rate per stage (primary decision) from a ``flops_readout()``:
    the ``rate`` of :func:`realised_rates` for one forward pass."""
    return {s: r["rate"] for s, r in realised_rates([readout]).items()}


def _configured_rates(cfg) -> dict[int, float]:
    return {s: st.rate for s, st in enumerate(cfg.stages) if st.paradigm != "static"}


def realised_rates(readouts: list[list[dict[str, Any]]], weights: list[int] | None = None) -> dict[int, dict[str, float]]:
    """Per stage, the activation rates the gates realised over one or more forward passes.

    ``readouts`` are :meth:`~dynas.kernels.model.DynamicNet.flops_readout` lists, ``weights``
    their batch sizes.  Returns ``{stage: {"rate": r, "channel_rate": c}}``: ``rate`` is the
    mean of the stage's primary decision (what ``StageConfig.rate`` means), ``channel_rate``
    (combined paradigms only) the mean channel rate of the samples a layer gate executed, or of
    all samples under a spatial gate.
    """
    weights = weights or [1] * len(readouts)
    sums: dict[int, dict[str, float]] = {}
    for readout, w in zip(readouts, weights):
        for r in readout:
            rates = r.get("rates") or {}
            if "primary" not in rates:
                continue
            acc = sums.setdefault(int(r["stage"]), {"rate": 0.0, "n": 0.0, "channel": 0.0, "executed": 0.0})
            primary = torch.as_tensor(rates["primary"]).detach().float()  # [N]
            acc["rate"] += w * float(primary.mean())
            acc["n"] += w
            if "channel" in rates and ("spatial" in rates or "layer" in rates):
                on = rates["layer"].detach().float() if "layer" in rates else torch.ones_like(primary)  # [N]
                acc["channel"] += w * float((rates["channel"].detach().float() * on).sum())
                acc["executed"] += w * float(on.sum())
    out: dict[int, dict[str, float]] = {}
    for s, acc in sorted(sums.items()):
        out[s] = {"rate": acc["rate"] / acc["n"]}
        if acc["executed"] > 0:
            out[s]["channel_rate"] = acc["channel"] / acc["executed"]
    return out


def evaluate(model: torch.nn.Module, val: Any) -> tuple[float, dict[int, dict[str, float]]]:
    """Held-out top-1 (fraction) with adaptive gates and the rates they realise.

    ``val`` is a re-iterable of ``(images [B, 3, H, W], labels [B])``.  Runs the reference path
    (dense compute, then mask), restores the model's training mode and path afterwards.
    """
    was_training = model.training
    model.eval()
    dynamic = hasattr(model, "set_gate_mode")
    if dynamic:
        model.set_gate_mode("adaptive")
        model.set_path("reference")
    gated = dynamic and any(b.paradigm != "static" for b in model.blocks())
    correct, total, readouts, sizes = 0, 0, [], []
    with torch.no_grad():
        for x, y in val:
            logits = model(x)  # [B, classes]
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
            if gated:
                readouts.append(model.flops_readout())
                sizes.append(len(y))
    if dynamic:
        model.set_path("fast")
    model.train(was_training)
    if total == 0:
        raise ConfigError("data: the held-out loader yielded no sample; allowed: a loader with at least one batch")
    return correct / total, realised_rates(readouts, sizes)


def finetune(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, *,
             lr: float = 0.05, recipe: TrainingRecipe = TrainingRecipe(), teacher: torch.nn.Module | None = None,
             checkpoints: Sequence[int] = (), on_checkpoint: Callable[[int], None] | None = None,
             log: Callable[[str], None] | None = None, log_every: int = 25) -> TrainHistory:
    """Train ``model`` (a :class:`~dynas.kernels.model.DynamicNet`, static stages allowed) for ``steps`` steps.

    The recipe of the module docstring; the Gumbel schedule and the target relaxation are
    compressed to ``steps``.  After each step number in ``checkpoints`` (1-based: after that many
    steps) ``on_checkpoint(step)`` is called; it may raise to end training there.
    """
    cfg = model.config
    dynamic = [b for b in model.blocks() if b.paradigm != "static"]
    ratios = stage_flops_ratios([{"stage": b.spec.stage, **b.configured_flops()} for b in dynamic])
    targets = [float(ratios[s]) if s in ratios else 1.0 for s in range(len(cfg.stages))]
    rate_targets = [st.rate for st in cfg.stages]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    hist = TrainHistory(stage_targets=_configured_rates(cfg), flops_targets=targets)
    marks = set(checkpoints)
    model.train()
    for step in range(steps):
        x, y = next(batches)  # [B, 3, H, W], [B]
        model.set_temperature(gumbel_temperature(step, steps, recipe))
        logits = model(x)
        readout = model.flops_readout() if dynamic else []
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
        if on_checkpoint is not None and step + 1 in marks:
            on_checkpoint(step + 1)
    return hist


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
    replace_classifier(model, num_classes)
    x_all, y_all = synthetic_images(train_size + val_size, cfg.input_size, num_classes, seed)
    x_train, y_train = x_all[:train_size], y_all[:train_size]  # [train_size, 3, H, W], [train_size]
    x_val, y_val = x_all[train_size:], y_all[train_size:]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            idx = torch.randint(0, train_size, (batch_size,), generator=g)  # [B]
            yield x_train[idx], y_train[idx]  # [B, 3, H, W], [B]

    hist = finetune(model, batches(), steps, lr=lr, recipe=recipe, teacher=teacher, log=log, log_every=log_every)
    accuracy, rates = evaluate(model, [(x_val, y_val)])
    hist.final_rates = {s: r["rate"] for s, r in rates.items()}
    hist.final_accuracy = accuracy
    model.eval()
    model.set_gate_mode("adaptive")
    return model, hist
