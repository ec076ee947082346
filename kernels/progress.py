"""Training progress: a bar per epoch on an interactive terminal, plain log lines otherwise.

The bar is tqdm's (already installed with Optuna): step, loss, images/s and ETA.  Without a
terminal (a log file, CI, torchrun's piped output) every ``log_every`` steps becomes one
``logging`` line on the ``dynas`` logger, which ``-q`` silences.  Only rank 0 reports.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

__all__ = ["Progress"]

_log = logging.getLogger("dynas.train")


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``start(epoch, ...)``, ``step(...)`` after each optimisation step, ``close()`` at the epoch end."""

    def __init__(self, enabled: bool, epochs: int, images_per_step: int, log_every: int, tty: bool | None = None):
        self.enabled = enabled and _log.isEnabledFor(logging.INFO)
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.epochs, self.images_per_step, self.log_every = epochs, images_per_step, log_every
        self.bar: Any = None

    def start(self, epoch: int, steps: int, done: int) -> None:
        """Epoch ``epoch`` (0-based) of ``steps`` steps, ``done`` of them already run (resumed)."""
        self.epoch, self.steps, self.done, self.t0, self.run_from = epoch, steps, done, time.perf_counter(), done
        if self.enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=steps,
                initial=done,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def step(self, parts: Callable[[], dict[str, float]]) -> None:
        """One step done; ``parts()`` (called only when shown: it syncs the device) gives the loss parts."""
        self.done += 1
        if not self.enabled:
            return
        show = self.done % self.log_every == 0 or self.done == self.steps
        elapsed = time.perf_counter() - self.t0
        rate = (self.done - self.run_from) * self.images_per_step / max(elapsed, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            if show:
                p = parts()
                self.bar.set_postfix_str(f"loss {p['loss']:.4f}, {rate:.0f} img/s")
        elif show:
            p = parts()
            eta = (self.steps - self.done) * elapsed / max(1, self.done - self.run_from)
            _log.info(
                "epoch %d/%d step %d/%d: loss %.4f (ce %.4f, sparsity %.4f, kd %.4f), lr %.4g, T %.3g, %.0f img/s, "
                "epoch ETA %s",
                self.epoch + 1,
                self.epochs,
                self.done,
                self.steps,
                p["loss"],
                p["ce"],
                p["sparsity"],
                p["kd"],
                p["lr"],
                p["temperature"],
                rate,
                _eta(eta),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def info(self, message: str, *args: Any) -> None:
        """A log line (shown above the bar when one is drawn)."""
        if not self.enabled:
            return
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write("dynas: " + message % args, file=sys.stderr)
        else:
            _log.info(message, *args)
