"""Many workers on one study: a global trial budget, dead-worker recovery, joblib processes.

Used by :func:`dynas.search.study.run_search` whenever the study lives in a storage that other
processes can share while it runs: a journal file (``journal:///FILE``, one machine) or a
database server (``postgresql://...``, many machines), or whenever ``workers > 1``.

Lifecycle of one worker (:func:`worker_loop`; the same in a joblib child process, in the
``dynas search`` process itself with ``--workers 1``, and on every machine of a multi-machine
search)::

    loop:
        recover dead trials     # RUNNING trials whose worker is gone -> FAIL, re-queued once more
        count trials            # COMPLETE (or stopped early) and RUNNING, read from the shared storage
        COMPLETE >= budget      -> stop
        COMPLETE + RUNNING >= budget -> wait (a running trial may still fail and need a retry)
        otherwise run trials with study.optimize; each trial first claims its slot:
            COMPLETE + (RUNNING trials numbered before it) >= budget -> it is surplus: it is
            pruned before it suggests anything, with the reason in user attr "stopped"

Optuna numbers the trials of a study atomically (a database transaction, or the order of the
journal log), so claims are totally ordered: the study ends with exactly ``trials`` complete
trials however many workers race for the last slots.  A pruned surplus trial holds no config.

Dead workers: database storages use Optuna's heartbeat (a trial whose worker has not beaten for
``2 * heartbeat_s`` is failed by the next worker that looks, and
:class:`optuna.storages.RetryFailedTrialCallback` queues a copy of it; a trial that never beat,
because its worker died right after creating it, is failed :data:`_UNOWNED_GRACE_S` after it
started).  Optuna's journal
storage has no heartbeat, so each trial records its worker (``host:pid:start-time`` in user
attr ``worker``, and its own number in ``worker_trial``), and a trial of this host whose process
is gone is failed and re-queued the same way.  Optuna's retry copies a failed trial's user attrs
into the queued copy, so a copy holds its dead original's ``worker`` until its new worker writes
its own; ``worker_trial`` tells the two apart, and a copy not yet claimed counts as naming no
worker.  A worker that was only slow (a heartbeat late on a stalled machine) finds its trial
failed and queued again by another; Optuna refuses its report of that trial, and it logs so and
goes on with the next.  A journal file shared by several hosts (NFS) cannot tell whether another host's
worker is alive; such trials are left running.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import socket
import threading
import time
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from dynas.errors import StudyError
from dynas.search.objective import Objective
from dynas.search.samplers import make_sampler, resume_seed
from dynas.search.stopping import finished_trials, is_finished
from dynas.search.storage import MAX_RETRY, open_storage, retry_callback

__all__ = [
    "SnapshotSampler",
    "shared_sampler",
    "MAX_RESTARTS",
    "MAX_RETRY",
    "retry_callback",
    "worker_id",
    "recover_dead_trials",
    "worker_loop",
    "run_workers",
]

_logger = logging.getLogger("dynas.search.study")

#: how often a ``dynas search --workers N`` process restarts its workers after one died
MAX_RESTARTS = 3
#: a RUNNING trial this old that names no worker (journal) or never beat (database) is dead (seconds)
_UNOWNED_GRACE_S = 60.0


# --------------------------------------------------------------------------------------------
# Worker identity and liveness
# --------------------------------------------------------------------------------------------


def _start_ticks(pid: int) -> str:
    # Field 22 of /proc/PID/stat: the process start time in clock ticks since boot.  It tells a
    # reused pid from the original process.  Empty where /proc does not exist.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def worker_id(pid: int | None = None) -> str:
    """``host:pid:start`` of this (or process ``pid``): what a trial records as its worker."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _alive(worker: str) -> bool:
    host, _, rest = worker.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True  # another host's worker: cannot tell, assume alive
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not ticks or _start_ticks(pid) == ticks


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and re-queue them.

    Returns the numbers of the trials it failed besides those that Optuna's heartbeat check
    failed (Optuna logs those).

    Database storages with a heartbeat: Optuna's :func:`optuna.storages.fail_stale_trials`, and
    a trial that never beat and started over :data:`_UNOWNED_GRACE_S` ago (Optuna skips those:
    a worker killed between ``study.ask()`` and its heartbeat thread's first beat leaves a
    RUNNING trial that no heartbeat check would ever fail, and the study would wait for it).
    Journal storages: the trial's ``worker`` attr names a process of this host that no longer
    exists, or it names no worker of its own (none, or one inherited by a retry copy: its
    ``worker_trial`` is another trial's number) and started over :data:`_UNOWNED_GRACE_S` ago.  Two workers
    recovering the same trial at once are safe: only the first FAIL is accepted by the storage,
    and only that worker re-queues the trial.
    """
    storage = study._storage  # noqa: SLF001 - the study's storage decides the mechanism
    now = time.time()
    if isinstance(storage, optuna.storages.JournalStorage):
        dead = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = _own_worker(t)
            if worker is not None:
                gone = not _alive(worker)
            else:
                started = t.datetime_start.timestamp() if t.datetime_start else now
                gone = now - started > _UNOWNED_GRACE_S
            if gone:
                dead.append(t)
    else:
        # A no-op unless the storage was opened with a heartbeat (open_storage(heartbeat_s=...)).
        if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:
            return []
        import warnings

        from optuna.exceptions import ExperimentalWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # stable since Optuna 2.9, still so marked
            optuna.storages.fail_stale_trials(study)
        dead = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started = t.datetime_start.timestamp() if t.datetime_start else now
            if now - started > _UNOWNED_GRACE_S:
                dead.append(t)
        if dead:
            silent = _never_beat(storage, [t._trial_id for t in dead])  # noqa: SLF001
            dead = [t for t in dead if t._trial_id in silent]  # noqa: SLF001
    return _fail_and_requeue(study, dead)


def _own_worker(t: FrozenTrial) -> str | None:
    """The worker that ran trial ``t`` itself (``host:pid:start``), or None if it names none.

    A retry copy starts with its failed original's user attrs (Optuna's retry callback copies
    them), so a ``worker`` written for another trial number is not this trial's."""
    worker = t.user_attrs.get("worker")
    if worker is None or t.user_attrs.get("worker_trial") != t.number:
        return None
    return str(worker)


def _never_beat(storage: Any, trial_ids: list[int]) -> set[int]:
    """The ids among ``trial_ids`` with no heartbeat row in database ``storage``.

    Reads Optuna's ``trial_heartbeats`` table through its own models (private: pinned by
    ``tests/test_scaleout.py::test_a_trial_that_never_beat_is_failed_and_queued_again``)."""
    import sqlalchemy.orm
    from optuna.storages._rdb import models

    rdb = getattr(storage, "_backend", storage)  # the RDBStorage behind Optuna's _CachedStorage
    with sqlalchemy.orm.Session(rdb.engine) as session:
        beat = session.execute(
            sqlalchemy.select(models.TrialHeartbeatModel.trial_id).where(
                models.TrialHeartbeatModel.trial_id.in_(trial_ids)
            )
        ).scalars()
        return set(trial_ids) - set(beat)


def _fail_and_requeue(study: optuna.Study, dead: list[FrozenTrial]) -> list[int]:
    recovered = []
    retry = retry_callback()
    for t in dead:
        worker = t.user_attrs.get("worker")
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another worker failed it first (or it just finished)
            continue
        failed = study.get_trials(deepcopy=False)[t.number]
        if failed.state != TrialState.FAIL:
            continue
        retry(study, failed)
        recovered.append(t.number)
        _logger.warning("trial %d: its worker %s is gone; marked failed and queued again", t.number, worker)
    return recovered


def _as_seen_by_sampler(t: FrozenTrial, first: str = "latency_ms") -> FrozenTrial:
    """A trial stopped early (PRUNED with ``stop_reason``) as a COMPLETE one at its last checkpoint.

    Optuna's TPE ranks pruned trials by their last intermediate value through
    ``study.direction``, which raises for multi-objective studies, so a pruned trial with
    intermediate values would crash it.  What the stopped trial showed is a point in the
    objective space: its predicted cost (the study's first objective, named by ``first``:
    ``latency_ms`` or ``energy_mj``) and its top-1 at the checkpoint where it stopped (a
    dominated point, by the rule that stopped it), and TPE learns from it as from any other.
    """
    cost = t.user_attrs.get(f"{first}_configured")
    if t.state != TrialState.PRUNED or not t.intermediate_values or cost is None:
        return t
    seen = copy.copy(t)
    seen.state = TrialState.COMPLETE
    seen.values = [float(cost), float(t.intermediate_values[max(t.intermediate_values)])]
    return seen


class _Snapshot:
    """A study whose trial reads return one snapshot; every other attribute is the study's.

    Trials stopped early appear as COMPLETE at their last checkpoint (:func:`_as_seen_by_sampler`).
    """

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        trials = study.get_trials(deepcopy=False)
        # The study's first objective, read (one more storage read) only when a trial stopped early.
        stopped = any(t.state == TrialState.PRUNED and t.intermediate_values for t in trials)
        first = (study.user_attrs.get("objectives") or ["latency_ms"])[0] if stopped else "latency_ms"
        self._trials: list[FrozenTrial] = [_as_seen_by_sampler(t, first) for t in trials]

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class SnapshotSampler(optuna.samplers.BaseSampler):
    """Runs a sampler with one read of the shared study per trial instead of one per decision,
    and shows it trials stopped early as points it can rank (:func:`_as_seen_by_sampler`).

    Optuna 5's TPE (``constant_liar=True`` by default, which keeps parallel workers from
    proposing what the others are running) reads every trial of the study, running ones
    included, bypassing Optuna's per-trial cache, for each parameter group: about 17 reads per
    trial on this search space.  On PostgreSQL each read is several queries, ~0.5 s per trial in
    all.  Here the sampler sees a snapshot of the study taken when the trial starts
    (:meth:`before_trial`); what it writes (TPE's shared relative parameters, the trial's
    parameters) still goes to the shared storage.  The snapshot can miss a trial that another
    worker starts or finishes during this trial's sampling (milliseconds), the same staleness
    Optuna accepts for its own per-trial cache.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner
        self._view: _Snapshot | None = None

    def _seen(self, study: optuna.Study) -> Any:
        view = self._view
        return view if view is not None and view._study is study else study

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.inner.infer_relative_search_space(self._seen(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.inner.sample_relative(self._seen(study), trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self.inner.sample_independent(self._seen(study), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._view = _Snapshot(study)
        self.inner.before_trial(self._view, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._view = None
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def shared_sampler(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
    """``sampler`` as it should run on a study: TPE on per-trial snapshots, others as they are.

    Used on every storage (shared or not), so that one seed gives the same trials on each."""
    if isinstance(sampler, optuna.samplers.TPESampler):
        return SnapshotSampler(sampler)
    return sampler


# --------------------------------------------------------------------------------------------
# One worker
# --------------------------------------------------------------------------------------------


def _count(study: optuna.Study) -> tuple[int, int, list[FrozenTrial]]:
    # "Complete" here means finished (dynas.search.stopping.is_finished): COMPLETE, or stopped
    # early; a surplus trial (PRUNED with "stopped") does not count.
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED))
    trials = [t for t in trials if t.state == TrialState.RUNNING or is_finished(t)]
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running, trials


class _Claimed:
    """Wraps the objective: a trial runs only when its slot is within the study's budget.

    It also remembers how its last trial ended here (:meth:`lost_trial`): another worker may
    fail a trial that still runs here, and Optuna then refuses this worker's report of it."""

    def __init__(self, objective: Any, study: optuna.Study, budget: int) -> None:
        self.objective, self.study, self.budget = objective, study, budget
        self.me = worker_id()
        self.trial_id: int | None = None  # storage id of the last trial started here, until it is told
        self.ended_cleanly = False  # its objective returned (or stopped it), or its storage refused an update

    def __call__(self, trial: Trial) -> Any:
        self.trial_id, self.ended_cleanly = trial._trial_id, False  # noqa: SLF001
        try:
            trial.set_user_attr("worker", self.me)
            trial.set_user_attr("worker_trial", trial.number)  # see _own_worker
            complete, _, trials = _count(self.study)
            ahead = sum(t.state == TrialState.RUNNING and t.number < trial.number for t in trials)
            if complete + ahead >= self.budget:
                trial.set_user_attr(
                    "stopped",
                    f"surplus: {complete} complete + {ahead} running trials numbered before it fill trials={self.budget}",
                )
                self.study.stop()
                raise optuna.TrialPruned()
            value = self.objective(trial)
        except (optuna.TrialPruned, optuna.exceptions.UpdateFinishedTrialError):
            self.ended_cleanly = True  # stopped (surplus, early stopping), or an update refused
            raise
        self.ended_cleanly = True
        return value

    def told(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback, run once a trial's end is recorded here: that trial is not lost."""
        if trial._trial_id == self.trial_id:  # noqa: SLF001
            self.trial_id = None

    def lost_trial(self) -> int | None:
        """The number of the last trial if another worker finished it while it ran here (so
        Optuna refused to record how it ended here); None otherwise."""
        if self.trial_id is None or not self.ended_cleanly:
            return None  # recorded here (told), or the objective raised: its own error
        last = self.study._storage.get_trial(self.trial_id)  # noqa: SLF001 - one trial, by id
        return last.number if last.state.is_finished() else None


def worker_loop(
    study: optuna.Study,
    objective: Any,
    budget: int,
    deadline: float | None,
    *,
    poll_s: float = 0.5,
    show_progress: bool = False,
) -> None:
    """Run trials of ``study`` until it holds ``budget`` complete trials (or ``deadline``).

    ``deadline`` is a :func:`time.monotonic` value.  See the module docstring for the rules.
    """
    claimed = _Claimed(objective, study, budget)

    def stop_at_budget(st: optuna.Study, _t: FrozenTrial) -> None:
        if _count(st)[0] >= budget:
            st.stop()

    waiting_logged = False
    while True:
        recover_dead_trials(study)
        complete, running, _ = _count(study)
        if complete >= budget:
            return
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        if complete + running >= budget:
            if not waiting_logged:
                _logger.info(
                    "%d complete + %d running trials fill trials=%d; waiting for the running ones",
                    complete,
                    running,
                    budget,
                )
                waiting_logged = True
            time.sleep(poll_s)
            continue
        waiting_logged = False
        try:
            study.optimize(
                claimed,
                n_trials=budget - complete - running,
                timeout=left,
                callbacks=[claimed.told, stop_at_budget],
                show_progress_bar=show_progress,
                gc_after_trial=False,
            )
        except (ValueError, AssertionError):
            # Another worker took this trial for dead (a heartbeat late by over 2 x heartbeat_s
            # on a stalled machine) and has failed it and queued it again.  Optuna then refuses
            # to record how it ended here: "Cannot tell a FAIL trial" (ValueError) when an
            # update inside the objective was refused first or the objective stopped its trial
            # (TrialPruned), and its own "Should not reach" assertion when the objective
            # returned (Optuna 5).  Anything else, or either of them without a trial finished
            # elsewhere, is an error and stops the worker.
            lost = claimed.lost_trial()
            if lost is None:
                raise
            _logger.warning(
                "trial %d was failed by another worker while it ran here (its heartbeat came too late); "
                "it was queued again, and this worker goes on",
                lost,
            )


def _seed(seed: int, n_existing: int, index: int, attempt: int) -> int:
    # Worker 0 seeds like a one-worker run (dynas.search.samplers.resume_seed); every other
    # (worker, restart) gets its own stream so that workers do not replay each other.
    if index == 0 and attempt == 0:
        return resume_seed(seed, n_existing)
    return int(np.random.SeedSequence([seed, n_existing, index, attempt]).generate_state(1)[0])


def _worker_main(
    plan: Any, flop_tables: Any, index: int, attempt: int, n_existing: int, deadline_s: float | None
) -> None:
    """Entry point of one joblib worker process: open the storage, run the loop.

    ``plan`` is the parent's validated :class:`~dynas.search.options.SearchPlan`, pickled with its
    fitted proxy, and ``flop_tables`` the parent's dense FLOP counts, so that a worker starts in
    well under a second instead of refitting and recounting (which imports torch).
    """
    from dynas.predictors.flops import share_flop_tables

    share_flop_tables(flop_tables)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    o = plan.options
    storage = open_storage(plan.storage_url, heartbeat_s=o.heartbeat_s)
    sampler = shared_sampler(make_sampler(o.sampler, _seed(o.seed, n_existing, index, attempt)))
    study = optuna.load_study(study_name=plan.study_name, storage=storage, sampler=sampler)
    done = finished_trials(study)
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    worker_loop(study, Objective(plan, done), o.trials, deadline, show_progress=False)


# --------------------------------------------------------------------------------------------
# Many workers from one command
# --------------------------------------------------------------------------------------------


def _progress(study: optuna.Study, budget: int, stop: threading.Event, every_s: float = 5.0) -> None:
    last = -1
    while not stop.wait(every_s):
        try:
            complete = _count(study)[0]
        except Exception:  # noqa: BLE001 - progress is best effort; the workers report real errors
            continue
        if complete != last:
            _logger.info("study %s: %d/%d complete trials", study.study_name, complete, budget)
            last = complete


def run_workers(plan: Any, study: optuna.Study, n_existing: int) -> None:
    """Run ``plan.options.workers`` joblib worker processes on ``study`` (already created; this
    process reads it for progress and after a worker died).

    A worker that dies (killed, out of memory) takes its running trial with it; the others go
    on, the dead trial is re-queued, and the workers are restarted up to :data:`MAX_RESTARTS`
    times.  Raises :class:`~dynas.errors.StudyError` (one line) when they keep dying.
    """
    from joblib import Parallel, delayed
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    from dynas.predictors.flops import share_flop_tables

    o = plan.options
    tables = share_flop_tables()  # counted by plan.study_attrs() in this process
    quiet = dataclasses.replace(plan, options=dataclasses.replace(o, show_progress=False))
    deadline = None if o.timeout_s is None else time.monotonic() + o.timeout_s
    stop = threading.Event()
    reporter = None
    if o.show_progress:
        reporter = threading.Thread(target=_progress, args=(study, o.trials, stop), daemon=True)
        reporter.start()
    try:
        for attempt in range(MAX_RESTARTS + 1):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                Parallel(n_jobs=o.workers, backend="loky")(
                    delayed(_worker_main)(quiet, tables, i, attempt, n_existing, left) for i in range(o.workers)
                )
                return
            except TerminatedWorkerError as exc:
                complete = _count(study)[0]
                reason = str(exc).split("\n")[0].split("The exit codes")[0].strip().rstrip(".")
                if attempt == MAX_RESTARTS:
                    raise StudyError(
                        f"workers kept dying ({MAX_RESTARTS + 1} times; last: {reason}); {complete}/{o.trials} "
                        "complete trials are stored; re-run the same command to resume"
                    ) from None
                if complete >= o.trials or (deadline is not None and time.monotonic() >= deadline):
                    return
                _logger.warning(
                    "a worker process died (%s); %d/%d complete trials are stored; restarting %d workers",
                    reason,
                    complete,
                    o.trials,
                    o.workers,
                )
    finally:
        stop.set()
