"""Early exits that really halt: exit heads and the inference policies of a :class:`DynamicNet`.

A config with ``exits`` (see :mod:`dynas.spaces.config`) gets one :class:`ExitHead` per entry,
after that stage (``model.exit_heads[k]``); the network's own head is the last exit.

Outputs
    In training mode the model returns a list of logits, one [N, classes] tensor per exit in
    network order, the own head's last.  In eval mode it follows its exit policy (below); the
    default, ``"final"``, returns the own head's [N, classes] as a model without exits does.
    A config without exits is untouched: one tensor in every mode.

Policies (``model.set_exit_policy(name, **options)``; eval mode only)
    ``"final"``       run to the own head (the default).
    ``"all"``         every exit computed, a list as in training: the anytime reference that
                      the other policies are tested against, and what threshold fitting reads.
    ``"budget"``      DDI's halting for all samples (``budget_ms``, ``target``): run to the
                      deepest exit whose predicted latency *straight to it* (stem, stages, its
                      own head: ``ExitPrediction.latency_ms``) at the input's batch size fits
                      ``budget_ms`` (whole batch), and stop; later stages and earlier heads are
                      never computed.  ``budget_mj`` instead (targets with energy prices): the
                      deepest exit whose predicted energy straight to it
                      (``ExitPrediction.energy_mj``) fits.
    ``"deadline"``    wall clock (``deadline_ms``, ``target``; ``clock``): run unit by unit
                      (stem, blocks, exit heads, own head) and, before each unit after the first
                      exit's answer, stop when ``elapsed + predicted cost of the unit >
                      deadline``; answer from the deepest exit computed.  Guarantee: the
                      forward pass ends at most one unit's measured time after the deadline
                      (a unit starts only when its predicted end is within the deadline, so only
                      its own misprediction can overrun, by less than its measured time), once
                      the stem-to-first-exit prefix, which always runs, fits.  On CUDA the clock
                      is read after a synchronisation.  ``model.last_trace`` records each unit.
    ``"confidence"``  MSDNet's budgeted batch (``thresholds``, default the config's
                      ``exit_thresholds``): at each exit, samples whose top softmax probability
                      reaches the exit's threshold leave with that exit's answer; the others go
                      on as a smaller batch (``index_select``), so their later stages run on
                      fewer samples; the own head answers whoever is left.  Outputs are put
                      back in input order.

After a forward pass under a policy, ``model.last_exit`` is [N] int64: the exit each sample
answered from (``len(exits)`` = the own head).

Helpers: :func:`exit_outputs` (every exit's confidences and hits on a loader),
:func:`exit_accuracies`, :func:`fit_thresholds` (:mod:`dynas.predictors.thresholds` on a trained
model), :func:`with_thresholds`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynas.errors import ConfigError
from dynas.kernels.gather import take_samples
from dynas.predictors.energy import no_energy_error
from dynas.predictors.thresholds import BudgetThresholds, budget_curve
from dynas.spaces.config import DEFAULT_EXIT_WIDTH, ArchConfig
from dynas.spaces.torch_model import init_weights

if TYPE_CHECKING:
    from dynas.kernels.model import DynamicNet

__all__ = [
    "ExitHead",
    "ExitPolicy",
    "FinalPolicy",
    "AllExitsPolicy",
    "BudgetPolicy",
    "DeadlinePolicy",
    "ConfidencePolicy",
    "EXIT_POLICIES",
    "make_policy",
    "forward_exits",
    "forward_to",
    "exit_outputs",
    "exit_accuracies",
    "fit_from_outputs",
    "fit_thresholds",
    "with_thresholds",
]


class ExitHead(nn.Module):
    """``"light"``: global average pool + linear; ``"conv"``: 1x1 conv + BN + ReLU to ``width``
    channels first.  [N, C, H, W] -> [N, classes]."""

    def __init__(self, in_channels: int, classes: int, head: str = "light", width: int = DEFAULT_EXIT_WIDTH):
        super().__init__()
        self.conv = None
        if head == "conv":
            self.conv = nn.Sequential(
                nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)  # [N, width, H, W]
        return self.fc(torch.flatten(self.avgpool(x), 1))  # [N, C, 1, 1] -> [N, C] -> [N, classes]


# ----------------------------------------------------------------------------- running pieces


def _stage_exits(model: "DynamicNet") -> dict[int, int]:
    """stage -> index of the exit after it (early exits only)."""
    return {s: k for k, s in enumerate(model.config.exits)}


def _answer(model: "DynamicNet", k: int, h: torch.Tensor) -> torch.Tensor:
    """Logits of exit ``k`` on the stage output ``h`` (k = len(exits): the own head)."""
    return model.exit_heads[k](h) if k < len(model.exit_heads) else model.forward_head(h)


def _all_at(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N] int64, every sample answered at exit ``k``."""
    return torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)


def forward_exits(model: "DynamicNet", x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's logits, [N, classes] each, own head last (training, and the ``"all"`` policy)."""
    at = _stage_exits(model)
    outs = []
    h = model.forward_stem(x)
    for s in range(model.spec.num_stages):
        for blk in model.stage_modules(s):
            h = blk(h)
        if s in at:
            outs.append(model.exit_heads[at[s]](h))  # before the next block, which may reuse h's memory
    outs.append(model.forward_head(h))
    return outs


def forward_to(model: "DynamicNet", k: int, x: torch.Tensor) -> torch.Tensor:
    """Exit ``k``'s logits [N, classes] (k = len(exits): the own head), running only the stem,
    the stages up to that exit and its head: what the budget policy runs, in any mode (a
    truncated network trained alone runs this in training)."""
    if not 0 <= k <= len(model.config.exits):
        raise ConfigError(f"exit={k!r} does not exist; allowed: 0..{len(model.config.exits)} (the own head last)")
    last_stage = model.config.exits[k] if k < len(model.config.exits) else model.spec.num_stages - 1
    h = model.forward_stem(x)
    for s in range(last_stage + 1):  # stages after the exit are never run
        for blk in model.stage_modules(s):
            h = blk(h)
    return _answer(model, k, h)


# ----------------------------------------------------------------------------- policies


class ExitPolicy(ABC):
    """How an eval-mode forward pass of a model with exits runs (module docstring)."""

    name: str

    @abstractmethod
    def run(self, model: "DynamicNet", x: torch.Tensor) -> Any:
        """The forward pass; sets ``model.last_exit``."""


class FinalPolicy(ExitPolicy):
    name = "final"

    def run(self, model: "DynamicNet", x: torch.Tensor) -> torch.Tensor:
        model.last_exit = _all_at(x, len(model.config.exits))
        return model.forward_without_exits(x)


class AllExitsPolicy(ExitPolicy):
    name = "all"

    def run(self, model: "DynamicNet", x: torch.Tensor) -> list[torch.Tensor]:
        model.last_exit = _all_at(x, len(model.config.exits))
        return forward_exits(model, x)


def _positive(name: str, value: Any, unit: str = "milliseconds") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: a positive number of {unit}")
    return float(value)


class _Predicted(ExitPolicy):
    """A policy that reads the latency predictor for ``target`` (per batch size, memoized)."""

    def __init__(self, target: Any) -> None:
        from dynas.predictors.targets import HardwareTarget, load_target

        self.target = target if isinstance(target, HardwareTarget) else load_target(target)

    def _prediction(self, config: ArchConfig, n: int):
        from dynas.predictors.latency import predict

        return predict(config, self.target, n)

    def _too_small(
        self, name: str, value: float, cost: float, n: int, config: ArchConfig, unit: str = "ms"
    ) -> ConfigError:
        return ConfigError(
            f"{name}={value:g} is below the first exit's cost (after stage {config.exits[0]}) at batch {n}: "
            f"{cost:.4g} {unit} predicted on {self.target.name}; allowed: >= {cost:.4g}"
        )


class BudgetPolicy(_Predicted):
    name = "budget"

    def __init__(self, budget_ms: float | None = None, target: Any = None, budget_mj: float | None = None) -> None:
        if (budget_ms is None) == (budget_mj is None):
            given = "both" if budget_ms is not None else "neither"
            raise ConfigError(
                f"exit policy 'budget': {given} of budget_ms and budget_mj given; allowed: exactly one "
                "(budget_ms: predicted latency, budget_mj: predicted energy, whole batch)"
            )
        if target is None:
            raise ConfigError("exit policy 'budget': target=None; allowed: a target name or file (its predicted costs)")
        energy = budget_mj is not None
        #: the budget's option name, the ExitPrediction field it bounds (whole batch) and that field's unit
        self.budget_name, self.cost_field, self.unit = (
            ("budget_mj", "energy_mj", "mJ") if energy else ("budget_ms", "latency_ms", "ms")
        )
        value = budget_mj if energy else budget_ms
        self.budget = _positive(self.budget_name, value, "millijoules" if energy else "milliseconds")
        self.budget_ms, self.budget_mj = (None, self.budget) if energy else (self.budget, None)
        super().__init__(target)
        if budget_mj is not None and self.target.energy is None:
            raise no_energy_error(f"budget_mj={budget_mj!r}", self.target.name, "budget_ms, or a target with [energy]")
        self._chosen: dict[tuple[ArchConfig, int], int] = {}

    def exit_for(self, config: ArchConfig, n: int) -> int:
        """The deepest exit whose predicted latency (energy, with ``budget_mj``) straight to it fits
        the budget at batch ``n``."""
        key = (config, n)
        if key not in self._chosen:
            exits = self._prediction(config, n).exits
            fits = [e.exit for e in exits if getattr(e, self.cost_field) <= self.budget]
            if not fits:
                first = getattr(exits[0], self.cost_field)
                raise self._too_small(self.budget_name, self.budget, first, n, config, self.unit)
            self._chosen[key] = max(fits)
        return self._chosen[key]

    def run(self, model: "DynamicNet", x: torch.Tensor) -> torch.Tensor:
        k = self.exit_for(model.config, x.shape[0])
        model.last_exit = _all_at(x, k)
        return forward_to(model, k, x)


class DeadlinePolicy(_Predicted):
    name = "deadline"

    def __init__(self, deadline_ms: float, target: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        self.deadline_ms = _positive("deadline_ms", deadline_ms)
        super().__init__(target)
        self.clock = clock
        self._costs: dict[tuple[ArchConfig, int], dict[str, Any]] = {}

    def unit_costs(self, config: ArchConfig, n: int) -> dict[str, Any]:
        """Predicted ms at batch ``n``: ``stem``, ``blocks`` [stage][block], ``heads`` (own head last)."""
        key = (config, n)
        if key not in self._costs:
            from dynas.predictors.latency import predict_blocks

            pred = self._prediction(config, n)
            if pred.exits[0].anytime_latency_ms > self.deadline_ms:
                raise self._too_small("deadline_ms", self.deadline_ms, pred.exits[0].anytime_latency_ms, n, config)
            self._costs[key] = {
                "stem": pred.stem_ms,
                "blocks": predict_blocks(config, self.target, n),
                "heads": [e.head_ms for e in pred.exits],
            }
        return self._costs[key]

    def _now_ms(self, x: torch.Tensor) -> float:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return self.clock() * 1e3

    def run(self, model: "DynamicNet", x: torch.Tensor) -> torch.Tensor:
        costs = self.unit_costs(model.config, x.shape[0])
        at = _stage_exits(model)
        trace: list[tuple[str, float, float, float]] = []  # (unit, predicted ms, start, end) since the start
        t0 = self._now_ms(x)
        answer: tuple[int, torch.Tensor] | None = None

        def unit(name: str, predicted: float, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
            start = self._now_ms(x) - t0
            if answer is not None and start + predicted > self.deadline_ms:
                return None  # would pass the deadline: stop before it
            out = fn()
            trace.append((name, predicted, start, self._now_ms(out) - t0))
            return out

        h = unit("stem", costs["stem"], lambda: model.forward_stem(x))
        assert h is not None
        for s in range(model.spec.num_stages):
            for j, blk in enumerate(model.stage_modules(s)):
                nxt = unit(f"stage {s} block {j}", costs["blocks"][s][j], lambda: blk(h))
                if nxt is None:
                    return self._finish(model, trace, answer)
                h = nxt
            k = at.get(s, len(model.config.exits) if s == model.spec.num_stages - 1 else None)
            if k is not None:
                logits = unit(f"exit {k}", costs["heads"][k], lambda: _answer(model, k, h))
                if logits is None:
                    return self._finish(model, trace, answer)
                answer = (k, logits)
        return self._finish(model, trace, answer)

    @staticmethod
    def _finish(model: "DynamicNet", trace: list, answer: tuple[int, torch.Tensor] | None) -> torch.Tensor:
        assert answer is not None  # the first exit always runs
        k, logits = answer
        model.last_trace = trace
        model.last_exit = _all_at(logits, k)
        return logits


def _check_thresholds(config: ArchConfig, thresholds: Any) -> tuple[float, ...]:
    if thresholds is None:
        if config.exit_thresholds is None:
            raise ConfigError(
                "thresholds=None and the config has no exit_thresholds; allowed: one number in [0, 1] per "
                "exit, or a config with exit_thresholds (dynas.kernels.exits.fit_thresholds)"
            )
        return config.exit_thresholds
    t = tuple(thresholds) if isinstance(thresholds, (list, tuple)) else thresholds
    if not isinstance(t, tuple) or len(t) != len(config.exits):
        n = len(t) if isinstance(t, tuple) else t
        raise ConfigError(
            f"thresholds has {n!r} entries; allowed: {len(config.exits)}, one per exit of this config "
            f"(exits after stages {list(config.exits)}): thresholds for a different config do not apply"
        )
    dataclasses.replace(config, exit_thresholds=t)  # validates each value (one line naming it)
    return t


class ConfidencePolicy(ExitPolicy):
    name = "confidence"

    def __init__(self, config: ArchConfig, thresholds: Sequence[float] | None = None) -> None:
        self.thresholds = _check_thresholds(config, thresholds)

    def run(self, model: "DynamicNet", x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        at = _stage_exits(model)
        final = len(model.config.exits)
        exit_of = torch.full((n,), final, dtype=torch.long, device=x.device)  # [N]
        idx = torch.arange(n, device=x.device)  # [m] input positions of the samples still running
        out: torch.Tensor | None = None  # [N, classes], filled exit by exit
        h = model.forward_stem(x)  # [N, C, H, W]
        for s in range(model.spec.num_stages):
            for blk in model.stage_modules(s):
                h = blk(h)  # [m, C_s, H_s, W_s]
            if s not in at:
                continue
            k = at[s]
            logits = model.exit_heads[k](h)  # [m, classes]
            if out is None:
                out = logits.new_empty(n, logits.shape[1])
            leave = F.softmax(logits, dim=1).amax(dim=1) >= self.thresholds[k]  # [m] bool
            gone = leave.nonzero().flatten()  # [m_gone] positions within the running batch
            if gone.numel() == 0:
                continue
            where = idx.index_select(0, gone)  # [m_gone] input positions
            out.index_copy_(0, where, logits.index_select(0, gone))  # [m_gone, classes] -> rows of [N, classes]
            exit_of.index_fill_(0, where, k)
            stay = (~leave).nonzero().flatten()  # [m_stay]
            if stay.numel() == 0:
                model.last_exit = exit_of
                return out
            h = take_samples(h, stay)  # [m_stay, C_s, H_s, W_s]: only these go on
            idx = idx.index_select(0, stay)  # [m_stay]
        logits = model.forward_head(h)  # [m, classes]
        if out is None:
            out = logits.new_empty(n, logits.shape[1])
        out.index_copy_(0, idx, logits)  # [m, classes] -> rows of [N, classes]
        model.last_exit = exit_of
        return out


#: policy name -> class (``make_policy`` builds them from keyword options)
EXIT_POLICIES: dict[str, type[ExitPolicy]] = {
    p.name: p for p in (FinalPolicy, AllExitsPolicy, BudgetPolicy, DeadlinePolicy, ConfidencePolicy)
}


def make_policy(config: ArchConfig, name: str, **options: Any) -> ExitPolicy:
    """The policy ``name`` for ``config`` (options as in the module docstring)."""
    if not config.exits:
        raise ConfigError('exit policy: the config has no exits; allowed: a config with "exits": [...]')
    cls = EXIT_POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"exit policy={name!r} is unknown; allowed: {', '.join(EXIT_POLICIES)}")
    try:
        return cls(config, **options) if cls is ConfidencePolicy else cls(**options)
    except TypeError as exc:
        raise ConfigError(f"exit policy {name!r}: {str(exc).splitlines()[0]}; see dynas.kernels.exits") from None


# ----------------------------------------------------------------------------- validation-side helpers


def exit_outputs(
    model: "DynamicNet", data: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct), each [exits, n]: every exit's top softmax probability and whether
    its answer is right, over a loader of ``(images, labels)`` (eval mode, ``"all"`` policy;
    the model's mode and policy are restored)."""
    was_training, policy = model.training, model.exit_policy
    model.eval()
    model.exit_policy = AllExitsPolicy()
    conf, hit = [], []
    try:
        with torch.no_grad():
            for x, y in data:
                probs = torch.stack([F.softmax(o, dim=1) for o in model(x)])  # [exits, B, classes]
                top, pred = probs.max(dim=2)  # [exits, B] each
                conf.append(top)
                hit.append(pred == y[None])
    finally:
        model.exit_policy = policy
        model.train(was_training)
    if not conf:
        raise ConfigError("data: the loader yielded no batch; allowed: a loader with at least one batch")
    return torch.cat(conf, dim=1), torch.cat(hit, dim=1)


def exit_accuracies(model: "DynamicNet", data: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Top-1 (fraction) of each exit, own head last (every sample answered at that exit)."""
    _, hit = exit_outputs(model, data)
    return [float(v) for v in hit.float().mean(dim=1)]


def fit_thresholds(
    model: "DynamicNet",
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    target: Any,
    budgets_ms: Sequence[float],
    batch_size: int | None = None,
) -> list[BudgetThresholds]:
    """Thresholds for each budget (mean predicted latency per image on ``target`` at
    ``batch_size``, default the target's), fitted on ``data`` by
    :func:`dynas.predictors.thresholds.budget_curve`."""
    confidence, correct = exit_outputs(model, data)
    return fit_from_outputs(model.config, confidence, correct, target, budgets_ms, batch_size)


def fit_from_outputs(
    config: ArchConfig,
    confidence: torch.Tensor,
    correct: torch.Tensor,
    target: Any,
    budgets_ms: Sequence[float],
    batch_size: int | None = None,
) -> list[BudgetThresholds]:
    """:func:`fit_thresholds` from :func:`exit_outputs` already computed (``confidence``,
    ``correct``: [exits, n]), for a caller that also reads each exit's accuracy from them."""
    from dynas.predictors.latency import predict

    exits = predict(config, target, batch_size).exits
    costs = [e.anytime_latency_ms_per_image for e in exits]
    return budget_curve(confidence.double().numpy(), correct.numpy(), costs, list(budgets_ms), config.exits[0])


def with_thresholds(config: ArchConfig, fitted: BudgetThresholds | Sequence[float]) -> ArchConfig:
    """``config`` with ``exit_thresholds`` set (validated: one per exit, each in [0, 1])."""
    t = fitted.thresholds if isinstance(fitted, BudgetThresholds) else tuple(fitted)
    return dataclasses.replace(config, exit_thresholds=_check_thresholds(config, t))
