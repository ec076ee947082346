"""Hardware targets: the numbers the latency model needs, one data file per target.

A target file is TOML::

    name = "v100"
    description = "..."
    kind = "gpu"
    default_batch_size = 128
    [hardware]
    n_sm = 80                 # streaming multiprocessors
    lanes_per_sm = 64         # FP32 lanes per SM
    clock_hz = 1.5e9
    dram_bandwidth_Bps = 700e9
    l2_speed_frac = 4.0       # L2 bandwidth = DRAM bandwidth x this
    fp32_cycles = 4           # lane-efficiency rounding unit = lanes x fp32_cycles outputs
    mem_transaction_floats = 8
    launch_us = 8.0
    bytes_per_element = 4
    [sources]                 # where each number comes from (free text, one entry per field)

Built-in targets live in ``predictors/data/targets``; a user passes a path to their own file
anywhere a target name is accepted.  Nothing is read from the home directory.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from dynas.errors import TargetError

__all__ = ["HardwareTarget", "load_target", "list_targets", "BUILTIN_DIR"]

BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "targets"

_KINDS = ("gpu",)


@dataclass(frozen=True)
class HardwareTarget:
    name: str
    description: str
    kind: str
    default_batch_size: int
    n_sm: int
    lanes_per_sm: int
    clock_hz: float
    dram_bandwidth_Bps: float
    l2_speed_frac: float = 4.0
    fp32_cycles: int = 4
    mem_transaction_floats: int = 8
    launch_us: float = 8.0
    bytes_per_element: int = 4
    path: str | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple:
        """Hashable tuple of everything that changes a prediction (used for memoization)."""
        return tuple(getattr(self, f) for f in _HW_FIELDS) + (self.kind,)

    @property
    def peak_gmacs(self) -> float:
        return self.n_sm * self.lanes_per_sm * self.clock_hz / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sources", "path")}
        d["sources"] = dict(self.sources)
        return d


_HW_FIELDS = ("n_sm", "lanes_per_sm", "clock_hz", "dram_bandwidth_Bps", "l2_speed_frac", "fp32_cycles",
              "mem_transaction_floats", "launch_us", "bytes_per_element")
_INT_FIELDS = ("n_sm", "lanes_per_sm", "fp32_cycles", "mem_transaction_floats", "bytes_per_element")
_REQUIRED = ("n_sm", "lanes_per_sm", "clock_hz", "dram_bandwidth_Bps")


def list_targets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def _number(value: Any, where: str, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise TargetError(f"{where}={value!r} is not {kind}")
    if not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise TargetError(f"{where}={value!r} is out of range; allowed: {kind}")
    return value


def _from_mapping(data: dict[str, Any], origin: str, path: str | None) -> HardwareTarget:
    hw = data.get("hardware")
    if not isinstance(hw, dict):
        raise TargetError(f"{origin}: table [hardware] is missing; allowed: a [hardware] table with {', '.join(_REQUIRED)}")
    unknown = sorted(set(hw) - set(_HW_FIELDS))
    if unknown:
        raise TargetError(f"{origin}: hardware.{unknown[0]} is unknown; allowed: {', '.join(_HW_FIELDS)}")
    for name in _REQUIRED:
        if name not in hw:
            raise TargetError(f"{origin}: hardware.{name} is missing; allowed: a positive number")
    values = {k: _number(v, f"{origin}: hardware.{k}", k in _INT_FIELDS) for k, v in hw.items()}
    kind = data.get("kind", "gpu")
    if kind not in _KINDS:
        raise TargetError(f"{origin}: kind={kind!r} is not supported; allowed: {', '.join(_KINDS)}")
    batch = _number(data.get("default_batch_size", 1), f"{origin}: default_batch_size", True)
    name = data.get("name", Path(origin).stem)
    if not isinstance(name, str) or not name:
        raise TargetError(f"{origin}: name={name!r} is not a non-empty string")
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        raise TargetError(f"{origin}: [sources] must be a table of strings")
    return HardwareTarget(
        name=name,
        description=str(data.get("description", "")),
        kind=kind,
        default_batch_size=int(batch),
        path=path,
        sources={str(k): str(v) for k, v in sources.items()},
        **values,
    )


def _read(path: Path, origin: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"target file {origin!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise TargetError(f"target file {origin!r} cannot be read: {exc.strerror}") from None


def load_target(target: "str | Path | HardwareTarget") -> HardwareTarget:
    """Return a built-in target by name, or read a target TOML file by path."""
    if isinstance(target, HardwareTarget):
        return target
    text = str(target)
    builtin = BUILTIN_DIR / f"{text}.toml"
    if isinstance(target, str) and "/" not in text and not text.endswith(".toml"):
        if not builtin.is_file():
            raise TargetError(f"target={text!r} is unknown; allowed: {', '.join(list_targets())} or a path to a .toml target file")
        return _cached_builtin(text)
    path = Path(target)
    if not path.is_file():
        raise TargetError(f"target={text!r} is not a file; allowed: {', '.join(list_targets())} or a path to a .toml target file")
    return _from_mapping(_read(path, text), text, str(path.resolve()))


_BUILTIN_CACHE: dict[str, HardwareTarget] = {}


def _cached_builtin(name: str) -> HardwareTarget:
    if name not in _BUILTIN_CACHE:
        path = BUILTIN_DIR / f"{name}.toml"
        _BUILTIN_CACHE[name] = _from_mapping(_read(path, name), name, None)
    return _BUILTIN_CACHE[name]
