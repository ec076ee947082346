"""The ``dynas`` command line.

Subcommands::

    dynas targets                      built-in hardware targets
    dynas predict CONFIG --target T    latency prediction of one config
    dynas search [options]             run (or resume) a search; prints the Pareto front,
                                       writes an HTML report and an exported config
    dynas pareto --study-name NAME     Pareto front of a stored study, CSV / HTML
    dynas export --study-name NAME     one trial as a training config (JSON)
    dynas bench CONFIG                 real speed-up of a config (static vs dynamic)
    dynas train CONFIG --data DIR      train a config on an image folder (torchrun: many GPUs)
    dynas evaluate CONFIG --weights F  accuracy, realised rates and latency of a trained model
    dynas calibrate -o TARGET.toml     measure this device, fit a target file
    dynas validate --target T          held-out measurements vs predictions
    dynas exits CONFIG --weights F     early-exit confidence thresholds for a latency budget

Every bad input (a :class:`~dynas.errors.DynasError` or an argparse error) ends as one line
``dynas: error: <message>`` on stderr and exit status 2, with no traceback.  Output paths are
checked before any long work starts, so a bad path costs nothing.

This module holds the root parser, logging and :func:`main`; each group of subcommands is a
module with an ``add_parsers(sub, parent)`` that registers them: :mod:`~dynas.cli.predict`
(targets, predict), :mod:`~dynas.cli.search` (search, pareto, export),
:mod:`~dynas.cli.measure` (bench, calibrate), :mod:`~dynas.cli.validate` (validate) and
:mod:`~dynas.cli.train` (train, evaluate).  :mod:`~dynas.cli.common` holds
what they share (argument types, defaults, output checks, tables).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any, Callable, Sequence

from dynas.cli import exits, measure, predict, search, train, validate
from dynas.cli.common import Formatter, Parser, UsageError
from dynas.errors import DynasError

__all__ = ["main", "build_parser", "UsageError"]

_logger = logging.getLogger("dynas")


def build_parser() -> argparse.ArgumentParser:
    """The ``dynas`` parser: the global flags and every subcommand."""
    from dynas import __version__

    parser = Parser(
        prog="dynas",
        formatter_class=Formatter,
        description="Find, per hardware target, the best way to make a CNN dynamic "
        "(spatial / channel / layer skipping): predicted latency vs. an accuracy proxy.",
        epilog="Run 'dynas search' with no arguments for the default search (resnet101 on v100).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log every Optuna trial")
    # The same flags after the subcommand; SUPPRESS keeps them from resetting the global ones.
    parent = Parser(add_help=False)
    parent.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors on stderr"
    )
    parent.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="also log every Optuna trial"
    )
    parser.add_argument("--version", action="version", version=f"dynas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for commands in (predict, search, measure, validate, train, exits):
        commands.add_parsers(sub, parent)
    return parser


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so in-process callers can capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("dynas: %(message)s"))


def _setup_logging(quiet: bool, verbose: bool) -> Callable[[], None]:
    import optuna

    if _HANDLER not in _logger.handlers:
        _logger.addHandler(_HANDLER)
    old_level, old_propagate, old_optuna = _logger.level, _logger.propagate, optuna.logging.get_verbosity()
    _logger.setLevel(logging.WARNING if quiet else logging.INFO)
    _logger.propagate = False
    # Optuna's own warnings include a traceback for a trial interrupted by Ctrl-C; the CLI
    # reports that itself, so Optuna speaks only with --verbose.
    optuna.logging.set_verbosity(logging.INFO if verbose and not quiet else logging.ERROR)

    def restore() -> None:
        _logger.setLevel(old_level)
        _logger.propagate = old_propagate
        _logger.removeHandler(_HANDLER)
        optuna.logging.set_verbosity(old_optuna)

    return restore


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    sys.stderr.write(f"dynas: warning: {' '.join(str(message).split())}\n")


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"dynas: error: {' '.join(message.split())}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dynas`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except DynasError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)

    restore = _setup_logging(args.quiet, args.verbose)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args))
    except DynasError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; re-run the same command to resume the search", 130)
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}", 1)
    finally:
        restore()
