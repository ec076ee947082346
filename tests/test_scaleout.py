"""Many workers on one study: journal file and PostgreSQL storages, SIGKILL, resume, determinism.

The PostgreSQL cases need a server: ``.ci/run`` starts a throwaway one on loopback and exports
``DYNAS_TEST_POSTGRES_URL`` (and ``DYNAS_REQUIRE_POSTGRES=1``, which turns the skip into a
failure so that CI cannot pass without running them).  Elsewhere they skip with that reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dynas.errors import ConfigError, StudyError
from dynas.predictors.proxy import get_proxy
from dynas.search import parallel
from dynas.search.study import SearchOptions, load_study, open_storage, run_search

ROOT = Path(__file__).resolve().parents[1]
DYNAS = str(Path(sys.executable).with_name("dynas"))


@pytest.fixture(params=["journal", "postgresql"])
def storage(request, tmp_path):
    """A storage URL that several processes can share, and a fresh study name on it."""
    url = (
        f"journal:///{tmp_path / 'study.journal'}"
        if request.param == "journal"
        else request.getfixturevalue("postgres_url")
    )
    return url, f"t-{uuid.uuid4().hex[:10]}"


def _search_argv(url, name, trials, workers, *extra, out=None):
    out = Path(out) if out is not None else Path(os.environ.get("TMPDIR", "/tmp"))
    storage = ["--storage", url] if url is not None else []
    return [
        DYNAS,
        "-q",
        "search",
        "--backbone",
        "resnet18",
        "--target",
        "a100",
        "--trials",
        str(trials),
        "--workers",
        str(workers),
        *storage,
        "--study-name",
        name,
        "--no-progress",
        "--html",
        str(out / f"{name}.html"),
        "--export",
        str(out / f"{name}.json"),
        *extra,
    ]


def _env():
    # tests.slow_proxy must be importable by the command and by its worker processes
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _states(study):
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def _check_complete_study(study, trials):
    """Exactly ``trials`` complete trials, none left running or queued, each trial once."""
    all_trials = study.get_trials(deepcopy=False)
    states = _states(study)
    assert states[TrialState.COMPLETE] == trials, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    assert [t.number for t in all_trials] == list(range(len(all_trials)))
    assert len({t._trial_id for t in all_trials}) == len(all_trials)
    # A retried trial completes at most once: no two complete trials retry the same failure.
    retried = [
        t.system_attrs["failed_trial"]
        for t in all_trials
        if t.state == TrialState.COMPLETE and "failed_trial" in t.system_attrs
    ]
    assert len(retried) == len(set(retried))
    # Every trial that is not complete says why: a surplus claim or a dead worker.
    for t in all_trials:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["stopped"].startswith("surplus") and t.params == {}
        elif t.state == TrialState.FAIL:
            # its worker died: named in the trial, or killed between creating it and claiming
            # its slot (the claim records the worker first), so it holds no config
            assert "worker" in t.user_attrs or t.params == {}


# ----------------------------------------------------------------------------- many workers


def test_four_workers_end_with_exactly_the_requested_trials(storage):
    url, name = storage
    done = subprocess.run(_search_argv(url, name, 40, 4), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr  # deprecation and experimental warnings are handled
    study = load_study(url, name)
    _check_complete_study(study, 40)
    workers = {t.user_attrs["worker"] for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(workers) >= 2  # the trials really were shared between processes
    # re-running the same command adds nothing
    again = subprocess.run(_search_argv(url, name, 40, 4), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(load_study(url, name).trials) == len(study.trials)


def _wait_for(predicate, timeout_s, what):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _running_worker_pid(url, name, parent_pid):
    """(pid, completed trials) for a worker process of ``parent_pid`` running a trial, once at
    least 3 trials are complete; None before.  Both come from one read of the study.

    Only a trial that started at most 0.3 s before the read began counts: the read itself takes
    a while on PostgreSQL, and a trial seen near its end could complete before the kill lands
    (CI saw that once with 1 s trials).
    """
    read_start = time.time()
    try:
        trials = load_study(url, name).get_trials(deepcopy=False)
    except StudyError:
        return None
    complete = {t.number: (t.params, t.values) for t in trials if t.state == TrialState.COMPLETE}
    for t in trials:
        if t.state != TrialState.RUNNING or t.datetime_start is None or t.datetime_start.timestamp() < read_start - 0.3:
            continue
        host, pid, _ = str(t.user_attrs.get("worker", "::")).split(":")
        if pid.isdigit() and int(pid) != parent_pid and _parent_of(int(pid)) == parent_pid and len(complete) >= 3:
            return int(pid), complete
    return None


def _parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _snapshot(url, name):
    return {t.number: (t.params, t.values) for t in load_study(url, name).trials if t.state == TrialState.COMPLETE}


def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_retried(storage):
    url, name = storage
    # 1 s trials: the worker is killed within microseconds of being seen mid-trial
    argv = _search_argv(url, name, 12, 2, "--proxy", "tests.slow_proxy:sleep_1s", "--heartbeat-s", "1")
    proc = subprocess.Popen(argv, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        pid, before = _wait_for(lambda: _running_worker_pid(url, name, proc.pid), 120, "a running trial of a worker")
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "worker process died" in err
    study = load_study(url, name)
    _check_complete_study(study, 12)
    after = _snapshot(url, name)
    assert all(after[n] == v for n, v in before.items())  # every completed trial intact
    killed = [
        t for t in study.trials if t.state == TrialState.FAIL and t.user_attrs["worker"].split(":")[1] == str(pid)
    ]
    assert killed  # the trial it was running
    for t in killed:  # ran again, with every parameter it had drawn before the kill
        retries = [r for r in study.trials if r.system_attrs.get("failed_trial") == t.number]
        assert retries and retries[0].params.items() >= t.params.items()


def test_resume_after_the_whole_search_was_killed(storage):
    url, name = storage
    argv = _search_argv(url, name, 20, 2, "--proxy", "tests.slow_proxy:sleep_200ms", "--heartbeat-s", "1")
    proc = subprocess.Popen(argv, env=_env(), stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: _running_worker_pid(url, name, proc.pid), 120, "a running trial of a worker")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and all its workers, mid-trial
        proc.wait()
    before = _snapshot(url, name)
    running = [t.number for t in load_study(url, name).trials if t.state == TrialState.RUNNING]
    assert running and len(before) < 20
    resumed = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    study = load_study(url, name)
    _check_complete_study(study, 20)
    after = _snapshot(url, name)
    assert all(after[n] == v for n, v in before.items())
    for n in running:  # each trial left running by the kill was failed, then run again
        assert study.trials[n].state == TrialState.FAIL
        assert any(t.system_attrs.get("failed_trial") == n for t in study.trials)


# ----------------------------------------------------------------------------- the pieces


def test_a_claim_beyond_the_budget_is_pruned_before_it_suggests(tmp_path):
    url = f"journal:///{tmp_path / 's.journal'}"
    study = optuna.create_study(storage=open_storage(url), directions=["minimize", "maximize"])
    for _ in range(2):
        study.tell(study.ask(), [1.0, 1.0])
    held = study.ask()  # a running trial numbered before the next one
    calls = []

    def objective(trial):
        calls.append(trial.number)
        return trial.suggest_float("x", 0, 1), 1.0

    claimed = parallel._Claimed(objective, study, budget=3)
    study.optimize(claimed, n_trials=1)
    last = study.trials[-1]
    assert calls == [] and last.state == TrialState.PRUNED and last.params == {}
    assert "2 complete + 1 running" in last.user_attrs["stopped"]
    study.tell(held, state=TrialState.FAIL)  # the slot is free again
    study.optimize(claimed, n_trials=1)
    assert calls == [last.number + 1]
    assert study.trials[-1].state == TrialState.COMPLETE


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
@pytest.mark.parametrize("then", ["returns", "writes", "stops"])
def test_a_worker_whose_trial_was_failed_by_another_goes_on(tmp_path, caplog, then, kind):
    # Another worker may fail a trial that is still running here (a heartbeat that came late on
    # a stalled machine): Optuna then refuses this worker's tell with a ValueError.  The trial
    # is already queued again by whoever failed it, so this worker logs it and goes on.
    url = f"journal:///{tmp_path / 's.journal'}" if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="x", directions=["minimize", "maximize"])
    other = optuna.load_study(study_name="x", storage=open_storage(url))  # "another worker"
    calls = []

    def objective(trial):
        calls.append(trial.number)
        x = trial.suggest_float("x", 0, 1)
        if len(calls) == 1:
            other.tell(trial.number, state=TrialState.FAIL)
            if then == "writes":  # the objective's next write is refused (what CI once saw)
                trial.set_user_attr("proxy", "x")
            if then == "stops":  # early stopping ends its trial as pruned
                raise optuna.TrialPruned("stopped early")
        return x, 1.0

    parallel.worker_loop(study, objective, 3, None, poll_s=0.01)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 3
    assert "trial 0 was failed by another worker while it ran here" in caplog.text

    # the objective's own ValueError still stops the worker
    def broken(trial):
        raise ValueError("bad objective")

    with pytest.raises(ValueError, match="bad objective"):
        parallel.worker_loop(optuna.create_study(directions=["minimize", "maximize"]), broken, 3, None)

    # ... and so does one raised between trials, after the last trial was recorded here
    class Refuses(optuna.samplers.RandomSampler):
        def before_trial(self, study, trial):
            if trial.number == 1:
                raise ValueError("sampler refuses")

    def fine(trial):
        return trial.suggest_float("x", 0, 1), 1.0

    with pytest.raises(ValueError, match="sampler refuses"):
        # (swallowed, it would leave trial 1 running and the worker waiting for it: the deadline)
        parallel.worker_loop(
            optuna.create_study(directions=["minimize", "maximize"], sampler=Refuses()),
            fine,
            3,
            time.monotonic() + 20,
            poll_s=0.05,
        )


def test_dead_journal_worker_trial_is_failed_and_queued_again(tmp_path):
    url = f"journal:///{tmp_path / 's.journal'}"
    code = (
        "import os, optuna; from dynas.search.study import open_storage; from dynas.search.parallel import worker_id\n"
        f"s = optuna.create_study(storage=open_storage({url!r}), study_name='x', directions=['minimize'])\n"
        "t = s.ask(); t.suggest_int('k', 0, 9); t.set_user_attr('worker', worker_id())\n"
        "t.set_user_attr('worker_trial', t.number); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    study = optuna.load_study(study_name="x", storage=open_storage(url))
    (dead,) = study.get_trials(states=(TrialState.RUNNING,))
    assert parallel.recover_dead_trials(study) == [dead.number]
    assert study.trials[dead.number].state == TrialState.FAIL
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.params == dead.params and queued.system_attrs["failed_trial"] == dead.number
    assert parallel.recover_dead_trials(study) == []  # nothing twice
    # The copy carries the dead worker's attr (Optuna copies user attrs).  Popped by a new
    # worker, it is RUNNING under that attr until the worker writes its own: not dead (CI once
    # failed it there, and the worker then crashed telling its trial).
    mine = study.ask()
    assert mine.number == queued.number and study.trials[mine.number].user_attrs["worker"] == dead.user_attrs["worker"]
    assert parallel.recover_dead_trials(study) == []
    # a live worker's trial is left alone
    mine.set_user_attr("worker", parallel.worker_id())
    mine.set_user_attr("worker_trial", mine.number)
    assert parallel.recover_dead_trials(study) == []


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_trial_that_never_beat_is_failed_and_queued_again(backend, tmp_path, monkeypatch, request):
    # A worker killed between study.ask() and its heartbeat thread's first beat leaves a RUNNING
    # trial without a heartbeat row; Optuna's stale-trial check skips it, and a resumed search
    # waited for it forever (CI, the whole-search kill test on PostgreSQL).
    url = f"sqlite:///{tmp_path / 's.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    study = optuna.create_study(
        storage=open_storage(url, heartbeat_s=60), study_name=f"t-{uuid.uuid4().hex[:10]}", directions=["minimize"]
    )
    silent = study.ask()
    silent.suggest_int("k", 0, 9)
    beating = study.ask()
    study._storage.record_heartbeat(beating._trial_id)
    assert parallel.recover_dead_trials(study) == []  # younger than the grace: may still beat
    monkeypatch.setattr(parallel, "_UNOWNED_GRACE_S", 0.0)
    assert parallel.recover_dead_trials(study) == [silent.number]
    assert study.trials[silent.number].state == TrialState.FAIL
    assert study.trials[beating.number].state == TrialState.RUNNING  # its heartbeat is fresh
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.params == {"k": silent.params["k"]} and queued.system_attrs["failed_trial"] == silent.number
    assert parallel.recover_dead_trials(study) == []  # nothing twice


def test_worker_identity_tells_a_reused_pid(tmp_path):
    me = parallel.worker_id()
    assert parallel._alive(me)
    host, pid, ticks = me.split(":")
    assert not parallel._alive(f"{host}:{pid}:{int(ticks) + 1}")  # same pid, other start time
    assert parallel._alive(f"another-host-{host}:{pid}:{ticks}")  # cannot tell: assumed alive


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", ["memory", "sqlite", "journal"])
def test_one_worker_with_a_seed_repeats_trials_and_front(tmp_path, kind):
    def run(tag):
        storage = {
            "memory": optuna.storages.InMemoryStorage(),
            "sqlite": f"sqlite:///{tmp_path / (tag + '.db')}",
            "journal": f"journal:///{tmp_path / (tag + '.journal')}",
        }[kind]
        return run_search(
            SearchOptions(backbone="resnet18", target="a100", trials=30, seed=7, storage=storage, show_progress=False)
        )

    a, b = run("a"), run("b")
    assert [(t.params, t.values) for t in a.trials] == [(t.params, t.values) for t in b.trials]
    assert [t.number for t in a.best_trials] == [t.number for t in b.best_trials]


def test_storage_kinds_give_the_same_trials(tmp_path):
    runs = [
        run_search(
            SearchOptions(backbone="resnet18", target="a100", trials=20, seed=2, storage=url, show_progress=False)
        )
        for url in (f"sqlite:///{tmp_path / 'a.db'}", f"journal:///{tmp_path / 'a.journal'}")
    ]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]


# ----------------------------------------------------------------------------- options and errors


def test_many_workers_default_to_a_journal_file_and_warn_about_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = subprocess.run(_search_argv(None, "j", 6, 2, out=tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dynas.journal").is_file() and not (tmp_path / "dynas.db").exists()
    assert len(load_study("journal:///dynas.journal", "j").get_trials(states=(TrialState.COMPLETE,))) == 6
    warned = subprocess.run(
        _search_argv(f"sqlite:///{tmp_path / 'w.db'}", "w", 4, 2, out=tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "may fail with 'database is locked'" in warned.stderr


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(workers=0), "workers=0"),
        (dict(workers=2.5), "workers=2.5"),
        (dict(heartbeat_s=0), "heartbeat_s=0"),
        (dict(heartbeat_s=float("nan")), "heartbeat_s=nan"),
        (dict(workers=2, storage=optuna.storages.InMemoryStorage()), "needs a storage URL"),
    ],
)
def test_bad_scale_out_options(tmp_path, kw, word):
    from dynas.search.study import plan_search

    with pytest.raises((ConfigError, StudyError)) as info:
        plan_search(SearchOptions(backbone="resnet18", **kw))
    assert word in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url, word",
    [
        ("journal://", "names no file"),
        ("postgresql://nobody@127.0.0.1:1/none", "cannot be opened"),
    ],
)
def test_bad_storage_urls_are_one_line(tmp_path, url, word):
    with pytest.raises(StudyError) as info:
        open_storage(url)
    assert word in str(info.value) and "\n" not in str(info.value)


def test_journal_directory_and_missing_file(tmp_path):
    with pytest.raises(StudyError, match="is a directory"):
        open_storage(f"journal:///{tmp_path}")
    with pytest.raises(StudyError, match="does not exist"):
        load_study(f"journal:///{tmp_path / 'none.journal'}", None)
    assert list(tmp_path.iterdir()) == []


def test_proxy_entry_points():
    proxy = get_proxy("tests.slow_proxy:sleep_50ms")
    assert proxy.delay_s == 0.05 and proxy.static_top1("resnet50") > 70
    for spec, word in [
        ("no.such.module:f", "cannot be loaded"),
        ("tests.slow_proxy:nothing", "cannot be loaded"),
        ("tests.slow_proxy:__doc__", "gave a str"),
        ("", "not a proxy name"),
    ]:
        with pytest.raises(ConfigError) as info:
            get_proxy(spec)
        assert word in str(info.value) and "\n" not in str(info.value)
