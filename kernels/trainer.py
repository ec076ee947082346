"""The short fine-tuning loop of the finetune proxy (:func:`finetune`) and its pieces.

:func:`finetune` runs a given number of steps in one process; :func:`train` wraps it on the
synthetic data set (a CPU demo of the recipe).  Full training (epochs, image folders, torchrun,
checkpoints) is ``dynas train``, :mod:`dynas.kernels.fulltrain`, which shares the loss
(:func:`~dynas.kernels.recipe.recipe_loss`), the targets (:func:`stage_targets`) and the rate
sums (:func:`rate_sums`) with this loop.

Per step: Gumbel temperature from :func:`gumbel_temperature`; loss = cross-entropy +
``lambda_act`` x :func:`sparsity_loss` (per-stage targets) [+ ``alpha_kd`` x distillation when
a teacher is given; with exits, the cross-entropy term is every exit's, see
:func:`~dynas.kernels.recipe.recipe_loss`]; SGD with Nesterov momentum 0.9, weight decay 5e-5, cosine learning rate.

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

from dynas.checks import check_int
from dynas.errors import ConfigError
from dynas.kernels.recipe import TrainingRecipe, gumbel_temperature, recipe_loss, stage_flops_ratios
from dynas.spaces.config import load_config
from dynas.spaces.torch_model import replace_classifier

__all__ = [
    "synthetic_images",
    "TrainHistory",
    "train",
    "finetune",
    "evaluate",
    "stage_rates",
    "realised_rates",
    "rate_sums",
    "rates_from_sums",
    "stage_targets",
]

#: RGB colours of the classes of the synthetic data set
_PALETTE = torch.tensor(
    [
        [1.0, 0.1, 0.1],
        [0.1, 1.0, 0.1],
        [0.1, 0.1, 1.0],
        [1.0, 1.0, 0.1],
        [1.0, 0.1, 1.0],
        [0.1, 1.0, 1.0],
        [1.0, 0.6, 0.1],
        [0.6, 0.1, 1.0],
        [0.6, 1.0, 0.6],
        [1.0, 1.0, 1.0],
    ]
)


def synthetic_images(
    n: int,
    size: tuple[int, int],
    num_classes: int = 10,
    seed: int = 0,
    *,
    noise: float = 0.3,
    contrast: float = 2.0,
    side_fraction: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images [n, 3, H, W] and labels [n] (see the module docstring).

    The defaults are the built-in data set.  ``noise`` is the background's standard deviation,
    ``contrast`` the square's colour scale, ``side_fraction`` the image side over the square's
    side (3: the square covers ~1/9 of the image).  Noisier, fainter or smaller squares make a
    harder task.
    """
    if not 2 <= num_classes <= len(_PALETTE):
        raise ConfigError(f"num_classes={num_classes!r} is out of range; allowed: 2..{len(_PALETTE)}")
    check_int("side_fraction", side_fraction, 1)
    g = torch.Generator().manual_seed(seed)
    h, w = size
    x = noise * torch.randn(n, 3, h, w, generator=g)  # background noise, [n, 3, H, W]
    y = torch.randint(0, num_classes, (n,), generator=g)  # [n]
    side_h, side_w = max(2, h // side_fraction), max(2, w // side_fraction)
    top = torch.randint(0, h - side_h + 1, (n,), generator=g)
    left = torch.randint(0, w - side_w + 1, (n,), generator=g)
    for i in range(n):
        colour = _PALETTE[y[i]].view(3, 1, 1)  # [3, 1, 1]
        x[i, :, top[i] : top[i] + side_h, left[i] : left[i] + side_w] = colour * contrast
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


def rate_sums(readout: list[dict[str, Any]], weight: float, num_stages: int) -> torch.Tensor:
    """Running sums behind :func:`realised_rates` for one forward pass: float64 [num_stages, 4] on
    the readout's device, columns (weight x mean primary rate, weight, weight x executed channel
    rate sum, weight x executed samples).  Sums of several passes (or processes) add up."""
    device = next(
        (r["rates"]["primary"].device for r in readout if "primary" in (r.get("rates") or {})), torch.device("cpu")
    )
    out = torch.zeros(num_stages, 4, dtype=torch.float64, device=device)  # [S, 4]
    for r in readout:
        rates = r.get("rates") or {}
        if "primary" not in rates:
            continue
        s = int(r["stage"])
        primary = torch.as_tensor(rates["primary"]).detach().double()  # [N]
        out[s, 0] += weight * primary.mean()
        out[s, 1] += weight
        if "channel" in rates and ("spatial" in rates or "layer" in rates):
            on = rates["layer"].detach().double() if "layer" in rates else torch.ones_like(primary)  # [N]
            out[s, 2] += weight * (rates["channel"].detach().double() * on).sum()
            out[s, 3] += weight * on.sum()
    return out


def rates_from_sums(sums: torch.Tensor) -> dict[int, dict[str, float]]:
    """``{stage: {"rate": r[, "channel_rate": c]}}`` from :func:`rate_sums` [S, 4] (stages with none left out)."""
    out: dict[int, dict[str, float]] = {}
    for s, (rate, n, channel, executed) in enumerate(sums.double().cpu().tolist()):
        if n > 0:
            out[s] = {"rate": rate / n}
            if executed > 0:
                out[s]["channel_rate"] = channel / executed
    return out


def realised_rates(
    readouts: list[list[dict[str, Any]]], weights: list[int] | None = None
) -> dict[int, dict[str, float]]:
    """Per stage, the activation rates the gates realised over one or more forward passes.

    ``readouts`` are :meth:`~dynas.kernels.model.DynamicNet.flops_readout` lists, ``weights``
    their batch sizes.  Returns ``{stage: {"rate": r, "channel_rate": c}}``: ``rate`` is the
    mean of the stage's primary decision (what ``StageConfig.rate`` means), ``channel_rate``
    (combined paradigms only) the mean channel rate of the samples a layer gate executed, or of
    all samples under a spatial gate.
    """
    weights = weights or [1] * len(readouts)
    num_stages = 1 + max((int(r["stage"]) for readout in readouts for r in readout), default=-1)
    total = torch.zeros(num_stages, 4, dtype=torch.float64)
    for readout, w in zip(readouts, weights):
        total += rate_sums(readout, w, num_stages).cpu()
    return rates_from_sums(total)


def stage_targets(model: torch.nn.Module) -> tuple[list[float], list[float]]:
    """Per stage of ``model``'s config: the FLOPs ratio at exactly the configured rates (1 for a
    static stage) and the configured rate: the two targets of :func:`~dynas.kernels.recipe.sparsity_loss`."""
    cfg = model.config
    dynamic = [b for b in model.blocks() if b.paradigm != "static"]
    ratios = stage_flops_ratios([{"stage": b.spec.stage, **b.configured_flops()} for b in dynamic])
    return [float(ratios[s]) if s in ratios else 1.0 for s in range(len(cfg.stages))], [st.rate for st in cfg.stages]


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


def finetune(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    lr: float = 0.05,
    recipe: TrainingRecipe = TrainingRecipe(),
    teacher: torch.nn.Module | None = None,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
) -> TrainHistory:
    """Train ``model`` (a :class:`~dynas.kernels.model.DynamicNet`, static stages allowed) for ``steps`` steps.

    The recipe of the module docstring; the Gumbel schedule and the target relaxation are
    compressed to ``steps``.  After each step number in ``checkpoints`` (1-based: after that many
    steps) ``on_checkpoint(step)`` is called; it may raise to end training there.
    """
    cfg = model.config
    dynamic = any(b.paradigm != "static" for b in model.blocks())
    targets, rate_targets = stage_targets(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    hist = TrainHistory(stage_targets=_configured_rates(cfg), flops_targets=targets)
    marks = set(checkpoints)
    model.train()
    for step in range(steps):
        x, y = next(batches)  # [B, 3, H, W], [B]
        model.set_temperature(gumbel_temperature(step, steps, recipe))
        logits = model(x)  # [B, classes]; with exits a list of them, own head last
        readout = model.flops_readout() if dynamic else []
        t_logits = None
        if teacher is not None and recipe.alpha_kd > 0:
            with torch.no_grad():
                t_logits = teacher(x)
        loss, parts = recipe_loss(logits, y, readout, step, steps, targets, rate_targets, recipe, t_logits)
        ce, sp = parts["ce"], parts["sparsity"]
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
            log(
                f"step {step:4d}  loss {hist.loss[-1]:.4f}  ce {hist.ce[-1]:.4f}  sparsity {hist.sparsity[-1]:.4f}  rates {rates}"
            )
        if on_checkpoint is not None and step + 1 in marks:
            on_checkpoint(step + 1)
    return hist


def train(
    config: Any,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.05,
    num_classes: int = 10,
    input_size: int | None = None,
    train_size: int = 2048,
    val_size: int = 256,
    seed: int = 0,
    teacher: torch.nn.Module | None = None,
    recipe: TrainingRecipe = TrainingRecipe(),
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
) -> tuple[torch.nn.Module, TrainHistory]:
    """Fine-tune ``build_model(config)`` on the synthetic data set; return the model and its history."""
    from dynas.kernels.model import build_model

    for name, value, minimum in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("train_size", train_size, 1),
        ("val_size", val_size, 1),
        ("log_every", log_every, 1),
    ):
        check_int(name, value, minimum)
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
