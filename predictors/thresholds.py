"""Confidence thresholds of the early exits for a latency budget (MSDNet's budgeted batch).

Given, on a validation split, every exit's confidence (top softmax probability) and whether its
answer is right, and each exit's predicted cost per image, :func:`thresholds_for_budget` picks
per-exit thresholds whose mean predicted latency per image meets a budget.  The procedure is
the one of MSDNet's public code (Huang et al., ICLR 2018, ``adaptive_inference.py``):

1. exit shares from a geometric family: ``q_k ~ p^k`` for exits ``k = 1..K``, normalised;
2. walking the exits in order, exit ``k``'s threshold is the confidence of the
   ``floor(n q_k)``-th most confident validation sample that no earlier exit took (all of them
   when fewer are left); the last exit (the network's own head) takes everything left;
3. a sample leaves at the first exit whose confidence reaches (``>=``) its threshold; the mean
   cost is ``sum_k share_k x cost_k`` over the validation split, the accuracy its top-1.

Our choices (MSDNet sweeps ``p = 1/20 .. 39/20`` and reports the whole curve):

* ``p`` is swept over MSDNet's 39 values plus finer ends (:data:`P_GRID`) and the two limits
  (everything at the first exit; everything at the last), and the budget's answer is the
  sweep point of highest validation accuracy whose mean cost meets the budget (ties: the
  cheaper, then the smaller ``p``).  Everything at the first exit costs exactly its cost, so
  any budget from the first exit's cost up has an answer;
* an exit that should take no sample gets threshold 1.0 (thresholds are kept in [0, 1]); a
  sample of confidence exactly 1.0 still leaves there, and the reported shares, accuracy and
  cost are those of the thresholds as applied, so they stay exact;
* costs are the anytime latencies per image (``ExitPrediction.anytime_latency_ms_per_image``:
  the heads of earlier exits included) at the predicted batch size; that later exits see
  smaller batches is not modelled.

This module is numpy only (no torch): the confidences come from
:func:`dynas.kernels.exits.exit_confidences` or from anywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dynas.errors import ConfigError

__all__ = [
    "P_GRID",
    "BudgetThresholds",
    "check_budget",
    "exit_at",
    "thresholds_for_p",
    "thresholds_for_budget",
    "budget_curve",
]

#: geometric-family parameters swept: MSDNet's k/20 for k = 1..39, plus finer ends (ours)
P_GRID: tuple[float, ...] = (
    (0.001, 0.002, 0.005, 0.01, 0.02)
    + tuple(k / 20 for k in range(1, 40))
    + (2.5, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0, 50.0)
)


@dataclass(frozen=True)
class BudgetThresholds:
    """Thresholds for one budget and what they give on the validation split.

    ``thresholds``: one per early exit (the own head takes the rest); ``shares``: fraction of
    the validation samples answering at each exit, own head included; ``accuracy``: top-1 as a
    fraction; ``mean_latency_ms``: predicted mean latency per image; ``p``: the geometric
    family's parameter (0: everything at the first exit, inf: everything at the last).
    """

    budget_ms: float
    thresholds: tuple[float, ...]
    p: float
    shares: tuple[float, ...]
    accuracy: float
    mean_latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_ms": self.budget_ms,
            "thresholds": list(self.thresholds),
            "p": None if math.isinf(self.p) else self.p,
            "shares": list(self.shares),
            "accuracy": self.accuracy,
            "mean_latency_ms": self.mean_latency_ms,
        }


def _check(confidence: Any, correct: Any, costs_ms: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)  # [K, n]
    ok = np.asarray(correct, dtype=bool)  # [K, n]
    costs = np.asarray(costs_ms, dtype=np.float64)  # [K]
    if conf.ndim != 2 or conf.shape[0] < 2 or conf.shape[1] < 1:
        raise ConfigError(f"confidence has shape {conf.shape}; allowed: [exits >= 2, samples >= 1] (own head included)")
    if ok.shape != conf.shape:
        raise ConfigError(f"correct has shape {ok.shape}; allowed: {conf.shape}, the confidences' shape")
    if costs.shape != (conf.shape[0],) or not np.all(np.isfinite(costs)) or np.any(costs < 0):
        raise ConfigError(
            f"costs_ms={costs.tolist()!r} is not allowed; allowed: {conf.shape[0]} finite numbers >= 0, one per exit"
        )
    if not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1:
        raise ConfigError("confidence has values outside [0, 1]; allowed: top softmax probabilities")
    return conf, ok, costs


def exit_at(confidence: Any, thresholds: Sequence[float]) -> np.ndarray:
    """[n] index of the exit each sample answers at: the first whose confidence reaches its
    threshold, else the last (``confidence``: [K, n]; ``thresholds``: K - 1 values)."""
    conf = np.asarray(confidence, dtype=np.float64)  # [K, n]
    t = np.asarray(thresholds, dtype=np.float64)  # [K - 1]
    if t.shape != (conf.shape[0] - 1,):
        raise ConfigError(f"thresholds has {t.size} entries; allowed: {conf.shape[0] - 1}, one per early exit")
    leaves = np.vstack([conf[:-1] >= t[:, None], np.ones((1, conf.shape[1]), dtype=bool)])  # [K, n]
    return leaves.argmax(axis=0)  # first True per sample


def thresholds_for_p(confidence: Any, p: float) -> tuple[float, ...]:
    """Step 2 of the module docstring for shares ``q_k ~ p^k`` (``p`` = 0 or inf: the limits)."""
    conf = np.asarray(confidence, dtype=np.float64)  # [K, n]
    k_exits, n = conf.shape
    if p == 0:
        return (0.0,) * (k_exits - 1)
    if math.isinf(p):
        return (1.0,) * (k_exits - 1)
    logq = np.arange(1, k_exits + 1) * math.log(p)  # [K]
    q = np.exp(logq - logq.max())
    q /= q.sum()
    taken = np.zeros(n, dtype=bool)
    out = []
    for k in range(k_exits - 1):
        left = np.sort(conf[k][~taken])[::-1]  # [n_left] descending
        want = math.floor(n * q[k])
        if want <= 0 or left.size == 0:
            t = 1.0
        else:
            t = float(left[min(want, left.size) - 1])
        out.append(t)
        taken |= conf[k] >= t
    return tuple(out)


def _evaluate(
    conf: np.ndarray, ok: np.ndarray, costs: np.ndarray, thresholds: tuple[float, ...]
) -> tuple[tuple[float, ...], float, float]:
    at = exit_at(conf, thresholds)  # [n]
    shares = np.bincount(at, minlength=conf.shape[0]) / conf.shape[1]  # [K]
    accuracy = float(ok[at, np.arange(conf.shape[1])].mean())
    return tuple(float(s) for s in shares), accuracy, float(shares @ costs)


def _sweep(
    conf: np.ndarray, ok: np.ndarray, costs: np.ndarray
) -> list[tuple[float, tuple[float, ...], tuple[float, ...], float, float]]:
    """(p, thresholds, shares, accuracy, mean cost) for every sweep point."""
    rows = []
    for p in (0.0,) + P_GRID + (math.inf,):
        t = thresholds_for_p(conf, p)
        rows.append((p, t, *_evaluate(conf, ok, costs, t)))
    return rows


def check_budget(value: Any, first_ms: float, first_stage: int | None = None) -> float:
    """``value`` as a budget (ms per image) that the first exit's cost ``first_ms`` fits, else a one-line
    :class:`ConfigError` naming that cost (``first_stage``: the stage the first exit follows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"budget_ms={value!r} is not allowed; allowed: a positive number (ms per image)")
    if value < first_ms * (1 - 1e-12):
        where = f" (the exit after stage {first_stage})" if first_stage is not None else ""
        raise ConfigError(
            f"budget_ms={value!r} is below the first exit's cost{where}: {first_ms:.4g} ms per image; "
            f"allowed: >= {first_ms:.4g}"
        )
    return float(value)


def _pick(rows: list, budget: float) -> BudgetThresholds:
    fits = [r for r in rows if r[4] <= budget * (1 + 1e-12)]
    p, t, shares, acc, cost = min(fits, key=lambda r: (-r[3], r[4], r[0]))
    return BudgetThresholds(budget, t, p, shares, acc, cost)


def thresholds_for_budget(
    confidence: Any, correct: Any, costs_ms: Sequence[float], budget_ms: float, first_stage: int | None = None
) -> BudgetThresholds:
    """Thresholds meeting ``budget_ms`` (mean predicted latency per image; module docstring).

    ``confidence``, ``correct``: [K, n] per exit (own head last) and validation sample;
    ``costs_ms``: [K] predicted latency per image of answering at each exit (anytime);
    ``first_stage``: the stage the first exit follows, for the error message of a budget below
    the first exit's cost.
    """
    return budget_curve(confidence, correct, costs_ms, [budget_ms], first_stage)[0]


def budget_curve(
    confidence: Any,
    correct: Any,
    costs_ms: Sequence[float],
    budgets_ms: Sequence[float],
    first_stage: int | None = None,
) -> list[BudgetThresholds]:
    """:func:`thresholds_for_budget` for each of ``budgets_ms`` (one sweep for all): the
    accuracy-vs-budget curve of one trained model."""
    conf, ok, costs = _check(confidence, correct, costs_ms)
    if isinstance(budgets_ms, (str, bytes)) or not isinstance(budgets_ms, Sequence) or not budgets_ms:
        raise ConfigError(f"budgets_ms={budgets_ms!r} is not allowed; allowed: a non-empty list of positive numbers")
    budgets = [check_budget(b, float(costs[0]), first_stage) for b in budgets_ms]
    rows = _sweep(conf, ok, costs)
    return [_pick(rows, b) for b in budgets]
