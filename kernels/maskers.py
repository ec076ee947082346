"""Maskers: the small modules that decide, per input, which parts of a block run.

Every masker maps the block input ``x`` ([N, C_in, H_in, W_in]) to two logits per decision,
``[N, 2, *decision_shape]`` (index 0 = off, 1 = on), and turns them into a mask of shape
``[N, *decision_shape]`` with values in {0, 1}.

Lifecycle of a decision:

1. training (``module.train()``): straight-through hard Gumbel-softmax at ``temperature``
   (set from outside, e.g. ``DynamicNet.set_temperature``); the mask is exactly 0/1 in the
   forward pass and carries the soft Gumbel gradient in the backward pass.
2. inference (``module.eval()``), gate mode ``"adaptive"``: argmax of the two logits, per input.
3. inference, gate mode ``"budget"`` (DDI's resource-dependent control): exactly
   :func:`budget_count` ``(rate, n)`` decisions are on per sample, the ``k`` with the largest
   ``logit_on - logit_off``.  A :class:`LayerMasker` (and a :class:`SpatialMasker` whose one
   patch is the whole map) has a single decision per sample and block, so its budget is taken
   per sample over the *stage*: each sample runs exactly ``k`` of the stage's ``n`` gated
   blocks, whatever the batch size or the batch's other samples (see :class:`LayerMasker`);
   ``DynamicNet`` sets ``k`` = round(rate x n) with the rounding remainder carried from stage to
   stage, so the network total is exact to within one block.
4. inference, gate mode ``"random"`` (measurement): the budget mode's exact counts, but *which*
   decisions are on is drawn uniformly at random, independently per sample, from torch's
   global generator (seed it with ``torch.manual_seed``).  The maskers still run, so their
   cost is real.  A freshly initialised network's scores barely depend on the input (every
   sample of a batch skips the same blocks), a trained one's do; this mode stands in for the
   trained network when ``dynas calibrate``/``validate``/``bench`` time an untrained one, and
   it is the decision model the calibrated CPU latency model assumes.

``force`` (``None``, ``"on"`` or ``"off"``) overrides every mode; tests and ablations use it.

FLOPs of a masker (:meth:`Masker.flops`) count 2 x multiply-accumulates of its conv/linear
layers only, the convention of ``torch.utils.flop_counter`` (pooling and biases are free).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynas.checks import check_choice
from dynas.errors import ConfigError
from dynas.spaces.config import budget_count

__all__ = [
    "GATE_MODES",
    "budget_count",
    "Masker",
    "SpatialMasker",
    "ChannelMasker",
    "LayerMasker",
    "StageQuota",
]

#: inference gate modes
GATE_MODES: tuple[str, ...] = ("adaptive", "budget", "random")
_FORCE = (None, "on", "off")


def _hidden(in_channels: int, reduction: int = 16, minimum: int = 16) -> int:
    return max(minimum, in_channels // reduction)


class Masker(nn.Module):
    """Base class: subclasses implement :meth:`logits` and :meth:`flops`.

    ``rate`` is the configured activation rate (used by the budget mode only).
    """

    #: budget = top-k of each sample's decisions (False: the subclass's ``_budget`` decides)
    per_sample_budget: bool = True

    def __init__(self, rate: float):
        super().__init__()
        if not (0.0 < float(rate) <= 1.0):
            raise ConfigError(f"masker rate={rate!r} is out of range; allowed: a number in (0, 1]")
        self.rate = float(rate)
        self.temperature = 1.0
        self.gate_mode = "adaptive"
        self.force: str | None = None
        #: training only: the adaptive-mode mask of the last forward, differentiable (see forward)
        self.last_adaptive: torch.Tensor | None = None

    def _budget(self, score: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Budget-mode mask of maskers whose budget is not per sample (``per_sample_budget = False``)."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """[N, C_in, H, W] -> [N, 2, *decision_shape]."""
        raise NotImplementedError

    def flops(self) -> float:  # pragma: no cover - abstract
        """FLOPs of one sample's masker evaluation."""
        raise NotImplementedError

    def set_gate_mode(self, mode: str) -> None:
        self.gate_mode = check_choice("gate mode", mode, GATE_MODES)

    def set_force(self, force: str | None) -> None:
        if force not in _FORCE:
            raise ConfigError(f"force={force!r} is unknown; allowed: None, 'on', 'off'")
        self.force = force

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """logit_on - logit_off, [N, *decision_shape] (subclasses skip the [N, 2, *D] layout)."""
        logits = self.logits(x)  # [N, 2, *D]
        return logits[:, 1] - logits[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask [N, *decision_shape] of 0/1 values (float, same dtype as ``x``)."""
        if not self.training and self.force is None:
            return self._decide(self.score(x), x.dtype)
        logits = self.logits(x)  # [N, 2, *D]
        if self.force is not None:
            value = 1.0 if self.force == "on" else 0.0
            return torch.full_like(logits[:, 1], value)
        if self.training:
            if not (self.temperature > 0 and math.isfinite(self.temperature)):
                raise ConfigError(f"temperature={self.temperature!r} is out of range; allowed: a number > 0")
            # the inference (adaptive) decision, straight-through with a sigmoid gradient: lets a
            # training loss see and steer the rate the gates will have at inference
            p = torch.sigmoid(logits[:, 1] - logits[:, 0])
            self.last_adaptive = (p > 0.5).to(p.dtype) + (p - p.detach())  # [N, *D]
            # straight-through hard Gumbel-softmax over the {off, on} axis
            return F.gumbel_softmax(logits, tau=self.temperature, hard=True, dim=1)[:, 1]
        return self._decide(logits[:, 1] - logits[:, 0], x.dtype)

    def _decide(self, score: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Inference mask [N, *D] from ``score`` = logit_on - logit_off in this gate mode."""
        if self.gate_mode == "adaptive":
            return (score > 0).to(dtype)
        if self.gate_mode == "random":
            # uniform scores in [0, 1): the top-k below is a uniform random k-subset per sample;
            # the stage quota reads them as coin flips (see _stage_budget)
            score = torch.rand(score.shape, dtype=score.dtype, device=score.device)
        if not self.per_sample_budget:
            return self._budget(score)
        flat = score.reshape(score.shape[0], -1)  # [N, n_decisions]
        k = budget_count(self.rate, flat.shape[1])
        top = flat.topk(k, dim=1).indices  # [rows, k]
        mask = torch.zeros_like(flat).scatter_(1, top, 1.0)
        return mask.reshape(score.shape)


class SpatialMasker(Masker):
    """One decision per SxS patch of the block output: adaptive avg pool to the grid -> 1x1 conv.

    With a 1x1 grid (one patch covers the whole map) the decision is one per sample, so the
    budget mode works as :class:`LayerMasker`'s does: a per-sample quota over the stage.
    """

    def __init__(self, in_channels: int, grid_hw: tuple[int, int], rate: float):
        super().__init__(rate)
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.per_sample_budget = self.grid_hw != (1, 1)
        self.slot: tuple[int, int] = (0, 1)
        self.quota = StageQuota()
        self.in_channels = in_channels
        self.pool = nn.AdaptiveAvgPool2d(self.grid_hw)
        self.conv = nn.Conv2d(in_channels, 2, 1)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        # the 1x1 conv as a product of the pooled map's pixel rows (a convolution with two
        # output channels cost ~0.25 ms per call here, most of a block's masker):
        # [N, C_in, H, W] -> [N, C_in, gh, gw] -> rows [N * gh * gw, C_in] -> [N * gh * gw, 2]
        pooled = self.pool(x)
        conv = self.conv
        return F.linear(pooled.permute(0, 2, 3, 1).reshape(-1, self.in_channels), conv.weight.flatten(1), conv.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (
            self._rows(x).view(x.shape[0], *self.grid_hw, 2).permute(0, 3, 1, 2)
        )  # -> [N, gh, gw, 2] -> [N, 2, gh, gw]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        z = self._rows(x)  # [N * gh * gw, 2]
        return (z[:, 1] - z[:, 0]).view(x.shape[0], *self.grid_hw)

    def flops(self) -> float:
        return 2.0 * self.in_channels * 2 * self.grid_hw[0] * self.grid_hw[1]

    def _budget(self, score: torch.Tensor) -> torch.Tensor:
        return _stage_budget(self, score.reshape(-1)).reshape(score.shape)  # [N, 1, 1] -> [N] -> [N, 1, 1]


class _MLPMasker(Masker):
    """Global average pool -> Linear -> ReLU -> Linear to 2 logits per decision."""

    def __init__(self, in_channels: int, n_decisions: int, rate: float):
        super().__init__(rate)
        self.in_channels = in_channels
        self.n_decisions = n_decisions
        self.hidden = _hidden(in_channels)
        self.fc1 = nn.Linear(in_channels, self.hidden)
        self.fc2 = nn.Linear(self.hidden, 2 * n_decisions)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(x).view(x.shape[0], 2, self.n_decisions)  # [N, 2 * n] -> [N, 2, n]

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2  # functional calls: a module call costs several us per masker here
        return F.linear(
            F.relu(F.linear(x.mean(dim=(2, 3)), fc1.weight, fc1.bias)), fc2.weight, fc2.bias
        )  # [N, C_in] -> [N, 2 * n]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        z, n = self._out(x), self.n_decisions  # [N, 2 * n]: n logits off, then n on
        return z[:, n:] - z[:, :n]  # [N, n]

    def flops(self) -> float:
        return 2.0 * (self.in_channels * self.hidden + self.hidden * 2 * self.n_decisions)


class ChannelMasker(_MLPMasker):
    """One decision per group of G channels of the gated width: mask [N, n_groups]."""

    def __init__(self, in_channels: int, n_groups: int, rate: float):
        super().__init__(in_channels, n_groups, rate)


def _stage_budget(m: "Masker", score: torch.Tensor) -> torch.Tensor:
    """Budget mask [N] of a one-decision-per-sample gate that shares its stage's quota.

    ``m.slot`` = (position j among the stage's n gates, n); ``m.quota``: :class:`StageQuota`.
    """
    j, n = m.slot
    left = n - j  # gates left in the stage, this one included
    rem = m.quota.remaining
    if j == 0 or rem is None or rem.shape[0] != score.shape[0] or rem.device != score.device:
        # stage start (or a block run out of its stage's order): a fresh quota for the gates left
        runs = m.quota.runs if j == 0 and m.quota.runs is not None else budget_count(m.rate, left)
        rem = torch.full(score.shape, runs, dtype=torch.long, device=score.device)
    if m.gate_mode == "random":
        # run with probability rem / left: sequential sampling of a uniform k-subset of the
        # stage's gates, independently per sample (score: [N] uniform in [0, 1))
        on = score * left < rem  # [N] bool
    else:
        on = torch.where(score > 0, rem > 0, rem >= left)  # [N] bool: a run left and a positive score, or a must-run
    m.quota.remaining = rem - on.long()
    return on.to(score.dtype)


class StageQuota:
    """Per-sample count of blocks still allowed to run in one stage (budget mode).

    Shared by the :class:`LayerMasker` s of one stage; the stage's first gated block resets it
    to ``runs`` per sample (None: ``budget_count(rate, n)``).
    """

    def __init__(self, runs: int | None = None) -> None:
        self.runs = runs
        self.remaining: torch.Tensor | None = None  # [N] int64


class LayerMasker(_MLPMasker):
    """One decision per sample: mask [N].

    Budget mode, per sample over the stage (DDI's hard cap on work): the ``n`` layer-gated
    blocks of a stage share a :class:`StageQuota` (wired by ``DynamicNet``; ``slot`` =
    (position of this block among them, ``n``)).  Each sample starts the stage with ``k``
    runs (``quota.runs``; by default ``budget_count(rate, n)``); block ``j`` runs a sample when
    the sample still has runs left and either its learned score is positive or it has exactly
    as many runs left as blocks left (``n - j``).  So every sample runs exactly ``k`` blocks,
    whatever the batch, and the learned gates choose which.  A block used on its own (default
    slot (0, 1)) runs every sample.
    """

    per_sample_budget = False

    def __init__(self, in_channels: int, rate: float):
        super().__init__(in_channels, 1, rate)
        self.slot: tuple[int, int] = (0, 1)
        self.quota = StageQuota()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return super().logits(x)[:, :, 0]  # [N, 2, 1] -> [N, 2]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        z = self._out(x)  # [N, 2]
        return z[:, 1] - z[:, 0]  # [N]

    def _budget(self, score: torch.Tensor) -> torch.Tensor:
        return _stage_budget(self, score)
