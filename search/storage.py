"""Where studies live: Optuna storages opened from a URL, with one-line errors.

URLs are SQLAlchemy database URLs (``sqlite:///dynas.db``, ``postgresql://user@host/db``) or
``journal:///FILE`` (Optuna's journal file, for many worker processes on one machine).
:func:`open_storage` opens one (with Optuna's heartbeat and retry of dead workers' trials for
database servers), :func:`list_studies` and :func:`load_study` read what a storage holds.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from dynas.errors import StudyError

__all__ = [
    "DEFAULT_STORAGE",
    "DEFAULT_JOURNAL",
    "MAX_RETRY",
    "retry_callback",
    "parse_storage_url",
    "storage_kind",
    "open_storage",
    "list_studies",
    "load_study",
]

#: storage used when none is given: an SQLite file in the current directory
DEFAULT_STORAGE = "sqlite:///dynas.db"
#: storage used when none is given and ``workers > 1``: a journal file in the current directory
DEFAULT_JOURNAL = "journal:///dynas.journal"
#: retries of a trial whose worker died (Optuna's RetryFailedTrialCallback)
MAX_RETRY = 3


def retry_callback() -> Any:
    """Optuna's callback that queues a copy of a trial failed because its worker died."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if cls is None:
            return optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)
        return cls(max_retry=MAX_RETRY)


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # sqlalchemy wraps the DB-API error
    text = str(orig if orig is not None else exc) or type(exc).__name__
    return " ".join(text.split("\n")[0].split())


def parse_storage_url(url: str) -> Any:
    """The SQLAlchemy URL of ``url``; an empty or malformed one raises :class:`~dynas.errors.StudyError`."""
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


def storage_kind(storage: optuna.storages.BaseStorage) -> str:
    """``"memory"``, ``"journal"`` or the database backend of an open storage (``"sqlite"``, ``"postgresql"``, ...)."""
    if isinstance(storage, optuna.storages.InMemoryStorage):
        return "memory"
    if isinstance(storage, optuna.storages.JournalStorage):
        return "journal"
    url = getattr(storage, "url", None)
    return parse_storage_url(url).get_backend_name() if isinstance(url, str) else type(storage).__name__


def open_storage(
    storage: Any = None, *, create: bool = True, heartbeat_s: float | None = None
) -> optuna.storages.BaseStorage:
    """Open the Optuna storage at URL ``storage`` (None: :data:`DEFAULT_STORAGE`).

    URLs are SQLAlchemy database URLs (``sqlite:///dynas.db``, ``postgresql://user@host/db``)
    or ``journal:///FILE``: Optuna's journal file storage, for many worker processes on one
    machine (relative path after three slashes, absolute after four, as for SQLite).

    With ``create=False`` a database or journal file that does not exist is an error instead of
    being created.  ``heartbeat_s`` turns on Optuna's heartbeat for database storages: a running
    trial whose worker stops beating for ``2 * heartbeat_s`` is marked failed and retried (up to
    :data:`MAX_RETRY` times) by the next worker that looks.  Any problem (malformed URL, missing
    driver, unreachable or corrupt database) raises :class:`~dynas.errors.StudyError` with a
    one-line message.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    url = DEFAULT_STORAGE if storage is None else storage
    if not isinstance(url, str):
        raise StudyError(f"storage={url!r} is not a database URL; allowed: e.g. {DEFAULT_STORAGE}")
    parsed = parse_storage_url(url)
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
        # Optuna 4.9 renamed the callback argument (the old name is deprecated, removed in 6.0).
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        callback = (
            "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
        )
        kw = {
            "heartbeat_interval": max(1, round(heartbeat_s)),
            "grace_period": max(2, round(2 * heartbeat_s)),
            callback: retry_callback(),
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kw)
    except ImportError:
        # Optuna turns the driver's ModuleNotFoundError into a generic ImportError.
        driver = parsed.get_driver_name() if backend else "?"
        extra = (
            "; pip install 'dynas[postgres]' installs psycopg 3, for postgresql:// and postgresql+psycopg:// URLs"
            if backend == "postgresql"
            else ""
        )
        raise StudyError(
            f"storage={url!r} needs the database driver {driver!r}, which is not installed{extra}"
        ) from None
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
