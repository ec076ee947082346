"""Samplers of a search, looked up by name (``dynas search --sampler NAME``).

Each factory in :data:`SAMPLERS` takes the seed and returns a fresh Optuna sampler; register more
with :func:`register_sampler` (its docstring's first line is the CLI help).  What the built-in
ones do with the conditional search space:

* ``tpe`` (default): multivariate TPE with ``group=True``, which models each set of parameters
  that occur together (e.g. a stage's rate and granularity when it picks ``spatial``) jointly.
* ``nsga2``: Optuna's NSGA-II; crossover acts on the parameters common to both parents.
* ``gp``: Optuna's GPSampler.  It models only the parameters present in *every* trial (the
  per-stage paradigms, unless a restriction leaves a single one); rates and granularities of
  conditional branches are drawn by its random fallback, so on this space it is mostly a
  paradigm optimiser.  It needs SciPy, which dynas does not require; asking for it without
  SciPy raises :class:`~dynas.errors.ConfigError`.  Slow beyond a few hundred trials.
* ``random``: uniform random sampling, the baseline.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Callable

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning

from dynas.checks import check_choice
from dynas.errors import ConfigError

__all__ = ["SAMPLERS", "register_sampler", "make_sampler", "resume_seed"]

#: name -> factory taking the seed and returning a fresh sampler
SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {}


def register_sampler(
    name: str,
) -> Callable[[Callable[[int], optuna.samplers.BaseSampler]], Callable[[int], optuna.samplers.BaseSampler]]:
    """Register a sampler factory ``f(seed) -> BaseSampler`` under ``name``.

    The factory's docstring (first line) is the help text of ``dynas search --sampler``.
    """

    def deco(fn: Callable[[int], optuna.samplers.BaseSampler]) -> Callable[[int], optuna.samplers.BaseSampler]:
        SAMPLERS[name] = fn
        return fn

    return deco


@register_sampler("tpe")
def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    """Multivariate TPE over groups of co-occurring parameters (handles the conditional space)."""
    # ``group`` is an experimental argument of TPESampler; the warning says so at construction
    # only, so it is silenced here and nowhere else.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


@register_sampler("nsga2")
def _nsga2(seed: int) -> optuna.samplers.BaseSampler:
    """NSGA-II genetic algorithm (population 50); needs a few hundred trials to pay off."""
    return optuna.samplers.NSGAIISampler(seed=seed)


@register_sampler("gp")
def _gp(seed: int) -> optuna.samplers.BaseSampler:
    """Gaussian-process BO (needs SciPy); models the per-stage paradigms, conditional rates are random."""
    # GPSampler imports SciPy lazily, at its first model-based trial; check up front instead.
    if importlib.util.find_spec("scipy") is None:
        others = ", ".join(n for n in sorted(SAMPLERS) if n != "gp")
        raise ConfigError(
            f"sampler='gp' needs SciPy, which is not installed (pip install scipy); allowed without it: {others}"
        ) from None
    # GPSampler models only the parameters present in every trial (the intersection search
    # space); the conditional ones fall back to its random sampler.  Saying so once per
    # parameter and trial would flood the log, hence warn_independent_sampling=False.
    return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)


@register_sampler("random")
def _random(seed: int) -> optuna.samplers.BaseSampler:
    """Uniform random sampling: a baseline for the other samplers."""
    return optuna.samplers.RandomSampler(seed=seed)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Build sampler ``name`` from :data:`SAMPLERS` with ``seed``."""
    return SAMPLERS[check_choice("sampler", name, sorted(SAMPLERS))](seed)


def resume_seed(seed: int, n_existing: int) -> int:
    """The sampler seed of a run that finds ``n_existing`` trials in its study.

    A fresh study uses the seed as given (same seed -> same trials).  A resumed run gets a seed
    derived from (seed, trials so far), so that it does not replay the random draws of the first
    run (a seeded random sampler would otherwise propose the same configs again).
    """
    if n_existing == 0:
        return seed
    return int(np.random.SeedSequence([seed, n_existing]).generate_state(1)[0])
