"""Searching early exits for latency or energy budgets (``dynas search --budgets-ms`` /
``--budgets-mj`` / ``--budget-ratios``).

DDI (Wang et al., 2020) serves a range of hard resource budgets with one model that halts
inference at an early exit; MSDNet (Huang et al., ICLR 2018) scores such a model by its accuracy
at each budget.  A search with budgets does the same per trial:

* early exits join the search space (which stages get one, and the head type among
  ``SpaceOptions.exit_heads``, default light only: :class:`~dynas.spaces.searchspace.SearchSpace`);
* the proxy measures each exit's top-1 (``ProxyResult.attrs["exit_top1"]``; only proxies with
  ``scores_exits``, so not ``prior``, which has no published early-exit accuracies to fit);
* at each budget the trial answers from the deepest exit whose predicted cost straight to it
  (``ExitPrediction.latency_ms``, or ``energy_mj`` for energy budgets; whole batch: what the
  kernels' budget policy runs) fits the budget, and scores that exit's top-1; if no exit fits,
  it scores chance (:meth:`~dynas.predictors.proxy.AccuracyProxy.chance_top1`), as a model with
  no answer in time;
* the study's second objective is the mean of those top-1s over the budgets
  (:func:`score_budgets`), the first stays the whole network's cost in the budgets' unit
  (``latency_ms`` or ``energy_mj``).  The per-budget top-1s and the exit used at each budget are
  trial user attrs (``budget_top1``, ``budget_exit``), shown as columns of the Pareto table.

A budget's unit (:data:`BUDGET_UNITS`) is ``"ms"`` (latency, like ``--max-latency-ms``) or
``"mj"`` (energy, targets with an ``[energy]`` table); budgets are whole-batch costs, kept
sorted; ratios are of the static network's predicted cost on the target, in the unit of the
search's objective.  A study stores them as ``budgets_ms`` or ``budgets_mj``
(:func:`study_budgets`).  :func:`check_reachable` refuses a budget below the cheapest exit the
space can place.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from dynas.errors import ConfigError
from dynas.predictors.latency import predict
from dynas.predictors.result import Prediction
from dynas.spaces.config import ArchConfig
from dynas.spaces.searchspace import SearchSpace

__all__ = [
    "BUDGET_UNITS",
    "BudgetUnit",
    "BudgetScore",
    "check_budgets",
    "check_reachable",
    "score_budgets",
    "budget_columns",
    "static_budget_top1",
    "study_budgets",
]


class BudgetUnit(NamedTuple):
    """What a budget's unit means."""

    field: str  # the cost of a Prediction / ExitPrediction it bounds (whole batch)
    shown: str  # the unit as printed
    kind: str  # "latency" or "energy"


#: budget unit (as in ``budgets_ms``, ``top1@2.5ms``) -> what it bounds
BUDGET_UNITS: dict[str, BudgetUnit] = {
    "ms": BudgetUnit("latency_ms", "ms", "latency"),
    "mj": BudgetUnit("energy_mj", "mJ", "energy"),
}


def study_budgets(attrs: Any) -> tuple[tuple[float, ...], str] | None:
    """``(budgets, unit)`` of a study's user attrs (``budgets_ms`` or ``budgets_mj``); None
    for a study searched without budgets."""
    for unit in BUDGET_UNITS:
        given = attrs.get(f"budgets_{unit}")
        if given:
            return tuple(float(b) for b in given), unit
    return None


def budget_columns(budgets: Sequence[float], unit: str = "ms") -> tuple[str, ...]:
    """The Pareto table's column of each budget: ``top1@2.5ms`` (``top1@40mj`` for energy
    budgets), 4 significant digits (more where two budgets would share a name)."""
    for spec in (".4g", ".8g", "r"):
        names = tuple(f"top1@{b:{spec}}{unit}" if spec != "r" else f"top1@{b!r}{unit}" for b in budgets)
        if len(set(names)) == len(names):
            break
    return names


def check_budgets(name: str, value: Any) -> tuple[float, ...] | None:
    """``value`` (``None`` or a list of positive numbers) as a sorted tuple of floats.

    Raises :class:`ConfigError` for an empty list, a number that is not finite and > 0, or a
    budget given twice (it would count twice in the mean)."""
    if value is None:
        return None
    unit = {
        "budgets_ms": "ms, whole batch",
        "budgets_mj": "mJ, whole batch",
    }.get(name, "ratios of the static network's latency, or energy with objective='energy'")
    allowed = f"a non-empty list of distinct numbers > 0 ({unit})"
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{name}={value!r} is not a non-empty list; allowed: {allowed}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{name}: {v!r} is not a positive number; allowed: {allowed}")
    twice = sorted({float(v) for v in value if list(value).count(v) > 1})
    if twice:
        raise ConfigError(f"{name}={list(value)!r} lists {twice[0]:g} twice; allowed: {allowed}")
    return tuple(sorted(float(v) for v in value))


def check_reachable(
    budgets: Sequence[float],
    space: SearchSpace,
    target: Any,
    batch_size: int,
    label: str,
    ratios: Sequence[float] | None = None,
    unit: str = "ms",
) -> tuple[float, float]:
    """Refuse budgets that no exit of ``space`` can meet; warn about those the static network's
    first exit misses.  Returns ``(lowest possible exit cost, static first exit cost)`` in the
    budgets' ``unit`` (``"ms"`` or ``"mj"``).

    The lowest possible cost of an exit is the stem plus the cheapest exit head the space can
    place, every stage counted as free: a safe bound, since any exit also runs the stages
    before it.  The static network's first exit (after stage 0, static, cheapest head) is what
    a config that does not skip in stage 0 needs.  ``ratios``: the ``budget_ratios`` the
    budgets came from, named in the messages.
    """
    field, shown = BUDGET_UNITS[unit].field, BUDGET_UNITS[unit].shown
    spec = ArchConfig.static(space.backbone, space.input_size)
    lowest, static_first, head = math.inf, math.inf, ""
    for h in space.exit_heads or ():
        cfg = ArchConfig(spec.backbone, spec.input_size, spec.stages, space.exit_stages, h)
        pred = predict(cfg, target, batch_size)
        stem, heads = (
            (pred.stem_ms, [e.head_ms for e in pred.exits[:-1]])
            if unit == "ms"
            else (pred.stem_energy_mj, [e.head_energy_mj for e in pred.exits[:-1]])
        )
        cheapest = stem + min(heads)  # type: ignore[operator, type-var]  # energy budgets: targets with energy
        if cheapest < lowest:
            lowest, head = cheapest, h
        static_first = min(static_first, getattr(pred.exits[0], field))
    low = min(budgets)
    given = f"budgets_{unit}={low:.4g}" if ratios is None else f"budget_ratios={min(ratios):g} ({low:.4g} {shown})"
    if low < lowest:
        raise ConfigError(
            f"{given} is below every exit's cost: at least {lowest:.4g} {shown} (the stem and the "
            f"cheapest {head} exit head on {label} at batch {batch_size}, stages counted as free); "
            f"allowed: budgets >= {lowest:.4g} {shown}"
            + ("" if ratios is None else f" (ratio {lowest / low * min(ratios):.3g})")
        )
    if low < static_first:
        warnings.warn(
            f"{given} is below the static network's first exit ({static_first:.4g} {shown} on {label} at "
            f"batch {batch_size}): only configs that skip work in stage 0 can answer within it",
            stacklevel=3,
        )
    return lowest, static_first


@dataclass(frozen=True)
class BudgetScore:
    """A trial's accuracy at each budget: ``top1[i]`` at ``budgets[i]`` (in ``unit``), answered
    by the exit after stage ``exits[i]`` (``None``: no exit fits; chance)."""

    budgets: tuple[float, ...]
    top1: tuple[float, ...]
    exits: tuple[int | None, ...]
    unit: str = "ms"

    @property
    def mean_top1(self) -> float:
        """The search's objective: the mean over the budgets."""
        return sum(self.top1) / len(self.top1)

    def attrs(self) -> dict[str, Any]:
        """The trial user attrs (JSON-ready): ``budget_top1`` and ``budget_exit``, in budget order."""
        return {"budget_top1": list(self.top1), "budget_exit": list(self.exits)}


def _exit_points(pred: Prediction, top1: float, exit_top1: Any, field: str) -> list[tuple[int, float, float]]:
    """``(after_stage, cost, top1)`` per exit of ``pred``'s config, own head last; ``cost`` is
    the exit's ``field`` (``latency_ms`` or ``energy_mj``)."""
    cfg = pred.config
    if not cfg.exits:
        return [(cfg.spec.num_stages - 1, getattr(pred, field), float(top1))]
    stages = [e.after_stage for e in pred.exits]
    if (
        not isinstance(exit_top1, (list, tuple))
        or len(exit_top1) != len(stages)
        or any(not isinstance(d, dict) or d.get("after_stage") != s for d, s in zip(exit_top1, stages))
    ):
        raise ConfigError(
            f"proxy attrs exit_top1={exit_top1!r} does not match the config's exits; allowed: one "
            f"{{'after_stage', 'top1'}} per exit after stages {stages} (own head last)"
        )
    return [(s, getattr(e, field), float(d["top1"])) for s, e, d in zip(stages, pred.exits, exit_top1)]


def score_budgets(
    pred: Prediction, top1: float, exit_top1: Any, budgets: Sequence[float], chance_top1: float, unit: str = "ms"
) -> BudgetScore:
    """Score one trial at each budget (module docstring): the deepest exit of ``pred`` whose
    cost in ``unit`` (``latency_ms``, or ``energy_mj`` for ``"mj"``) is <= the budget answers
    with its top-1 from ``exit_top1`` (the proxy's ``attrs["exit_top1"]``; ``top1`` for a config
    without exits); none fits: ``chance_top1``."""
    points = _exit_points(pred, top1, exit_top1, BUDGET_UNITS[unit].field)
    scores, used = [], []
    for b in budgets:
        fits = [p for p in points if p[1] <= b]
        deepest = fits[-1] if fits else None  # points are in network order, so the last that fits is the deepest
        scores.append(deepest[2] if deepest else float(chance_top1))
        used.append(deepest[0] if deepest else None)
    return BudgetScore(tuple(float(b) for b in budgets), tuple(scores), tuple(used), unit)


def static_budget_top1(
    static_pred: Prediction, static_top1: float, budgets: Sequence[float], chance: float, unit: str = "ms"
) -> float:
    """The static network's score under the same rule (no exits: its top-1 where it fits, chance
    elsewhere): the baseline of a budget study (``static_budget_top1``)."""
    return score_budgets(static_pred, static_top1, None, budgets, chance, unit).mean_top1
