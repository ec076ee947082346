"""Atomic file writes shared by every layer (results, predictors, the CLI).

Either the whole new file is there afterwards or the old one (if any) is untouched: the data
goes to a temporary file in the same folder, which then replaces the target by
:func:`os.replace`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from dynas.errors import DynasError

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_write_with", "check_writable"]


def atomic_write_text(path: str | os.PathLike[str], text: str, error: type[DynasError] = DynasError) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; a missing or unwritable folder raises ``error``."""
    return atomic_write_bytes(path, text.encode("utf-8"), error)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, error: type[DynasError] = DynasError) -> Path:
    """:func:`atomic_write_text` for bytes.  A folder or file that cannot be written (read-only,
    full disk, ...) raises ``error`` too; nothing is left behind."""
    return atomic_write_with(path, lambda fh: fh.write(data), error, fsync=False)


def atomic_write_with(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    error: type[DynasError] = DynasError,
    fsync: bool = True,
) -> Path:
    """:func:`atomic_write_bytes` where ``write(fh)`` writes the data into the open temporary
    file (e.g. ``torch.save``), so a large file need not be in memory first.  With ``fsync``
    the data reaches the disk before the rename, so even a power cut leaves the old file or
    the whole new one (a killed process does either way)."""
    path = Path(path)
    fd, tmp = _temporary_beside(path, error)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):  # a full disk, a directory at ``path``, ...
            raise error(_unwritable(path, exc)) from None
        raise
    return path


def check_writable(path: str | os.PathLike[str], error: type[DynasError] = DynasError) -> None:
    """Raise ``error`` now if an atomic write of ``path`` would fail for its folder (missing,
    read-only): a temporary file is created there and removed, before long work starts."""
    fd, tmp = _temporary_beside(Path(path), error)
    os.close(fd)
    os.unlink(tmp)


def _temporary_beside(path: Path, error: type[DynasError]) -> tuple[int, str]:
    """A new temporary file (descriptor, path) in ``path``'s folder; ``error`` if there cannot be one."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise error(
            f"output path={str(path)!r}: folder {str(folder)!r} does not exist; allowed: a path in an existing folder"
        )
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:  # e.g. a read-only folder
        raise error(_unwritable(path, exc)) from None


def _unwritable(path: Path, exc: OSError) -> str:
    reason = " ".join(str(exc.strerror or exc).split())
    return f"output path={str(path)!r} cannot be written: {reason}; allowed: a writable file path in a writable folder"
