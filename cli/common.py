"""What every ``dynas`` subcommand shares: the parser and its help formatter, argument types,
the library defaults options show, output-path checks and aligned text tables.

The command modules (:mod:`~dynas.cli.predict`, :mod:`~dynas.cli.search`,
:mod:`~dynas.cli.measure`, :mod:`~dynas.cli.validate`, :mod:`~dynas.cli.train`) each register
their subcommands with :func:`add_command`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dynas.errors import DynasError

__all__ = [
    "UsageError",
    "Parser",
    "Formatter",
    "add_command",
    "default_of",
    "torch_default",
    "TORCH_DEFAULTS",
    "image_size",
    "str_list",
    "int_list",
    "number_list",
    "int_at_least",
    "positive_int",
    "nonneg_int",
    "number",
    "positive_number",
    "safe_name",
    "check_output",
    "frame_text",
    "table",
    "echo",
]


class UsageError(DynasError):
    """A command-line argument is invalid (bad syntax, unusable output path)."""


# --------------------------------------------------------------------------------------------
# argparse plumbing
# --------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become :class:`UsageError` (printed on one line by main)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{' '.join(message.split())} (see '{self.prog} --help')")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows defaults that are not None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, argparse._HelpAction)
        ):
            if isinstance(default, (tuple, list)):
                default = ",".join(str(v) for v in default)
                return f"{text} (default: {default})"
            text += " (default: %(default)s)"
        return text


def add_command(
    sub: Any,
    parent: argparse.ArgumentParser,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to ``sub`` (the root parser's subparsers): it takes ``parent`` 's
    flags (-q/-v), shows defaults with :class:`Formatter` and runs ``func(args)``."""
    p = sub.add_parser(name, parents=[parent], help=help, description=description, formatter_class=Formatter)
    p.set_defaults(func=func)
    return p


# --------------------------------------------------------------------------------------------
# defaults: the library states each one, the options read it
# --------------------------------------------------------------------------------------------


def default_of(owner: Any, name: str) -> Any:
    """The default of ``name`` in ``owner``: a dataclass's field (e.g. ``default_of(SearchOptions,
    "trials")``) or a function's parameter (``default_of(validation_plan, "count")``)."""
    if dataclasses.is_dataclass(owner):
        for f in dataclasses.fields(owner):
            if f.name == name:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                break
        raise LookupError(f"{getattr(owner, '__name__', owner)!s} has no field {name!r} with a default")
    parameter = inspect.signature(owner).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise LookupError(f"{getattr(owner, '__qualname__', owner)!s} has no parameter {name!r} with a default")
    return parameter.default


#: Defaults of library functions whose modules import torch, keyed ("module:function", parameter).
#: Reading them with :func:`default_of` would import torch whenever the parser is built, which
#: makes every command (``dynas --help`` and ``dynas predict`` included) start about 2 s slower;
#: so they are restated here, once, and tests/test_cli.py checks each against the signature.
TORCH_DEFAULTS: dict[tuple[str, str], Any] = {
    ("dynas.kernels.bench:bench", "device"): "cpu",
    ("dynas.kernels.bench:bench", "batch_size"): 1,
    ("dynas.kernels.bench:bench", "repeats"): 30,
    ("dynas.kernels.bench:bench", "warmup"): 5,
    ("dynas.kernels.bench:bench", "memory_format"): "channels_last",
    ("dynas.kernels.bench:bench", "gate_mode"): "budget",
    ("dynas.kernels.calibrate:run_plan", "device"): "cpu",
    ("dynas.kernels.calibrate:run_plan", "repeats"): 5,
    ("dynas.kernels.calibrate:run_plan", "warmup"): 1,
    ("dynas.kernels.calibrate:run_rounds", "rounds"): 2,
    ("dynas.kernels.finetune:FinetuneProxy", "steps"): 40,
    ("dynas.kernels.finetune:FinetuneProxy", "batch_size"): 32,
    ("dynas.kernels.finetune:FinetuneProxy", "checkpoints"): 3,
    ("dynas.kernels.finetune:FinetuneProxy", "pretrain_steps"): 200,
}


def torch_default(owner: str, name: str) -> Any:
    """The default of parameter ``name`` of ``owner`` ("module:function"), a function of a module
    that imports torch, from :data:`TORCH_DEFAULTS`."""
    return TORCH_DEFAULTS[owner, name]


# --------------------------------------------------------------------------------------------
# argument types (their errors read "argument --x: 'text' is ...; allowed: ...")
# --------------------------------------------------------------------------------------------


def image_size(text: str) -> int | tuple[int, int]:
    """argparse type: an image size, ``N`` or ``HxW``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; allowed: N or HxW, e.g. 224 or 224x320")
    h = int(m.group(1))
    return h if m.group(2) is None else (h, int(m.group(2)))


def str_list(text: str) -> tuple[str, ...]:
    """argparse type: a non-empty comma-separated list."""
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; allowed: a comma-separated list")
    return items


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: a non-empty comma-separated list of integers."""
    items = str_list(text)
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers; allowed: e.g. 1,2,4") from None


def number_list(text: str) -> tuple[float, ...]:
    """argparse type: a non-empty comma-separated list of numbers (range checks are the library's)."""
    try:
        return tuple(float(t) for t in str_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers; allowed: e.g. 2,4.5,8") from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= {minimum}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: an integer >= {minimum}")
        return v

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def number(text: str) -> float:
    """argparse type: a number (range checks are the library's)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = number(text)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: a finite number > 0")
    return v


# --------------------------------------------------------------------------------------------
# output paths
# --------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A study or target name as a file-name fragment."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "study"


def check_output(option: str, path: str | os.PathLike[str] | None) -> None:
    """Raise :class:`UsageError` unless ``path`` can be written (checked before long work)."""
    if path is None:
        return
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise UsageError(f"{option}={str(path)!r} is a directory or empty; allowed: a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{option}={str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{option}={str(path)!r}: not writable")


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------


def frame_text(df: Any, floats: str = "{:.4g}") -> str:
    """``df`` as aligned text: numbers right-aligned, text left-aligned, missing cells blank."""
    from pandas.api.types import is_numeric_dtype

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):  # v != v: NaN
            return ""
        return floats.format(v) if isinstance(v, float) else str(v)

    columns = []
    for col in df.columns:
        cells = [str(col), *(cell(v) for v in df[col].tolist())]
        width = max(map(len, cells))
        right = is_numeric_dtype(df[col].dtype)
        columns.append([c.rjust(width) if right else c.ljust(width) for c in cells])
    return "\n".join("  ".join(row).rstrip() for row in zip(*columns))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], floats: str = "{:.4g}") -> str:
    """``rows`` (dicts; missing keys blank) as aligned text with these ``columns``."""
    import pandas as pd

    return frame_text(pd.DataFrame(list(rows), columns=list(columns)), floats)


def echo(text: str = "") -> None:
    """Print one line of a command's result on stdout (logging goes to stderr)."""
    sys.stdout.write(text + "\n")
