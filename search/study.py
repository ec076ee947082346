"""Run a search: create or resume its Optuna study and run the missing trials.

One search is one Optuna study with two objectives, in this order:

1. the cost (minimize), by ``SearchOptions.objective``: ``latency_ms``, the predicted latency
   of one forward pass of the whole batch on the hardware target
   (:func:`dynas.predictors.latency.predict`), or ``energy_mj``, its predicted energy
   (:mod:`dynas.predictors.energy`; targets with an ``[energy]`` table only).  The study's user
   attrs ``objective`` and ``objectives`` name it; every trial stores both predictions;
2. ``top1`` (maximize): the accuracy proxy's predicted ImageNet top-1 in percent.

Lifecycle (the same command both starts and resumes a search)::

    options = SearchOptions(backbone="resnet50", target="a100", trials=200)
    plan = plan_search(options)   # validates everything; touches no file
    study = run_search(plan)      # opens/creates the study, runs the missing trials

* :func:`~dynas.search.options.plan_search` checks every option before anything is written
  (:mod:`dynas.search.options`).
* :func:`run_search` creates the study (storing what it was run with as study user attrs) or
  loads it when it exists.  A loaded study must have been created with the same backbone,
  input size, target, batch size, proxy, objective, search space, constraints and budgets
  (``budgets_ms`` or ``budgets_mj``), otherwise
  :class:`~dynas.errors.StudyError` names the field that differs.  ``trials`` is the total
  number of *finished* trials the study should hold (complete, or stopped early by
  :mod:`dynas.search.stopping`): only the missing ones are run, so an interrupted search is
  resumed by re-running the same command.
* Each trial is scored by :class:`~dynas.search.objective.Objective`, with a sampler of
  :mod:`dynas.search.samplers`, in a storage of :mod:`dynas.search.storage`; several workers
  share a study through :mod:`dynas.search.parallel`.

The public names of those modules that a search needs are importable from here too
(``from dynas.search.study import SearchOptions, run_search``).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Mapping, Sequence

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from dynas.errors import StudyError
from dynas.search import parallel
from dynas.search.objective import Objective
from dynas.search.options import DIRECTIONS, OBJECTIVE_NAMES, OBJECTIVES, SearchOptions, SearchPlan, plan_search
from dynas.search.samplers import SAMPLERS, make_sampler, register_sampler, resume_seed
from dynas.search.stopping import finished_trials, is_finished
from dynas.search.storage import DEFAULT_JOURNAL, DEFAULT_STORAGE, list_studies, load_study, open_storage, storage_kind

__all__ = [
    "DEFAULT_STORAGE",
    "DEFAULT_JOURNAL",
    "DIRECTIONS",
    "OBJECTIVE_NAMES",
    "OBJECTIVES",
    "SAMPLERS",
    "SearchOptions",
    "SearchPlan",
    "register_sampler",
    "make_sampler",
    "plan_search",
    "run_search",
    "open_storage",
    "list_studies",
    "load_study",
    "finished_trials",
]

_logger = logging.getLogger(__name__)

#: study user attrs that must match when a study is resumed, in the order they are checked
_CHECKED_ATTRS = (
    "backbone",
    "input_size",
    "target",
    "batch_size",
    "proxy",
    "proxy_options",
    "objective",
    "target_spec",
    "search_space",
    "max_latency_ms",
    "max_latency_ratio",
    "budgets_ms",
    "budgets_mj",
)

#: target fields that are descriptive only (not compared on resume)
_TARGET_TEXT = ("description", "sources")


def _check_resume(study: optuna.Study, expected: Mapping[str, Any], where: str) -> None:
    stored = study.user_attrs
    if "dynas_version" not in stored:
        raise StudyError(
            f"study {study.study_name!r} in {where} was not created by dynas search; use another study_name"
        )
    if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
        raise StudyError(f"study {study.study_name!r} in {where} has directions other than {DIRECTIONS}")
    for key in _CHECKED_ATTRS:
        have, want = stored.get(key), expected.get(key)
        if key == "objective" and have is None:
            have = "latency"  # studies made before there was a choice minimised latency
        if key == "target_spec" and isinstance(have, dict) and isinstance(want, dict):
            # Provenance text may change without changing a prediction.
            # A study made before targets had energy prices stored none; with the latency objective
            # they change no value of it.
            text = _TARGET_TEXT + (
                ("energy",) if "energy" not in have and expected.get("objective", "latency") == "latency" else ()
            )
            have = {k: v for k, v in have.items() if k not in text}
            want = {k: v for k, v in want.items() if k not in text}
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            k = diff[0]
            raise StudyError(
                f"study {study.study_name!r} in {where} was created with a different {key} "
                f"({k}={have.get(k)!r}, now {want.get(k)!r}); resume with the same options or use another study_name"
            )
        raise StudyError(
            f"study {study.study_name!r} in {where} was created with {key}={have!r}, but this run asks for "
            f"{key}={want!r}; resume with the same options or use another study_name"
        )


def _optimize_buffered(
    study: optuna.Study,
    sampler: optuna.samplers.BaseSampler,
    plan: SearchPlan,
    done: Sequence[FrozenTrial],
    missing: int,
) -> None:
    """Run trials against an in-memory copy and write each completed one to ``study`` at once.

    Optuna's database storages commit every suggested parameter and attribute on its own (about
    4 ms each on SQLite, ~65 ms per dynas trial); the analytical objective takes well under 1 ms.
    One process owns an SQLite study here, so trials run on an in-memory study seeded with the
    stored complete trials, and each completed trial is added to the database with one
    ``Study.add_trials`` (one commit, ~20 ms).  Nothing is RUNNING in the database, so a crash,
    even SIGKILL, loses no completed trial; re-running the same command resumes.
    """
    o = plan.options
    mem = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        sampler=sampler,
        directions=list(DIRECTIONS),
        study_name=study.study_name,
    )
    mem.add_trials(done)

    def write_through(_study: optuna.Study, trial: FrozenTrial) -> None:
        if is_finished(trial):
            study.add_trials([trial])

    mem.optimize(
        Objective(plan, done),
        n_trials=missing,
        timeout=o.timeout_s,
        callbacks=[
            write_through,
            optuna.study.MaxTrialsCallback(o.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
        ],
        show_progress_bar=o.show_progress,
    )


def run_search(options: SearchOptions | SearchPlan) -> optuna.Study:
    """Create or resume the study described by ``options`` and run its missing trials.

    Returns the study.  Raises :class:`~dynas.errors.DynasError` for bad options (before any
    file is written) and :class:`~dynas.errors.StudyError` when an existing study of the same
    name was created with other options.
    """
    plan = options if isinstance(options, SearchPlan) else plan_search(options)
    o = plan.options
    expected = plan.study_attrs()  # before opening the storage: a failure here leaves no file
    # With the heartbeat on, trials left RUNNING by a killed process are failed and retried.
    storage = open_storage(plan.storage_url, create=True, heartbeat_s=o.heartbeat_s)
    where = plan.storage_url if isinstance(plan.storage_url, str) else type(plan.storage_url).__name__

    names = optuna.study.get_all_study_names(storage=storage)
    n_existing = 0
    if plan.study_name in names:
        existing = optuna.load_study(study_name=plan.study_name, storage=storage)
        n_existing = len(existing.get_trials(deepcopy=False))
        if existing.user_attrs or n_existing:
            _check_resume(existing, expected, where)

    # TPE runs on per-trial snapshots that show trials stopped early as points it can rank
    # (dynas.search.parallel.SnapshotSampler); the other samplers as they are.
    sampler = parallel.shared_sampler(make_sampler(o.sampler, resume_seed(o.seed, n_existing)))
    study = optuna.create_study(
        storage=storage,
        study_name=plan.study_name,
        sampler=sampler,
        directions=list(DIRECTIONS),
        load_if_exists=True,
    )
    if "dynas_version" not in study.user_attrs:
        for k, v in expected.items():
            study.set_user_attr(k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(list(plan.objective_names))

    done = finished_trials(study)
    missing = o.trials - len(done)
    if missing <= 0:
        _logger.info("study %s: %d/%d complete trials already; nothing to run", plan.study_name, len(done), o.trials)
        return study
    _logger.info(
        "study %s (%s): %d/%d complete trials, running %d more with sampler %s",
        plan.study_name,
        where,
        len(done),
        o.trials,
        missing,
        o.sampler,
    )
    kind = storage_kind(storage)
    if kind == "memory":
        study.optimize(
            Objective(plan, done),
            n_trials=missing,
            timeout=o.timeout_s,
            callbacks=[optuna.study.MaxTrialsCallback(o.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))],
            show_progress_bar=o.show_progress,
        )
    elif kind == "sqlite" and o.workers == 1:
        # Trials enqueued in the database (Study.enqueue_trial) run first, directly on it, so
        # they are consumed there; the rest run buffered.
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if waiting:
            study.optimize(
                Objective(plan, done), n_trials=min(waiting, missing), timeout=o.timeout_s, show_progress_bar=False
            )
            done = finished_trials(study)
            missing = o.trials - len(done)
        if missing > 0:
            _optimize_buffered(study, sampler, plan, done, missing)
    else:
        # A storage other processes may share while this runs (journal file, database server),
        # or several workers: every trial claims its slot in the shared study (dynas.search.parallel).
        if kind == "sqlite":
            _logger.warning(
                "%d workers on SQLite (%s) may fail with 'database is locked'; use %s on one machine "
                "or postgresql://... on several",
                o.workers,
                where,
                DEFAULT_JOURNAL,
            )
        if o.workers == 1:
            shared = optuna.load_study(study_name=plan.study_name, sampler=sampler, storage=storage)
            deadline = None if o.timeout_s is None else time.monotonic() + o.timeout_s
            parallel.worker_loop(shared, Objective(plan, done), o.trials, deadline, show_progress=o.show_progress)
        else:
            parallel.run_workers(plan, study, n_existing)
    n_done = len(finished_trials(study))
    _logger.info(
        "study %s: %d/%d finished trials, %d on the Pareto front",
        plan.study_name,
        n_done,
        o.trials,
        len(study.best_trials),
    )
    return study
