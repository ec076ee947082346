"""Deliberately slow accuracy proxies, for scale-out and early-stopping tests and benchmarks.

``--proxy tests.slow_proxy:sleep_50ms`` (run from the repository root, or with it on
``PYTHONPATH``: ``tests`` is a namespace package) scores like the prior and then sleeps,
standing in for an expensive proxy (a short fine-tune) whose cost dominates the storage's.  The
sleep releases the CPU, so on a 2-core machine several workers can overlap their waits the way
they would overlap GPU work.

``--proxy tests.slow_proxy:curve`` (and ``curve_200ms``) stands in for a training proxy:
it reports three checkpoints, at which the score grows linearly to a final top-1 that is a
fixed pseudo-random function of the config, so the early-stopping rules have something to
decide and tests can predict what they decide.
"""

from __future__ import annotations

import hashlib
import time

from dynas.predictors.accuracy import PriorProxy
from dynas.predictors.proxy import AccuracyProxy, ProxyResult, Reporter
from dynas.spaces.config import ArchConfig

__all__ = ["SleepyPrior", "sleep_50ms", "sleep_200ms", "sleep_1s", "CurveProxy", "curve", "curve_200ms"]


class SleepyPrior(PriorProxy):
    """The prior's score, returned after ``delay_s`` seconds of sleep."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = float(delay_s)
        self.name = f"prior+sleep{self.delay_s:g}s"

    def score(self, config: ArchConfig) -> float:
        time.sleep(self.delay_s)
        return super().score(config)


def sleep_50ms() -> SleepyPrior:
    return SleepyPrior(0.05)


def sleep_200ms() -> SleepyPrior:
    return SleepyPrior(0.2)


def sleep_1s() -> SleepyPrior:
    return SleepyPrior(1.0)


class CurveProxy(AccuracyProxy):
    """Checkpoints at steps 1, 2, 3 (``delay_s`` of sleep before each); top-1 at step k is
    ``final * k / 3``, with ``final`` in [50, 90) from a hash of the config."""

    description = "test proxy: pseudo-random final top-1 reached linearly over 3 checkpoints"
    STEPS = (1, 2, 3)

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = float(delay_s)

    @staticmethod
    def final(config: ArchConfig) -> float:
        digest = hashlib.sha256(repr(config.to_dict()).encode()).digest()
        return 50.0 + 40.0 * int.from_bytes(digest[:4], "big") / 2**32

    def static_top1(self, backbone: str) -> float:
        return 95.0

    def reference_top1(self, config: ArchConfig) -> float:
        return 10.0

    def score(self, config: ArchConfig) -> float:
        return self.final(config)

    def evaluate(self, config: ArchConfig, reporter: Reporter | None = None) -> ProxyResult:
        final = self.final(config)
        for step in self.STEPS:
            if self.delay_s:
                time.sleep(self.delay_s)
            if reporter is not None:
                reporter.report(step, final * step / 3, final=step == self.STEPS[-1])
        return ProxyResult(final)


def curve() -> CurveProxy:
    return CurveProxy(0.0)


def curve_200ms() -> CurveProxy:
    return CurveProxy(0.2)
