"""The objective of a search: one trial -> (predicted latency or energy, the proxy's top-1).

:class:`Objective` suggests a config from the plan's search space, predicts its latency (and
energy, where the target prices it) on the plan's target and asks the plan's proxy for its
top-1.  The first value is the plan's objective (``latency_ms`` or ``energy_mj``, whole batch);
both predictions are stored in the trial's user attrs whichever it is.  It runs the same in one process and in
every worker of :mod:`dynas.search.parallel`.

* Every trial stores its config, its prediction (minus the repeated config) and a few scalars
  as trial user attrs; constraints (``max_latency_ms``, ``max_latency_ratio``, on latency under
  either objective) are stored with
  :meth:`optuna.trial.Trial.set_constraint`, so the samplers steer away from infeasible
  configs and ``study.best_trials`` holds feasible trials only.
* A repeated parameter set (samplers do propose them on this discrete space) reuses the first
  trial's values and attrs (``duplicate_of`` names that trial) instead of predicting again.
* With latency or energy budgets (``SearchPlan.budgets``), the second value is the mean over the
  budgets of the top-1 of the deepest exit that fits each (:mod:`dynas.search.budgets`); the
  per-budget top-1s, the exits used and the own head's top-1 (``top1_own``) are user attrs.
* A proxy that trains reports checkpoints through :class:`TrialReporter`, which records them as
  the trial's intermediate values and asks the plan's early stopper
  (:mod:`dynas.search.stopping`) whether to go on, given the :func:`peers` at that checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from dynas.predictors.latency import predict
from dynas.predictors.proxy import Reporter, StopTrial
from dynas.predictors.result import Prediction
from dynas.search.budgets import score_budgets
from dynas.search.options import SearchPlan, json_ready
from dynas.search.stopping import EarlyStopper, Peer, finished_trials, make_stopper

__all__ = ["Objective", "TrialReporter", "peers", "cost_attrs"]


def _params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def cost_attrs(pred: Prediction) -> dict[str, Any]:
    """The scalars of a prediction every trial stores: latency, and energy where the target
    predicts it (absent, not 0, where it does not)."""
    attrs = {
        "latency_ms": pred.latency_ms,
        "latency_ms_per_image": pred.latency_ms_per_image,
        "latency_ratio": pred.latency_ratio,
        "speedup": pred.speedup,
        "flops_ratio": pred.flops_ratio,
    }
    if pred.energy_mj is not None:
        attrs.update(energy_mj=pred.energy_mj, energy_mj_per_image=pred.energy_mj_per_image)
    return attrs


def peers(study: optuna.Study, step: int, number: int, first: str = "latency_ms") -> list[Peer]:
    """The finished trials of ``study`` other than trial ``number`` (and other than duplicates)
    with a value at checkpoint ``step``: what an early stopper compares that trial with.

    ``first`` names the study's first objective (``latency_ms`` or ``energy_mj``); a peer's cost
    (``Peer.latency_ms``, the stoppers' name for it) is that objective's value."""
    found = []
    for t in finished_trials(study):
        if t.number == number or step not in t.intermediate_values or "duplicate_of" in t.user_attrs:
            continue
        complete = t.state == TrialState.COMPLETE
        cost = t.values[0] if complete else t.user_attrs.get(f"{first}_configured")
        if cost is not None:
            found.append(Peer(t.number, float(cost), float(t.intermediate_values[step]), complete))
    return found


class TrialReporter(Reporter):
    """A proxy's checkpoints -> the trial's intermediate values, and the early-stopping decision."""

    def __init__(self, trial: Trial, cost: float, stopper: EarlyStopper, first: str = "latency_ms") -> None:
        # cost: the trial's first objective at its configured rates (latency_ms or energy_mj, named by first)
        self.trial, self.cost, self.stopper, self.first = trial, cost, stopper, first

    def report(self, step: int, top1: float, final: bool = False) -> None:
        trial = self.trial
        # Trial.report refuses multi-objective studies; the storage's own method does not, and
        # it is where optuna-dashboard and `dynas pareto` read intermediate values from.
        trial.study._storage.set_trial_intermediate_value(trial._trial_id, int(step), float(top1))  # noqa: SLF001
        if final:
            return
        others = peers(trial.study, int(step), trial.number, self.first)
        reason = self.stopper.should_stop(int(step), float(top1), self.cost, others)
        if reason is not None:
            raise StopTrial(int(step), reason)


class Objective:
    """Scores one trial: suggest a config, predict its latency and energy, ask the proxy.

    Every trial stores :func:`cost_attrs` (``latency_ms``, and ``energy_mj`` where the target
    predicts energy) whatever the objective, and ``{latency_ms,energy_mj}_configured``.
    A proxy that trains reports checkpoints through :class:`TrialReporter`; a trial stopped
    early is pruned with user attrs ``stop_reason`` and ``stopped_at_step`` (its config and
    predictions are stored first).  When the proxy returns the rates the trained gates
    realise (``ProxyResult.realised``), the objective is predicted for that config: the
    ``*_configured`` attrs keep the configured values, ``realised_config`` and the cost attrs
    the realised ones; ``config`` and ``prediction`` stay the configured ones (what a training
    run targets).
    """

    def __init__(self, plan: SearchPlan, done: Sequence[FrozenTrial]) -> None:
        self.plan = plan
        self.first = plan.objective_names[0]  # "latency_ms" or "energy_mj"
        self.stopper = make_stopper(plan.stop_rule)
        # params -> (values or None if stopped, user attrs, number) of finished trials, reused instead of recomputed
        self.seen: dict[tuple[tuple[str, Any], ...], tuple[tuple[float, float] | None, dict[str, Any], int]] = {}
        for t in done:
            if "config" in t.user_attrs and "duplicate_of" not in t.user_attrs:
                values = tuple(t.values) if t.state == TrialState.COMPLETE else None
                self.seen.setdefault(_params_key(t.params), (values, dict(t.user_attrs), t.number))

    def __call__(self, trial: Trial) -> tuple[float, float]:
        plan, o = self.plan, self.plan.options
        cfg = plan.space.suggest(trial)
        key = _params_key(trial.params)
        if key in self.seen:
            values, attrs, number = self.seen[key]
            attrs = {k: v for k, v in attrs.items() if k != "duplicate_of"}
            attrs["duplicate_of"] = number
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            if values is None:
                raise optuna.TrialPruned(attrs.get("stop_reason", "stopped"))
        else:
            values, attrs = self._evaluate(trial, cfg, key)
        # The latency constraints hold under either objective.
        latency_ms = values[0] if self.first == "latency_ms" else attrs["latency_ms"]
        if o.max_latency_ms is not None:
            trial.set_constraint("max_latency_ms", latency_ms - o.max_latency_ms)
        if o.max_latency_ratio is not None:
            trial.set_constraint("max_latency_ratio", attrs["latency_ratio"] - o.max_latency_ratio)
        return values

    def _evaluate(self, trial: Trial, cfg: Any, key: Any) -> tuple[tuple[float, float], dict[str, Any]]:
        """Predict ``cfg`` and ask the proxy (a config not seen before); store the user attrs."""
        plan = self.plan
        pred = predict(cfg, plan.target, plan.batch_size)
        prediction = pred.to_dict()
        prediction.pop("config", None)
        costs = cost_attrs(pred)
        attrs = json_ready(
            {
                "config": cfg.to_dict(),
                "short": cfg.short(),
                **{f"{k}_configured": costs[k] for k in ("latency_ms", "energy_mj") if k in costs},
                **costs,
                "prediction": prediction,
            }
        )
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        try:
            result = plan.proxy.evaluate(cfg, TrialReporter(trial, float(costs[self.first]), self.stopper, self.first))
        except StopTrial as stop:
            stopped = {"stop_reason": stop.reason, "stopped_at_step": stop.step}
            for k, v in stopped.items():
                trial.set_user_attr(k, v)
            self.seen[key] = (None, {**attrs, **stopped}, trial.number)
            raise optuna.TrialPruned(stop.reason) from None
        extra = dict(result.attrs)
        top1 = float(result.top1)
        if result.realised is not None:
            pred = predict(result.realised, plan.target, plan.batch_size)
            costs = cost_attrs(pred)
            extra.update(
                {"realised_config": result.realised.to_dict(), "realised_short": result.realised.short(), **costs}
            )
        if plan.budgets is not None:  # exits as the gates realise them, when they differ
            chance = plan.proxy.chance_top1(cfg)
            scored = score_budgets(pred, top1, extra.get("exit_top1"), plan.budgets, chance, plan.budget_unit)
            extra.update(scored.attrs(), top1_own=top1)
            top1 = scored.mean_top1
        extra = json_ready(extra)
        for k, v in extra.items():
            trial.set_user_attr(k, v)
        attrs.update(extra)
        values = (float(costs[self.first]), top1)
        self.seen[key] = (values, attrs, trial.number)
        return values, attrs
