"""Can this machine measure the energy of what dynas runs?  Linux powercap / Intel RAPL counters.

On Linux, RAPL exposes a running energy counter per package zone at
``/sys/class/powercap/intel-rapl:<n>/energy_uj`` (microjoules, wrapping at
``max_energy_range_uj``); recent kernels make it readable by root only.  A calibration could
read it before and after every measurement and fit energy prices next to the time prices.
dynas does not fit energy on "cpu" targets yet: a calibrated target carries latency only, and
:func:`rapl_status` says in one line whether the counters could be read here and why not
(recorded in the calibrated target's ``[environment]`` as ``energy_counters``).  RAPL meters
the CPU package, so on ``--device cuda`` it would not see the GPU's energy at all.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

__all__ = ["CounterStatus", "POWERCAP_ROOT", "rapl_status"]

POWERCAP_ROOT = "/sys/class/powercap"


@dataclass(frozen=True)
class CounterStatus:
    readable: bool
    line: str  # one line: what was found, or why the counters cannot be used
    paths: tuple[str, ...] = ()  # the readable package counters (energy_uj files)


def _zones(root: str) -> list[str]:
    """Package zones ``intel-rapl:<n>`` (not their subzones ``intel-rapl:<n>:<m>``), sorted."""
    return sorted(p for p in glob.glob(os.path.join(root, "intel-rapl:*")) if os.path.basename(p).count(":") == 1)


def rapl_status(root: str = POWERCAP_ROOT, device: str = "cpu") -> CounterStatus:
    """Whether the RAPL package energy counters under ``root`` can be read (one-line reason if not)."""
    if device != "cpu":
        return CounterStatus(False, f"energy not measured: RAPL meters the CPU package, not the {device} device")
    if not os.path.isdir(root):
        return CounterStatus(False, f"energy not measured: {root} does not exist (no Linux powercap on this machine)")
    zones = _zones(root)
    if not zones:
        return CounterStatus(False, f"energy not measured: {root} has no intel-rapl:<n> zone (no RAPL, e.g. a VM)")
    paths = []
    for zone in zones:
        path = os.path.join(zone, "energy_uj")
        try:
            with open(path) as fh:
                int(fh.read().strip())
        except PermissionError:
            return CounterStatus(False, f"energy not measured: {path} is not readable by this user (root only)")
        except (OSError, ValueError) as exc:
            return CounterStatus(False, f"energy not measured: {path} cannot be read ({type(exc).__name__})")
        paths.append(path)
    return CounterStatus(
        True,
        f"energy not measured: {len(paths)} RAPL package counter(s) under {root} are readable, "
        "but dynas fits time only",
        tuple(paths),
    )
