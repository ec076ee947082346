"""A training run's folder: what it holds, atomic writes, and what may resume from it.

``RUN/`` (``dynas train --output-dir RUN``)::

    checkpoint.pt   everything to resume: model, optimizer, LR schedule, grad scaler, epoch and
                    step inside it, the Gumbel temperature, the run's identity and options, the
                    metrics so far and the running sums of the current epoch
    model.pt        final weights: dynas.build_model("RUN/config.json").load_state_dict(torch.load(...))
    metrics.jsonl   one JSON line per epoch
    config.json     the input config plus a ``trained`` block (data, recipe, final metrics)

Every file is replaced atomically (temporary file + ``os.replace``), so a run killed at any
moment leaves each file old or new, never half-written.  The random state is not stored: the
trainer re-seeds torch at every step from (seed, rank, step), so the step number is the state.

A checkpoint resumes only the run it came from: :func:`check_resume` compares the backbone,
the config, the classes and the options that shape the trajectory, and refuses the first
difference with one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from dynas.errors import ConfigError
from dynas.files import atomic_write_text, atomic_write_with, check_writable

__all__ = [
    "CHECKPOINT",
    "MODEL",
    "METRICS",
    "CONFIG",
    "FORMAT",
    "save_torch",
    "load_checkpoint",
    "check_resume",
    "check_run_dir",
    "is_temporary",
    "write_metrics",
    "write_json",
]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
#: checkpoint layout version; another one is refused
FORMAT = 1


def save_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically and synced to disk."""
    return atomic_write_with(path, lambda fh: torch.save(obj, fh), ConfigError)


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", ConfigError)


def write_metrics(history: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """The whole ``metrics.jsonl`` from the history kept in the checkpoint (so the two always agree)."""
    return atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in history), ConfigError)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file an atomic write of a run file left when killed."""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in (CHECKPOINT, MODEL, METRICS, CONFIG))


def check_run_dir(run: str) -> bool:
    """Whether ``run`` holds a checkpoint to resume; raises when it cannot be a run folder.

    A new folder (its parent must exist), an empty folder, or a folder with ``checkpoint.pt``
    are allowed; a file, or a non-empty folder without a checkpoint, is refused.  Writes nothing.
    """
    p = Path(run)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--output-dir={run!r} is a file; allowed: a new or empty folder, or a run folder to resume")
    if not p.exists():
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise ConfigError(
                f"--output-dir={run!r}: folder {str(parent)!r} does not exist; allowed: a path in an existing folder"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--output-dir={run!r}: {str(parent)!r} is not writable")
        check_writable(p, ConfigError)
        return False
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir={run!r} is not writable")
    check_writable(p / CHECKPOINT, ConfigError)
    if (p / CHECKPOINT).is_file():
        return True
    leftovers = [e.name for e in p.iterdir() if not is_temporary(e.name)]
    if leftovers:
        raise ConfigError(
            f"--output-dir={run!r} holds {leftovers[0]!r} but no {CHECKPOINT}; "
            "allowed: a new or empty folder, or a run folder to resume"
        )
    return False


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors on the CPU); :class:`ConfigError` if it is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises anything for a file that is not a checkpoint
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be loaded ({why}); allowed: a checkpoint.pt "
            "written by dynas train, or a new --output-dir"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(
            f"checkpoint {str(path)!r} is not a dynas train checkpoint of format {FORMAT}; "
            "allowed: one written by this version, or a new --output-dir"
        )
    return ckpt


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def check_resume(ckpt: Mapping[str, Any], identity: Mapping[str, Any], options: Mapping[str, Any], run: str) -> None:
    """Raise (one line) unless ``ckpt`` was written by a run with this ``identity`` and ``options``.

    ``identity``: ``backbone``, ``config`` (its short form), ``num_classes``, ``classes``;
    ``options``: the recipe values that shape the run.  The first difference is named.
    """
    where = f"--output-dir={run!r} holds a checkpoint of"
    for key in ("backbone", "config", "num_classes", "classes"):
        have, want = ckpt["identity"].get(key), identity.get(key)
        if have != want:
            raise ConfigError(
                f"{where} {key}={_show(have)}; this run has {key}={_show(want)}; "
                "allowed: the same backbone, config and classes to resume, or a new --output-dir"
            )
    for key in sorted(set(options) | set(ckpt["options"])):
        have, want = ckpt["options"].get(key), options.get(key)
        if have != want:
            raise ConfigError(
                f"{where} a run with {key}={_show(have)}; this run has {key}={_show(want)}; "
                "allowed: the same options to resume, or a new --output-dir"
            )
