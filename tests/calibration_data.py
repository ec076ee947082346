"""What the calibration tests share: the trimmed measurements and a unit-cost CPU target."""

from __future__ import annotations

from pathlib import Path

from dynas.predictors import cpu
from dynas.predictors.targets import HardwareTarget

#: trimmed copies of benchmark measurements (tests/data/README.md says which rows of which run)
DATA = Path(__file__).resolve().parent / "data"
UNIT = cpu.CpuCosts(*([1.0] * len(cpu.COST_FIELDS)))


def unit_target(costs: cpu.CpuCosts = UNIT, **fit) -> HardwareTarget:
    """A CPU target with the given costs (every one 1 by default) and fit record."""
    return HardwareTarget(name="unit", description="", kind="cpu", default_batch_size=1, cpu=costs, threads=2, fit=fit)
