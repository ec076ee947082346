"""Analytical energy of a prediction on a GPU target: the latency model's work priced in joules.

The form is the energy roofline (Choi, Bedard, Fowler and Vuduc, "A roofline model of energy",
IPDPS 2013): energy = work x energy per operation + bytes moved x energy per byte + constant
power x time.  Here, per operator of the latency model (:mod:`dynas.predictors.gpu`):

* FLOPs: the multiply-accumulates the operator executes (``OpCost.macs``) x 2 x ``pj_per_flop``.
  Lanes left idle by the schedule's rounding cost time but no FLOP energy.
* DRAM: the unique bytes the latency model moves to and from DRAM (``OpCost.dram_bytes``, the
  DRAM term of its memory time) x ``pj_per_dram_byte``.
* constant power: ``static_power_w`` x the predicted latency; it covers everything that draws
  power while the board is on whether or not it computes (idle board power, clocks, leakage).

Element-wise kernels (residual adds, pooling, scatters) are priced by their DRAM bytes only.
On-chip traffic (registers, shared memory, L2) has no price of its own: the built-in targets'
``pj_per_flop`` is the board's dynamic power at full FP32 load over its peak FLOP rate, which
already pays for the on-chip traffic of a full-load kernel, so an L2 price would count it twice.
The L2 bytes the latency model times are also those of the tile schedule that is fastest, which
can fetch fewer bytes for more work (a wider tile wins at more patches); priced, they would make
energy fall where the work rises.  FLOPs, DRAM bytes and latency all grow with every rate, so
the energy does.
The constants live in a target file's ``[energy]`` table, each with its source in
``[sources]``; ``docs/energy.md`` says which are measured and which are estimates.  A target
without the table predicts no energy (``energy_mj`` is None, not 0); so do calibrated "cpu"
targets, whose calibration measures time only (``kernels/energy_counter.py`` says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterable

from dynas.errors import ConfigError, TargetError
from dynas.predictors.gpu import OpCost

__all__ = [
    "EnergyConstants",
    "ENERGY_FIELDS",
    "op_energy_mj",
    "ops_energy_mj",
    "static_energy_mj",
    "energy_from_table",
    "no_energy_error",
]


@dataclass(frozen=True)
class EnergyConstants:
    """A target's energy prices (hashable: part of the prediction memo key)."""

    pj_per_flop: float  # picojoules per floating-point operation (a multiply-accumulate is 2)
    pj_per_dram_byte: float  # picojoules per byte read from or written to DRAM
    static_power_w: float  # watts drawn while the board runs, whatever it computes

    def as_dict(self) -> dict[str, float]:
        return {f: getattr(self, f) for f in ENERGY_FIELDS}


#: the fields of a target file's ``[energy]`` table, in file order
ENERGY_FIELDS = tuple(f.name for f in fields(EnergyConstants))


def op_energy_mj(cost: OpCost, c: EnergyConstants) -> float:
    """Dynamic energy (mJ) of one operator: its FLOPs and DRAM bytes; no constant power."""
    return (2.0 * cost.macs * c.pj_per_flop + cost.dram_bytes * c.pj_per_dram_byte) * 1e-9


def ops_energy_mj(ops: Iterable[tuple[str, OpCost]], c: EnergyConstants) -> float:
    """Dynamic energy (mJ) of a list of ``(name, cost)`` operators (a block, the stem, the head)."""
    return sum(op_energy_mj(cost, c) for _, cost in ops)


def static_energy_mj(latency_ms: float, c: EnergyConstants) -> float:
    """Energy (mJ) the constant power draws over ``latency_ms`` (W x ms = mJ)."""
    return c.static_power_w * latency_ms


def no_energy_error(given: str, target: str, allowed: str) -> ConfigError:
    """The one-line refusal of an option that needs energy (``given``, e.g. ``"budgets_mj=[40.0]"``)
    on ``target``, which predicts none; ``allowed``: what works instead."""
    return ConfigError(
        f"{given} is not allowed on target {target!r}: it has no [energy] table (cpu targets and files without "
        f"one predict latency only); allowed: {allowed}"
    )


def energy_from_table(table: Any, origin: str) -> EnergyConstants:
    """The ``[energy]`` table of a target file, checked: every field present, each a number >= 0."""
    if not isinstance(table, dict):
        raise TargetError(f"{origin}: [energy] must be a table with {', '.join(ENERGY_FIELDS)}")
    unknown = sorted(set(table) - set(ENERGY_FIELDS))
    if unknown:
        raise TargetError(f"{origin}: energy.{unknown[0]} is unknown; allowed: {', '.join(ENERGY_FIELDS)}")
    values = []
    for f in ENERGY_FIELDS:
        if f not in table:
            raise TargetError(f"{origin}: energy.{f} is missing; allowed: a number >= 0")
        v = table[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise TargetError(f"{origin}: energy.{f}={v!r} is out of range; allowed: a number >= 0")
        values.append(float(v))
    return EnergyConstants(*values)
