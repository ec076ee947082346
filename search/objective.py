"""The objective of a search: one trial -> (predicted latency, the proxy's top-1).

:class:`Objective` suggests a config from the plan's search space, predicts its latency on the
plan's target and asks the plan's proxy for its top-1.  It runs the same in one process and in
every worker of :mod:`dynas.search.parallel`.

* Every trial stores its config, its prediction (minus the repeated config) and a few scalars
  as trial user attrs; constraints (``max_latency_ms``, ``max_latency_ratio``) are stored with
  :meth:`optuna.trial.Trial.set_constraint`, so the samplers steer away from infeasible
  configs and ``study.best_trials`` holds feasible trials only.
* A repeated parameter set (samplers do propose them on this discrete space) reuses the first
  trial's values and attrs (``duplicate_of`` names that trial) instead of predicting again.
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
from dynas.search.options import SearchPlan, json_ready
from dynas.search.stopping import EarlyStopper, Peer, finished_trials, make_stopper

__all__ = ["Objective", "TrialReporter", "peers"]


def _params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def peers(study: optuna.Study, step: int, number: int) -> list[Peer]:
    """The finished trials of ``study`` other than trial ``number`` (and other than duplicates)
    with a value at checkpoint ``step``: what an early stopper compares that trial with."""
    found = []
    for t in finished_trials(study):
        if t.number == number or step not in t.intermediate_values or "duplicate_of" in t.user_attrs:
            continue
        complete = t.state == TrialState.COMPLETE
        latency = t.values[0] if complete else t.user_attrs.get("latency_ms_configured")
        if latency is not None:
            found.append(Peer(t.number, float(latency), float(t.intermediate_values[step]), complete))
    return found


class TrialReporter(Reporter):
    """A proxy's checkpoints -> the trial's intermediate values, and the early-stopping decision."""

    def __init__(self, trial: Trial, latency_ms: float, stopper: EarlyStopper) -> None:
        self.trial, self.latency_ms, self.stopper = trial, latency_ms, stopper

    def report(self, step: int, top1: float, final: bool = False) -> None:
        trial = self.trial
        # Trial.report refuses multi-objective studies; the storage's own method does not, and
        # it is where optuna-dashboard and `dynas pareto` read intermediate values from.
        trial.study._storage.set_trial_intermediate_value(trial._trial_id, int(step), float(top1))  # noqa: SLF001
        if final:
            return
        reason = self.stopper.should_stop(int(step), float(top1), self.latency_ms, peers(trial.study, int(step), trial.number))
        if reason is not None:
            raise StopTrial(int(step), reason)


class Objective:
    """Scores one trial: suggest a config, predict its latency, ask the proxy.

    A proxy that trains reports checkpoints through :class:`TrialReporter`; a trial stopped
    early is pruned with user attrs ``stop_reason`` and ``stopped_at_step`` (its config and
    predicted latency are stored first).  When the proxy returns the rates the trained gates
    realise (``ProxyResult.realised``), the latency objective is predicted for that config:
    user attrs ``realised_config`` and ``latency_ms_configured`` keep both, ``config`` and
    ``prediction`` stay the configured ones (what a training run targets).
    """

    def __init__(self, plan: SearchPlan, done: Sequence[FrozenTrial]) -> None:
        self.plan = plan
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
            pred = predict(cfg, plan.target, plan.batch_size)
            prediction = pred.to_dict()
            prediction.pop("config", None)
            attrs = json_ready(
                {
                    "config": cfg.to_dict(),
                    "short": cfg.short(),
                    "latency_ms_configured": pred.latency_ms,
                    "latency_ms_per_image": pred.latency_ms_per_image,
                    "latency_ratio": pred.latency_ratio,
                    "speedup": pred.speedup,
                    "flops_ratio": pred.flops_ratio,
                    "prediction": prediction,
                }
            )
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            try:
                result = plan.proxy.evaluate(cfg, TrialReporter(trial, float(pred.latency_ms), self.stopper))
            except StopTrial as stop:
                stopped = {"stop_reason": stop.reason, "stopped_at_step": stop.step}
                for k, v in stopped.items():
                    trial.set_user_attr(k, v)
                self.seen[key] = (None, {**attrs, **stopped}, trial.number)
                raise optuna.TrialPruned(stop.reason) from None
            latency_ms = float(pred.latency_ms)
            extra = dict(result.attrs)
            if result.realised is not None:
                real = predict(result.realised, plan.target, plan.batch_size)
                latency_ms = float(real.latency_ms)
                extra.update({"realised_config": result.realised.to_dict(), "realised_short": result.realised.short(),
                              "latency_ms_per_image": real.latency_ms_per_image, "latency_ratio": real.latency_ratio,
                              "speedup": real.speedup, "flops_ratio": real.flops_ratio})
            extra = json_ready(extra)
            for k, v in extra.items():
                trial.set_user_attr(k, v)
            attrs.update(extra)
            values = (latency_ms, float(result.top1))
            self.seen[key] = (values, attrs, trial.number)
        latency_ms = values[0]
        if o.max_latency_ms is not None:
            trial.set_constraint("max_latency_ms", latency_ms - o.max_latency_ms)
        if o.max_latency_ratio is not None:
            trial.set_constraint("max_latency_ratio", attrs["latency_ratio"] - o.max_latency_ratio)
        return values
