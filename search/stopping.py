"""Early stopping for two objectives: stop training a candidate that cannot reach the front.

Optuna's pruners need one objective (``Trial.report`` and ``Trial.should_prune`` raise for
multi-objective studies; Optuna issue #3450).  Here latency is known before training (it is
predicted), and only accuracy grows with training, so a candidate can be compared, at the
same checkpoint, with candidates that are at least as fast.

Lifecycle of a stopper (one small ABC per plugin family, as Optuna does for pruners):

1. It is looked up by name in :data:`STOPPERS` (``dynas search --early-stop NAME``) and built
   once per search with the options of :class:`StopRule`.
2. A proxy that trains reports top-1 at each checkpoint.  The search records the value as the
   trial's intermediate value (visible in optuna-dashboard and ``dynas pareto``) and calls
   :meth:`EarlyStopper.should_stop` with the trial's predicted latency and the *peers* at that
   checkpoint: every finished trial of the study (complete, or stopped at or after it) with a
   value there.
3. A returned reason stops the trial: it is pruned (Optuna state PRUNED) with user attrs
   ``stop_reason`` and ``stopped_at_step``, and counts towards ``--trials`` like a complete one.

Stoppers decide from the study's stored trials only, so they work the same with one worker,
with many, and across machines.  A one-shot proxy (``prior``) has no checkpoints, so no
stopper ever acts on it.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from dynas.checks import check_choice, check_int, check_number

__all__ = [
    "Peer",
    "StopRule",
    "EarlyStopper",
    "STOPPERS",
    "register_stopper",
    "make_stopper",
    "is_stopped",
    "is_finished",
    "finished_trials",
]


def is_stopped(trial: FrozenTrial) -> bool:
    """Stopped early: PRUNED with user attr ``stop_reason`` (a trial pruned for another reason,
    such as a surplus trial of :mod:`dynas.search.parallel`, is not)."""
    return trial.state == TrialState.PRUNED and "stop_reason" in trial.user_attrs


def is_finished(trial: FrozenTrial) -> bool:
    """Counts towards ``trials``: COMPLETE, or stopped early."""
    return trial.state == TrialState.COMPLETE or is_stopped(trial)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count towards ``trials``: COMPLETE ones and those stopped early
    (PRUNED with user attr ``stop_reason``; a trial pruned for another reason does not count)."""
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)) if is_finished(t)
    ]


@dataclass(frozen=True)
class Peer:
    """A finished trial's value at the checkpoint being decided."""

    number: int
    latency_ms: float  # its latency objective (complete) or predicted latency (stopped)
    top1: float  # its top-1 (%) at this checkpoint
    complete: bool  # False: it was itself stopped (at this checkpoint or later)


@dataclass(frozen=True)
class StopRule:
    """The options of every stopper; each uses the ones its docstring names."""

    name: str = "dominance"
    margin: float = 2.0  # top-1 points a dominating trial must be ahead by
    min_trials: int = 2  # dominance: dominating trials needed; halving: peers needed before it acts
    eta: int = 3  # halving: keep the best 1/eta at each checkpoint

    def __post_init__(self) -> None:
        # Messages name the options as SearchOptions and ``dynas search`` spell them.
        check_choice("early_stop", self.name, sorted(STOPPERS))
        check_number("stop_margin", self.margin, 0, math.inf, allowed="a number >= 0 (top-1 points)")
        check_int("stop_min_trials", self.min_trials, 1)
        check_int("stop_eta", self.eta, 2)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "margin": self.margin, "min_trials": self.min_trials, "eta": self.eta}


class EarlyStopper(abc.ABC):
    """Decides at a checkpoint whether a running trial should stop (see the module docstring)."""

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule

    @abc.abstractmethod
    def should_stop(self, step: int, top1: float, latency_ms: float, peers: Sequence[Peer]) -> str | None:
        """A one-line reason to stop the trial at ``step``, or None to go on."""


#: name -> stopper class
STOPPERS: dict[str, type[EarlyStopper]] = {}


def register_stopper(name: str) -> Callable[[type[EarlyStopper]], type[EarlyStopper]]:
    def deco(cls: type[EarlyStopper]) -> type[EarlyStopper]:
        STOPPERS[name] = cls
        return cls

    return deco


@register_stopper("none")
class NoStopping(EarlyStopper):
    """Never stop: every trial trains to the end."""

    def should_stop(self, step: int, top1: float, latency_ms: float, peers: Sequence[Peer]) -> str | None:
        return None


@register_stopper("dominance")
class DominanceStopping(EarlyStopper):
    """Stop when at least ``min_trials`` complete trials that are at least as fast scored at
    least ``margin`` points more at the same checkpoint: this candidate is dominated there,
    clearly, and training rarely closes a gap its betters also had time to grow."""

    def should_stop(self, step: int, top1: float, latency_ms: float, peers: Sequence[Peer]) -> str | None:
        better = sorted(
            (p for p in peers if p.complete and p.latency_ms <= latency_ms and p.top1 >= top1 + self.rule.margin),
            key=lambda p: -p.top1,
        )
        if len(better) < self.rule.min_trials:
            return None
        names = ", ".join(f"#{p.number} {p.top1:.1f}%" for p in better[:3])
        return (
            f"dominated at step {step}: {len(better)} complete trials at least as fast score >= {self.rule.margin:g} "
            f"points above {top1:.1f}% ({names})"
        )


@register_stopper("halving")
class HalvingStopping(EarlyStopper):
    """Asynchronous successive halving at every checkpoint, for two objectives: once
    ``min_trials`` finished trials reached the checkpoint, a trial goes on if no
    at-least-as-fast trial scores more there (it is on the checkpoint's front), or if it is among
    the best ceil(n / ``eta``) of the n trials there (this one included), ranked by how many
    at-least-as-fast trials score more (fewer is better), then by top-1."""

    def should_stop(self, step: int, top1: float, latency_ms: float, peers: Sequence[Peer]) -> str | None:
        if len(peers) < self.rule.min_trials:
            return None

        def beaten_by(lat: float, acc: float) -> int:
            return sum(1 for p in peers if p.latency_ms <= lat and p.top1 > acc)

        mine = beaten_by(latency_ms, top1)
        if mine == 0:
            return None
        me = (mine, -top1)
        ahead = sum(
            1
            for p in peers
            if (beaten_by(p.latency_ms, p.top1) + (latency_ms <= p.latency_ms and top1 > p.top1), -p.top1) < me
        )
        keep = math.ceil((len(peers) + 1) / self.rule.eta)
        if ahead < keep:
            return None
        return (
            f"halving at step {step}: {mine} trials at least as fast score more; rank {ahead + 1} of {len(peers) + 1}, "
            f"only the best {keep} go on (eta={self.rule.eta})"
        )


def make_stopper(rule: StopRule | str) -> EarlyStopper:
    """The stopper of ``rule`` (a :class:`StopRule` or a name with the default options)."""
    rule = StopRule(rule) if isinstance(rule, str) else rule
    return STOPPERS[rule.name](rule)
