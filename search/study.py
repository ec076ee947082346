"""Multi-objective search of dynamic configurations with Optuna.

One search is one Optuna study with two objectives, in this order:

1. ``latency_ms`` (minimize): the predicted latency of one forward pass of the whole batch on
   the hardware target (:func:`dynas.predictors.latency.predict`);
2. ``top1`` (maximize): the accuracy proxy's predicted ImageNet top-1 in percent.

Lifecycle (the same command both starts and resumes a search)::

    options = SearchOptions(backbone="resnet50", target="a100", trials=200)
    plan = plan_search(options)   # validates everything; touches no file
    study = run_search(plan)      # opens/creates the study, runs the missing trials

* :func:`plan_search` resolves the target, batch size, search space, proxy, storage URL and
  study name and raises a one-line :class:`~dynas.errors.DynasError` for any bad option,
  before anything is written.
* :func:`run_search` creates the study (storing what it was run with as study user attrs) or
  loads it when it exists.  A loaded study must have been created with the same backbone,
  input size, target, batch size, proxy, search space and constraints, otherwise
  :class:`~dynas.errors.StudyError` names the field that differs.  ``trials`` is the total
  number of *finished* trials the study should hold (complete, or stopped early by
  :mod:`dynas.search.stopping`): only the missing ones are run, so an interrupted search is
  resumed by re-running the same command.
* Every trial stores its config, its prediction (minus the repeated config) and a few scalars
  as trial user attrs; constraints (``max_latency_ms``, ``max_latency_ratio``) are stored with
  :meth:`optuna.trial.Trial.set_constraint`, so the samplers steer away from infeasible
  configs and ``study.best_trials`` holds feasible trials only.

Samplers are looked up by name in :data:`SAMPLERS` (register more with
:func:`register_sampler`); each factory takes the seed.  What they do with this conditional space:

* ``tpe`` (default): multivariate TPE with ``group=True``, which models each set of parameters
  that occur together (e.g. a stage's rate and granularity when it picks ``spatial``) jointly.
* ``nsga2``: Optuna's NSGA-II; crossover acts on the parameters common to both parents.
* ``gp``: Optuna's GPSampler.  It models only the parameters present in *every* trial (the
  per-stage paradigms, unless a restriction leaves a single one); rates and granularities of
  conditional branches are drawn by its random fallback, so on this space it is mostly a
  paradigm optimiser.  It needs SciPy, which dynas does not require; asking for it without
  SciPy raises :class:`~dynas.errors.ConfigError`.  Slow beyond a few hundred trials.
* ``random``: uniform random sampling, the baseline.

A repeated parameter set (samplers do propose them on this discrete space) reuses the first
trial's values and attrs (``duplicate_of`` names that trial) instead of predicting again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, Trial, TrialState

import dynas
from dynas.errors import ConfigError, StudyError
from dynas.predictors.latency import predict
from dynas.predictors.proxy import AccuracyProxy, Reporter, StopTrial, get_proxy
from dynas.predictors.targets import HardwareTarget, load_target
from dynas.spaces.backbones import parse_input_size
from dynas.spaces.config import PARADIGMS, ArchConfig
from dynas.spaces.searchspace import SearchSpace
from dynas.search import parallel
from dynas.search.stopping import EarlyStopper, Peer, StopRule, is_finished, make_stopper

__all__ = [
    "DEFAULT_STORAGE",
    "DEFAULT_JOURNAL",
    "DIRECTIONS",
    "OBJECTIVE_NAMES",
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

#: storage used when none is given: an SQLite file in the current directory
DEFAULT_STORAGE = "sqlite:///dynas.db"
#: storage used when none is given and ``workers > 1``: a journal file in the current directory
DEFAULT_JOURNAL = "journal:///dynas.journal"
#: study directions, in the order of the objective values
DIRECTIONS = ("minimize", "maximize")
#: names of the objective values (``trial.values[i]``)
OBJECTIVE_NAMES = ("latency_ms", "top1")

#: study user attrs that must match when a study is resumed, in the order they are checked
_CHECKED_ATTRS = (
    "backbone",
    "input_size",
    "target",
    "batch_size",
    "proxy",
    "proxy_options",
    "target_spec",
    "search_space",
    "max_latency_ms",
    "max_latency_ratio",
)

#: target fields that are descriptive only (not compared on resume)
_TARGET_TEXT = ("description", "sources")


# --------------------------------------------------------------------------------------------
# Sampler registry
# --------------------------------------------------------------------------------------------

#: name -> factory taking the seed and returning a fresh sampler
SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {}


def register_sampler(name: str) -> Callable[[Callable[[int], optuna.samplers.BaseSampler]], Callable[[int], optuna.samplers.BaseSampler]]:
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
    if name not in SAMPLERS:
        raise ConfigError(f"sampler={name!r} is unknown; allowed: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](seed)


# --------------------------------------------------------------------------------------------
# Options and plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOptions:
    """Everything ``dynas search`` can be told.  Defaults are the embedded default search."""

    backbone: str = "resnet101"
    target: str = "v100"  # built-in name or path to a target TOML file
    input_size: Any = 224  # int or (H, W)
    batch_size: int | None = None  # None: the target's default batch size
    proxy: str = "prior"
    proxy_options: Mapping[str, Any] | None = None  # keyword options of the proxy (finetune: data, steps, ...)
    early_stop: str = "dominance"  # stopper of dynas.search.stopping.STOPPERS; acts only on proxies with checkpoints
    stop_margin: float = 2.0  # top-1 points (dominance)
    stop_min_trials: int = 2  # dominance: dominating trials needed; halving: trials at the checkpoint needed
    stop_eta: int = 3  # halving: the best 1/eta go on
    trials: int = 500  # total finished trials (complete, or stopped early) the study should hold
    timeout_s: float | None = None  # stop this run after this many seconds
    sampler: str = "tpe"
    seed: int = 0
    storage: Any = None  # storage URL (or an optuna storage); None: DEFAULT_STORAGE, or DEFAULT_JOURNAL if workers > 1
    workers: int = 1  # worker processes on this machine (joblib); trials is still the study's total
    heartbeat_s: float = 10.0  # workers beat this often; a trial silent for 2x this is failed and retried
    study_name: str | None = None  # None: "{backbone}-{target}-b{batch}-{H}x{W}-{proxy}"
    max_latency_ms: float | None = None  # constraint on the predicted latency of one batch
    max_latency_ratio: float | None = None  # constraint on dynamic / static latency
    # search-space options (see dynas.spaces.searchspace.SearchSpace)
    paradigms: tuple[str, ...] = PARADIGMS
    spatial_granularities: tuple[int, ...] | None = None
    channel_granularities: tuple[int, ...] | None = None
    rate_min: float = 0.1
    rate_max: float = 1.0
    rate_step: float = 0.05
    show_progress: bool = True

    def __post_init__(self) -> None:
        # Scalar checks only; the backbone, target, proxy and space are checked by plan_search.
        _check_int("trials", self.trials, minimum=1)
        _check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)
        _check_int("workers", self.workers, minimum=1, maximum=256)
        _check_positive("heartbeat_s", self.heartbeat_s)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, minimum=1)
        for name in ("timeout_s", "max_latency_ms", "max_latency_ratio"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value)
        if self.proxy_options is not None and not isinstance(self.proxy_options, Mapping):
            raise ConfigError(f"proxy_options={self.proxy_options!r} is not a mapping; allowed: a dict of keyword options")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r} is unknown; allowed: {', '.join(sorted(SAMPLERS))}")
        if self.study_name is not None and (not isinstance(self.study_name, str) or not self.study_name.strip()):
            raise StudyError(f"study_name={self.study_name!r} is empty; allowed: a non-empty string")
        # Normalise sequences given as lists so that options compare and hash by value.
        for name in ("paradigms", "spatial_granularities", "channel_granularities"):
            given = value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(","))
            if value is not None and (not isinstance(value, tuple) or value is not given):
                object.__setattr__(self, name, tuple(value))


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name}={value!r} is not an integer; allowed: an integer >= {minimum}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name}={value!r} is out of range; allowed: an integer >= {minimum}{upper}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is not a positive number; allowed: a finite number > 0")


@dataclass(frozen=True)
class SearchPlan:
    """A validated search: what :func:`run_search` will do, resolved from :class:`SearchOptions`."""

    options: SearchOptions
    target: HardwareTarget
    target_label: str  # the target's name in the study name (a target file's stem)
    batch_size: int
    input_size: tuple[int, int]
    space: SearchSpace
    proxy: AccuracyProxy = field(compare=False)
    storage_url: Any  # str URL, or an optuna storage passed through the Python API
    study_name: str
    stop_rule: StopRule = StopRule()

    def study_attrs(self) -> dict[str, Any]:
        """Study user attrs stored at creation (JSON-ready); also the reference for resuming."""
        o = self.options
        static = ArchConfig.static(o.backbone, self.input_size)
        static_pred = predict(static, self.target, self.batch_size)
        path = getattr(self.target, "path", None)
        return _json_ready(
            {
                "dynas_version": dynas.__version__,
                "objectives": list(OBJECTIVE_NAMES),
                "backbone": o.backbone,
                "input_size": list(self.input_size),
                "target": self.target_label,
                "target_path": str(Path(path).resolve()) if path is not None else None,
                "target_spec": _target_dict(self.target),
                "batch_size": self.batch_size,
                "proxy": o.proxy,
                "proxy_options": self.proxy.options(),
                "early_stop": self.stop_rule.to_dict(),
                "search_space": self.space.to_dict(),
                "max_latency_ms": o.max_latency_ms,
                "max_latency_ratio": o.max_latency_ratio,
                "static_latency_ms": static_pred.latency_ms,
                "static_latency_ms_per_image": static_pred.latency_ms_per_image,
                "static_top1": float(self.proxy.static_score(static)),
                "reference_top1": float(self.proxy.reference_top1(static)),
                "sampler": o.sampler,
                "seed": o.seed,
            }
        )


def _json_ready(obj: Any) -> Any:
    # Study attrs are stored as JSON: normalise tuples to lists, paths to strings, numpy scalars
    # to Python numbers, so that a stored value compares equal to a freshly computed one.
    def default(x: Any) -> Any:
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        return str(x)

    return json.loads(json.dumps(obj, default=default))


def _target_dict(target: Any) -> dict[str, Any]:
    if hasattr(target, "to_dict"):
        d = dict(target.to_dict())
    elif dataclasses.is_dataclass(target):
        d = dataclasses.asdict(target)
    else:
        d = dict(vars(target))
    # Where the file lives is not part of what the target is (stored as target_path instead).
    d.pop("path", None)
    return d


def plan_search(options: SearchOptions) -> SearchPlan:
    """Validate ``options`` and resolve every default; writes nothing.

    Raises :class:`~dynas.errors.DynasError` (one line) for any bad option.
    """
    o = options
    hw = parse_input_size(o.input_size)
    space = SearchSpace(
        o.backbone,
        input_size=hw,
        paradigms=tuple(o.paradigms),
        spatial_granularities=o.spatial_granularities,
        channel_granularities=o.channel_granularities,
        rate_min=o.rate_min,
        rate_max=o.rate_max,
        rate_step=o.rate_step,
    )
    target = o.target if not isinstance(o.target, (str, os.PathLike)) else load_target(o.target)
    path = getattr(target, "path", None)
    label = Path(path).stem if path is not None else target.name
    batch = o.batch_size if o.batch_size is not None else int(target.default_batch_size)
    proxy = get_proxy(o.proxy, **dict(o.proxy_options or {}))
    rule = StopRule(o.early_stop, o.stop_margin, o.stop_min_trials, o.stop_eta)
    make_sampler(o.sampler, o.seed)  # raises ConfigError when it cannot be built (gp without SciPy)
    storage = o.storage if o.storage is not None else (DEFAULT_STORAGE if o.workers == 1 else DEFAULT_JOURNAL)
    if isinstance(storage, str):
        _parse_storage_url(storage)
    elif not isinstance(storage, optuna.storages.BaseStorage):
        raise StudyError(f"storage={storage!r} is not a database URL; allowed: e.g. {DEFAULT_STORAGE}")
    elif o.workers > 1:
        raise StudyError(
            f"workers={o.workers} needs a storage URL that other processes can open; allowed: "
            f"{DEFAULT_JOURNAL}, postgresql://..., or workers=1 with a storage object"
        )
    name = o.study_name or f"{o.backbone}-{label}-b{batch}-{hw[0]}x{hw[1]}-{o.proxy}"
    return SearchPlan(o, target, label, batch, hw, space, proxy, storage, name, rule)


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # sqlalchemy wraps the DB-API error
    text = str(orig if orig is not None else exc) or type(exc).__name__
    return " ".join(text.split("\n")[0].split())


def _parse_storage_url(url: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not url.strip():
        raise StudyError(f"storage={url!r} is empty; allowed: a database URL such as {DEFAULT_STORAGE}")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StudyError(
            f"storage={url!r} is not a database URL; allowed: e.g. {DEFAULT_STORAGE}, postgresql://user@host/db"
        ) from None
    return parsed


def _storage_kind(storage: optuna.storages.BaseStorage) -> str:
    """``"memory"``, ``"journal"`` or the database backend of an open storage (``"sqlite"``, ``"postgresql"``, ...)."""
    if isinstance(storage, optuna.storages.InMemoryStorage):
        return "memory"
    if isinstance(storage, optuna.storages.JournalStorage):
        return "journal"
    url = getattr(storage, "url", None)
    return _parse_storage_url(url).get_backend_name() if isinstance(url, str) else type(storage).__name__


def open_storage(storage: Any = None, *, create: bool = True,
                 heartbeat_s: float | None = None) -> optuna.storages.BaseStorage:
    """Open the Optuna storage at URL ``storage`` (None: :data:`DEFAULT_STORAGE`).

    URLs are SQLAlchemy database URLs (``sqlite:///dynas.db``, ``postgresql://user@host/db``)
    or ``journal:///FILE``: Optuna's journal file storage, for many worker processes on one
    machine (relative path after three slashes, absolute after four, as for SQLite).

    With ``create=False`` a database or journal file that does not exist is an error instead of
    being created.  ``heartbeat_s`` turns on Optuna's heartbeat for database storages: a running
    trial whose worker stops beating for ``2 * heartbeat_s`` is marked failed and retried (up to
    :data:`dynas.search.parallel.MAX_RETRY` times) by the next worker that looks.  Any problem (malformed URL, missing
    driver, unreachable or corrupt database) raises :class:`~dynas.errors.StudyError` with a
    one-line message.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    url = DEFAULT_STORAGE if storage is None else storage
    if not isinstance(url, str):
        raise StudyError(f"storage={url!r} is not a database URL; allowed: e.g. {DEFAULT_STORAGE}")
    parsed = _parse_storage_url(url)
    try:
        backend = parsed.get_backend_name()
    except Exception:  # noqa: BLE001 - sqlalchemy raises various errors for odd URLs
        backend = ""
    if backend in ("sqlite", "journal") and parsed.database not in (None, "", ":memory:"):
        db = Path(parsed.database)
        what = "database" if backend == "sqlite" else "journal"
        if not create and not db.is_file():
            raise StudyError(f"storage={url!r}: {what} file {db} does not exist")
        if create and not db.parent.is_dir():
            raise StudyError(f"storage={url!r}: directory {db.parent} does not exist")
    if backend == "journal":
        return _open_journal(url, parsed.database)
    if backend != "sqlite":
        # Database servers: one storage (one connection pool) per URL and heartbeat per process.
        # A storage per call would leave a pool of open connections behind every load_study().
        key = (url, heartbeat_s)
        if key not in _SERVER_STORAGES:
            _SERVER_STORAGES[key] = _open_rdb(url, parsed, backend, heartbeat_s)
        return _SERVER_STORAGES[key]
    return _open_rdb(url, parsed, backend, heartbeat_s)


#: (URL, heartbeat_s) -> open storage of a database server, reused within a process
_SERVER_STORAGES: dict[tuple[str, float | None], optuna.storages.BaseStorage] = {}


def _open_rdb(url: str, parsed: Any, backend: str, heartbeat_s: float | None) -> optuna.storages.BaseStorage:
    kw: dict[str, Any] = {}
    if heartbeat_s is not None:
        from dynas.search.parallel import retry_callback

        # Optuna 4.9 renamed the callback argument (the old name is deprecated, removed in 6.0).
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
        kw = {"heartbeat_interval": max(1, round(heartbeat_s)), "grace_period": max(2, round(2 * heartbeat_s)),
              callback: retry_callback()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kw)
    except ImportError:
        # Optuna turns the driver's ModuleNotFoundError into a generic ImportError.
        driver = parsed.get_driver_name() if backend else "?"
        extra = ("; pip install 'dynas[postgres]' installs psycopg 3, for postgresql:// and postgresql+psycopg:// URLs"
                 if backend == "postgresql" else "")
        raise StudyError(f"storage={url!r} needs the database driver {driver!r}, which is not installed{extra}") from None
    except Exception as exc:  # noqa: BLE001 - driver, network and schema errors all end here
        raise StudyError(f"storage={url!r} cannot be opened: {_one_line(exc)}") from None


class _FlockLock:
    """Journal-file lock on ``fcntl.flock``: blocking, no polling, released by the kernel when
    its holder dies (Optuna's file locks poll with back-off up to 1 s, and a lock left by a
    killed worker blocks every other one for its 30 s grace period)."""

    def __init__(self, path: str) -> None:
        self._path = path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder releases it or dies
        self._fd = fd
        return True

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _journal_lock(path: str) -> Any:
    # JournalFileBackend only calls acquire() and release() on its lock object.
    try:
        import fcntl  # noqa: F401 - POSIX only
    except ImportError:  # Windows: Optuna's own lock
        from optuna.storages.journal import JournalFileOpenLock

        return JournalFileOpenLock(path)
    return _FlockLock(path)


def _open_journal(url: str, path: str | None) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    if not path:
        raise StudyError(f"storage={url!r} names no file; allowed: journal:///FILE, e.g. journal:///dynas.journal")
    if Path(path).is_dir():
        raise StudyError(f"storage={url!r}: {path} is a directory; allowed: journal:///FILE")
    try:
        storage = optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=_journal_lock(path)))
        storage.get_all_studies()  # reads the whole log: a corrupt file fails here, not mid-search
        return storage
    except Exception as exc:  # noqa: BLE001 - I/O and log-format errors
        raise StudyError(f"storage={url!r} cannot be opened: {_one_line(exc)}") from None


def list_studies(storage: Any = None) -> list[str]:
    """Names of the studies in ``storage`` (which must exist)."""
    st = open_storage(storage, create=False)
    return sorted(optuna.study.get_all_study_names(storage=st))


def load_study(storage: Any, study_name: str | None) -> optuna.Study:
    """Load ``study_name`` from ``storage``.

    ``study_name=None`` picks the only study of the storage.  A missing study raises
    :class:`~dynas.errors.StudyError` listing the available names.
    """
    st = open_storage(storage, create=False)
    names = sorted(optuna.study.get_all_study_names(storage=st))
    where = storage if isinstance(storage, str) else (DEFAULT_STORAGE if storage is None else type(storage).__name__)
    if study_name is None:
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise StudyError(f"study_name is required: storage {where} holds {len(names)} studies; available: {listed}")
        study_name = names[0]
    if study_name not in names:
        listed = ", ".join(names) if names else "none"
        raise StudyError(f"study_name={study_name!r} is not in storage {where}; available: {listed}")
    return optuna.load_study(study_name=study_name, storage=st)


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


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
        if key == "target_spec" and isinstance(have, dict) and isinstance(want, dict):
            # Provenance text may change without changing a prediction.
            have = {k: v for k, v in have.items() if k not in _TARGET_TEXT}
            want = {k: v for k, v in want.items() if k not in _TARGET_TEXT}
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


def _resume_seed(seed: int, n_existing: int) -> int:
    # A fresh study uses the seed as given (same seed -> same trials).  A resumed run gets a
    # seed derived from (seed, trials so far), so that it does not replay the random draws of
    # the first run (a seeded random sampler would otherwise propose the same configs again).
    if n_existing == 0:
        return seed
    return int(np.random.SeedSequence([seed, n_existing]).generate_state(1)[0])


def _params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count towards ``trials``: COMPLETE ones and those stopped early
    (PRUNED with user attr ``stop_reason``; a trial pruned for another reason does not count)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)) if is_finished(t)]


def _peers(study: optuna.Study, step: int, number: int) -> list[Peer]:
    peers = []
    for t in finished_trials(study):
        if t.number == number or step not in t.intermediate_values or "duplicate_of" in t.user_attrs:
            continue
        complete = t.state == TrialState.COMPLETE
        latency = t.values[0] if complete else t.user_attrs.get("latency_ms_configured")
        if latency is not None:
            peers.append(Peer(t.number, float(latency), float(t.intermediate_values[step]), complete))
    return peers


class _TrialReporter(Reporter):
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
        reason = self.stopper.should_stop(int(step), float(top1), self.latency_ms, _peers(trial.study, int(step), trial.number))
        if reason is not None:
            raise StopTrial(int(step), reason)


class _Objective:
    """Scores one trial: suggest a config, predict its latency, ask the proxy.

    A proxy that trains reports checkpoints through :class:`_TrialReporter`; a trial stopped
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
            attrs = _json_ready(
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
                result = plan.proxy.evaluate(cfg, _TrialReporter(trial, float(pred.latency_ms), self.stopper))
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
            extra = _json_ready(extra)
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


def _optimize_buffered(study: optuna.Study, sampler: optuna.samplers.BaseSampler, plan: SearchPlan,
                       done: Sequence[FrozenTrial], missing: int) -> None:
    """Run trials against an in-memory copy and write each completed one to ``study`` at once.

    Optuna's database storages commit every suggested parameter and attribute on its own (about
    4 ms each on SQLite, ~65 ms per dynas trial); the analytical objective takes well under 1 ms.
    One process owns an SQLite study here, so trials run on an in-memory study seeded with the
    stored complete trials, and each completed trial is added to the database with one
    ``Study.add_trials`` (one commit, ~20 ms).  Nothing is RUNNING in the database, so a crash,
    even SIGKILL, loses no completed trial; re-running the same command resumes.
    """
    o = plan.options
    mem = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=sampler,
                              directions=list(DIRECTIONS), study_name=study.study_name)
    mem.add_trials(done)

    def write_through(_study: optuna.Study, trial: FrozenTrial) -> None:
        if is_finished(trial):
            study.add_trials([trial])

    mem.optimize(
        _Objective(plan, done),
        n_trials=missing,
        timeout=o.timeout_s,
        callbacks=[write_through, optuna.study.MaxTrialsCallback(o.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))],
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
    sampler = parallel.shared_sampler(make_sampler(o.sampler, _resume_seed(o.seed, n_existing)))
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
            study.set_metric_names(list(OBJECTIVE_NAMES))

    done = finished_trials(study)
    missing = o.trials - len(done)
    if missing <= 0:
        _logger.info("study %s: %d/%d complete trials already; nothing to run", plan.study_name, len(done), o.trials)
        return study
    _logger.info(
        "study %s (%s): %d/%d complete trials, running %d more with sampler %s",
        plan.study_name, where, len(done), o.trials, missing, o.sampler,
    )
    kind = _storage_kind(storage)
    if kind == "memory":
        study.optimize(
            _Objective(plan, done),
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
            study.optimize(_Objective(plan, done), n_trials=min(waiting, missing), timeout=o.timeout_s,
                           show_progress_bar=False)
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
                "or postgresql://... on several", o.workers, where, DEFAULT_JOURNAL,
            )
        if o.workers == 1:
            shared = optuna.load_study(study_name=plan.study_name, sampler=sampler,
                                       storage=storage)
            deadline = None if o.timeout_s is None else time.monotonic() + o.timeout_s
            parallel.worker_loop(shared, _Objective(plan, done), o.trials, deadline, show_progress=o.show_progress)
        else:
            parallel.run_workers(plan, study, n_existing)
    n_done = len(finished_trials(study))
    _logger.info("study %s: %d/%d finished trials, %d on the Pareto front", plan.study_name, n_done, o.trials, len(study.best_trials))
    return study
