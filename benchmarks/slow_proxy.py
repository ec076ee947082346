"""A deliberately slow accuracy proxy, for scale-out tests and benchmarks.

``--proxy benchmarks.slow_proxy:sleep_50ms`` (run from the repository root, or with it on
``PYTHONPATH``) scores like the prior and then sleeps, standing in for an expensive proxy (a
short fine-tune) whose cost dominates the storage's.  The sleep releases the CPU, so on a
2-core machine several workers can overlap their waits the way they would overlap GPU work.
"""

from __future__ import annotations

import time

from dynas.predictors.accuracy import PriorProxy
from dynas.spaces.config import ArchConfig

__all__ = ["SleepyPrior", "sleep_50ms", "sleep_200ms", "sleep_1s"]


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
