"""Training pieces for dynamic networks, for use in the user's own loop.

The recipe is LAUDNet's (Han et al., TPAMI 2024, arXiv 2308.15949, and its public training code) with one change: the sparsity
loss has a target **per stage** (LAUDNet has one global FLOPs target).

Loss = cross-entropy + ``lambda_act`` x sparsity + ``alpha_kd`` x KD(T) against the static teacher.

Sparsity, given each block's executed FLOPs in the last forward (``model.flops_readout()``):

* per block: a squared hinge that keeps the block's FLOPs ratio inside bounds around its
  stage's target; the bounds start at the target and relax to [0, 1] over the first
  ``relax_fraction`` of training along a cosine-squared schedule;
* per stage: (stage FLOPs ratio - stage target)^2 — what makes per-stage rates converge;
* global: (network FLOPs ratio - global target)^2, with the fixed FLOPs of the stem, head and
  any static part counted in both numerator and denominator;
* rates (when ``rate_targets`` are given): (stage's mean realised primary rate - its configured
  rate)^2, for the sampled training decisions and, where the readout has them
  (``rates["primary_adaptive"]``), for the decisions the gates would take at inference.
  FLOPs alone leave the rate free to drift where FLOPs are not linear in it (a channel rate d
  costs d^2 in the 3x3 conv, and samples differ), and a Gumbel-sampled rate on target says
  little about the argmax rate at inference (scores just above 0 sample on half the time but
  are always on at inference); the two terms pin both.

Early exits (configs with ``exits``; the model returns one logits tensor per exit in training):
:func:`exit_loss` replaces the cross-entropy term: the exits' cross-entropies summed with
weights (1 each by default, as MSDNet trains its classifiers) plus ``kd_weight`` x distillation
of every early exit from the final exit (its logits detached) or from a given teacher.

A readout is a list of dicts, one per dynamic block: ``{"stage": int, "executed_flops":
Tensor[N], "dense_flops": float}`` (executed FLOPs per sample, masker included).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from dynas.checks import check_number
from dynas.errors import ConfigError
from dynas.kernels.options import TrainingRecipe

__all__ = [
    "TrainingRecipe",
    "gumbel_temperature",
    "relaxation",
    "sparsity_loss",
    "distillation_loss",
    "stage_flops_ratios",
    "recipe_loss",
    "warmup_cosine",
    "EXIT_KD_WEIGHT",
    "exit_loss",
]

#: weight of the early exits' distillation in :func:`exit_loss` (ours: the recipe's ``alpha_kd``)
EXIT_KD_WEIGHT = 0.5


def _progress(step: int, total_steps: int) -> float:
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps!r} is out of range; allowed: an integer >= 1")
    return min(max(step / total_steps, 0.0), 1.0)


def gumbel_temperature(step: int, total_steps: int, recipe: TrainingRecipe = TrainingRecipe()) -> float:
    """Exponential decay from ``gumbel_start`` at step 0 to ``gumbel_end`` at ``total_steps``."""
    p = _progress(step, total_steps)
    return recipe.gumbel_start * (recipe.gumbel_end / recipe.gumbel_start) ** p


def relaxation(step: int, total_steps: int, recipe: TrainingRecipe = TrainingRecipe()) -> float:
    """1 at the start (bounds = target), falling as cos^2 to 0 at ``relax_fraction`` (bounds = [0, 1])."""
    p = _progress(step, total_steps) / recipe.relax_fraction
    return math.cos(0.5 * math.pi * min(p, 1.0)) ** 2


def _check_targets(targets: Sequence[float], stages: set[int], name: str = "stage_targets") -> None:
    for s in stages:
        if s >= len(targets):
            raise ConfigError(f"{name} has {len(targets)} entries; the readout has stage {s}")
    for s, t in enumerate(targets):
        check_number(f"{name}[{s}]", t, 0, 1, allowed="a number in [0, 1]")


def stage_flops_ratios(readout: Sequence[Mapping]) -> dict[int, torch.Tensor]:
    """Executed / dense FLOPs per stage, averaged over the batch (differentiable)."""
    executed: dict[int, torch.Tensor] = {}
    dense: dict[int, float] = {}
    for r in readout:
        s = int(r["stage"])
        executed[s] = executed.get(s, 0) + r["executed_flops"].float().mean()
        dense[s] = dense.get(s, 0.0) + float(r["dense_flops"])
    return {s: executed[s] / dense[s] for s in sorted(executed)}


def sparsity_loss(
    readout: Sequence[Mapping],
    stage_targets: Sequence[float],
    step: int,
    total_steps: int,
    fixed_flops: float = 0.0,
    recipe: TrainingRecipe = TrainingRecipe(),
    rate_targets: Sequence[float] | None = None,
) -> torch.Tensor:
    """The per-stage-target sparsity loss described in the module docstring.

    ``stage_targets[s]`` is stage ``s``'s target FLOPs ratio (executed / dense, masker
    included); ``fixed_flops`` are the FLOPs that never skip (stem, head, static stages);
    ``rate_targets[s]`` (optional) is stage ``s``'s configured activation rate, compared with
    the readout's ``rates["primary"]``.
    """
    if not readout:
        raise ConfigError("readout is empty; allowed: the flops_readout() of a forward pass with dynamic blocks")
    stages = {int(r["stage"]) for r in readout}
    _check_targets(stage_targets, stages)
    relax = relaxation(step, total_steps, recipe)
    hinge = []
    for r in readout:
        target = float(stage_targets[int(r["stage"])])
        ratio = r["executed_flops"].float() / float(r["dense_flops"])  # [N]
        lower, upper = target * relax, target + (1.0 - target) * (1.0 - relax)
        hinge.append((F.relu(lower - ratio) ** 2 + F.relu(ratio - upper) ** 2).mean())
    block_term = torch.stack(hinge).mean()
    ratios = stage_flops_ratios(readout)
    stage_term = torch.stack([(ratios[s] - float(stage_targets[s])) ** 2 for s in ratios]).mean()
    dense_total = sum(float(r["dense_flops"]) for r in readout) + fixed_flops
    executed_total = sum(r["executed_flops"].float().mean() for r in readout) + fixed_flops
    target_total = sum(float(stage_targets[int(r["stage"])]) * float(r["dense_flops"]) for r in readout) + fixed_flops
    global_term = (executed_total / dense_total - target_total / dense_total) ** 2
    loss = block_term + stage_term + global_term
    if rate_targets is not None:
        _check_targets(rate_targets, stages, "rate_targets")
        for key in ("primary", "primary_adaptive"):
            per_stage: dict[int, list[torch.Tensor]] = {}
            for r in readout:
                if key in r["rates"]:
                    per_stage.setdefault(int(r["stage"]), []).append(r["rates"][key].float().mean())
            if per_stage:
                loss = (
                    loss
                    + torch.stack(
                        [(torch.stack(v).mean() - float(rate_targets[s])) ** 2 for s, v in sorted(per_stage.items())]
                    ).mean()
                )
    return loss


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = TrainingRecipe.kd_temperature
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2 (Hinton et al.)."""
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; allowed: equal shapes [N, classes]"
        )
    t = float(temperature)
    log_p = F.log_softmax(student_logits / t, dim=1)  # [N, classes]
    q = F.softmax(teacher_logits.detach() / t, dim=1)  # [N, classes]
    return F.kl_div(log_p, q, reduction="batchmean") * t * t


def recipe_loss(
    logits: "torch.Tensor | Sequence[torch.Tensor]",
    labels: torch.Tensor,
    readout: Sequence[Mapping],
    step: int,
    total_steps: int,
    flops_targets: Sequence[float],
    rate_targets: Sequence[float],
    recipe: TrainingRecipe = TrainingRecipe(),
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole training loss of one step and its parts (detached): ``ce``, ``sparsity``, ``kd``.

    loss = CE + ``lambda_act`` x :func:`sparsity_loss` (when the readout has dynamic blocks)
    + ``alpha_kd`` x :func:`distillation_loss` (when ``teacher_logits`` are given).

    ``logits`` may be the list a model with exits returns in training (one [N, classes] per
    exit, own head last): then ``ce`` is :func:`exit_loss` (every exit's cross-entropy, plus the
    early exits' distillation from ``teacher_logits`` when given, else from the final exit), and
    the teacher's distillation term applies to the final exit, as without exits.
    """
    if isinstance(logits, torch.Tensor):
        logits = logits.float()  # [N, classes]; the loss in float32 under mixed precision too
        ce = F.cross_entropy(logits, labels)
    else:
        outputs = [o.float() for o in logits]  # one [N, classes] per exit, own head last
        early_teacher = None if teacher_logits is None or recipe.alpha_kd == 0 else teacher_logits.float()
        ce = exit_loss(outputs, labels, teacher_logits=early_teacher, temperature=recipe.kd_temperature)
        logits = outputs[-1]
    zero = ce.new_zeros(())
    sp = (
        sparsity_loss(readout, flops_targets, step, total_steps, recipe=recipe, rate_targets=rate_targets)
        if readout
        else zero
    )
    loss = ce + recipe.lambda_act * sp
    kd = zero
    if teacher_logits is not None and recipe.alpha_kd > 0:
        kd = distillation_loss(logits, teacher_logits.float(), recipe.kd_temperature)
        loss = loss + recipe.alpha_kd * kd
    return loss, {"ce": ce.detach(), "sparsity": sp.detach(), "kd": kd.detach()}


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor at ``step`` (0-based): linear warm-up over ``warmup_steps`` (from
    1/warmup_steps to 1), then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


def exit_loss(
    outputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    *,
    weights: Sequence[float] | None = None,
    teacher_logits: torch.Tensor | None = None,
    kd_weight: float = EXIT_KD_WEIGHT,
    temperature: float = TrainingRecipe.kd_temperature,
) -> torch.Tensor:
    """Loss of a model with early exits: ``sum_k w_k CE(outputs[k], targets)`` + ``kd_weight`` x
    the mean over early exits of :func:`distillation_loss` from the teacher.

    ``outputs``: every exit's logits [N, classes], final exit last (what the model returns in
    training); ``weights``: one per exit, default 1 each (MSDNet's choice); ``teacher_logits``:
    [N, classes] of a static teacher, default the final exit's own logits (self-distillation;
    detached, so the final exit learns from the labels only).  Distillation weight and
    temperature default to the recipe's ``alpha_kd`` and ``kd_temperature``.
    """
    if isinstance(outputs, torch.Tensor) or len(outputs) < 2:
        raise ConfigError(
            "exit_loss needs the list of every exit's logits (at least one early exit and the final one); "
            "allowed: the training output of a model whose config has exits"
        )
    w = [1.0] * len(outputs) if weights is None else [float(v) for v in weights]
    if len(w) != len(outputs) or any(not math.isfinite(v) or v < 0 for v in w):
        raise ConfigError(
            f"exit weights={list(weights or [])!r} are not allowed; allowed: {len(outputs)} numbers >= 0, one per exit"
        )
    if not (math.isfinite(kd_weight) and kd_weight >= 0):
        raise ConfigError(f"kd_weight={kd_weight!r} is out of range; allowed: a number >= 0")
    loss = sum(wk * F.cross_entropy(o, targets) for wk, o in zip(w, outputs))
    if kd_weight > 0:
        teacher = outputs[-1] if teacher_logits is None else teacher_logits
        kd = torch.stack([distillation_loss(o, teacher, temperature) for o in outputs[:-1]]).mean()
        loss = loss + kd_weight * kd
    return loss
