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
    [energy]                  # optional: without it the target predicts latency only
    pj_per_flop = 20.0        # picojoules per FLOP (multiply-accumulate = 2 FLOPs)
    pj_per_dram_byte = 60.0   # picojoules per byte to and from DRAM
    static_power_w = 40.0     # watts drawn while the board runs, whatever it computes
    [sources]                 # where each number comes from (free text, one entry per field)

The ``[energy]`` prices turn the latency model's FLOPs, DRAM bytes and latency into joules (:mod:`dynas.predictors.energy`); each is a number >= 0, all four or none.

A *measured* target (``kind = "cpu"``, written by ``dynas calibrate``) has no ``[hardware]``
table; its ``[cpu]`` table holds the fitted cost of each unit of work of
:mod:`dynas.predictors.cpu` (``pointwise_ms_per_gmac``, ..., ``dynamic_stage_us``: the
``cost_field`` of each row of :data:`dynas.predictors.cpu_terms.COST_TERMS`; each a number >= 0,
every field required except those that files written before they existed lack, which read as
the file meant them: ``absent_as`` of the row), ``threads``, the thread count it was measured with, and
``column_block`` (optional, default 1), the output columns a convolution kernel computes at
once, which the calibration picks along with the costs.  Its
``[environment]`` (device, torch version, date, ...) and ``[fit]`` (how well the model fits the
calibration measurements) tables are free-form records; ``[static_ms]`` (optional) holds the
measured latency of each wholly static network of the calibration (``static_key``).  The device it was measured on
(``cpu`` or ``cuda``) is ``environment.device``.

Built-in targets live in ``predictors/data/targets``; a user passes a path to their own file
anywhere a target name is accepted.  Nothing is read from the home directory.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from dynas.errors import TargetError
from dynas.files import atomic_write_text
from dynas.predictors.cpu_terms import ABSENT_FIELDS, COST_FIELDS, CpuCosts
from dynas.predictors.energy import ENERGY_FIELDS, EnergyConstants, energy_from_table

__all__ = ["HardwareTarget", "load_target", "list_targets", "write_target", "static_key", "BUILTIN_DIR", "KINDS"]

BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "targets"

#: target kinds: the analytical GPU model, the calibrated model of dynas's kernels
KINDS = ("gpu", "cpu")


@dataclass(frozen=True)
class HardwareTarget:
    name: str
    description: str
    kind: str
    default_batch_size: int
    n_sm: int = 0  # the gpu fields are 0 on a "cpu" target
    lanes_per_sm: int = 0
    clock_hz: float = 0.0
    dram_bandwidth_Bps: float = 0.0
    l2_speed_frac: float = 4.0
    fp32_cycles: int = 4
    mem_transaction_floats: int = 8
    launch_us: float = 8.0
    bytes_per_element: int = 4
    path: str | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    #: "gpu" targets: energy prices of the [energy] table; None = the target predicts no energy
    energy: EnergyConstants | None = None
    #: "cpu" targets: fitted costs, measured thread count, and the free-form records
    cpu: CpuCosts | None = None
    threads: int = 0
    #: output columns a convolution kernel computes at once (the work counting of dynas.predictors.cpu);
    #: 1 = narrow maps cost nothing extra (targets written before dynas fitted it)
    column_block: int = 1
    #: cost fields the calibration never exercised (their cost is 0 for lack of data, not measured)
    unexercised: tuple[str, ...] = ()
    environment: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    fit: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: "cpu" targets: measured latency (ms) of the wholly static networks of the calibration,
    #: keyed by :func:`static_key`; ``dynas validate`` times them again to see whether the host
    #: still runs at the speed it was calibrated at
    static_ms: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple:
        """Hashable tuple of everything that changes a prediction (used for memoization)."""
        return tuple(getattr(self, f) for f in _HW_FIELDS) + (
            self.kind,
            self.cpu,
            self.column_block,
            self.unexercised,
            self.energy,
        )

    @property
    def peak_gmacs(self) -> float:
        return self.n_sm * self.lanes_per_sm * self.clock_hz / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sources", "path", "cpu", "energy")}
        d["sources"] = dict(self.sources)
        d["energy"] = self.energy.as_dict() if self.energy is not None else None
        if self.cpu is not None:
            d["cpu"] = self.cpu._asdict()
        return d


_HW_FIELDS = (
    "n_sm",
    "lanes_per_sm",
    "clock_hz",
    "dram_bandwidth_Bps",
    "l2_speed_frac",
    "fp32_cycles",
    "mem_transaction_floats",
    "launch_us",
    "bytes_per_element",
)
_INT_FIELDS = ("n_sm", "lanes_per_sm", "fp32_cycles", "mem_transaction_floats", "bytes_per_element")
_REQUIRED = ("n_sm", "lanes_per_sm", "clock_hz", "dram_bandwidth_Bps")


def static_key(backbone: str, input_hw: tuple[int, int], batch_size: int) -> str:
    """Key of a static network in a target's ``static_ms`` table, e.g. ``resnet50-224x224-b8``."""
    return f"{backbone}-{input_hw[0]}x{input_hw[1]}-b{batch_size}"


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


def _common(data: dict[str, Any], origin: str) -> tuple[str, str, int, dict[str, str]]:
    kind = data.get("kind", "gpu")
    if kind not in KINDS:
        raise TargetError(f"{origin}: kind={kind!r} is not supported; allowed: {', '.join(KINDS)}")
    batch = _number(data.get("default_batch_size", 1), f"{origin}: default_batch_size", True)
    name = data.get("name", Path(origin).stem)
    if not isinstance(name, str) or not name:
        raise TargetError(f"{origin}: name={name!r} is not a non-empty string")
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        raise TargetError(f"{origin}: [sources] must be a table of strings")
    return kind, name, int(batch), {str(k): str(v) for k, v in sources.items()}


def _cpu_from_mapping(data: dict[str, Any], origin: str, path: str | None) -> HardwareTarget:
    kind, name, batch, sources = _common(data, origin)
    if "energy" in data:
        raise TargetError(
            f"{origin}: [energy] is not allowed on a cpu target; allowed: [energy] on gpu targets "
            "(a calibration measures time only, see dynas.kernels.energy_counter)"
        )
    table = data.get("cpu")
    if not isinstance(table, dict):
        raise TargetError(
            f"{origin}: table [cpu] is missing; allowed: a [cpu] table with threads, {', '.join(COST_FIELDS)}"
        )
    allowed = ("threads", "column_block") + COST_FIELDS
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise TargetError(f"{origin}: cpu.{unknown[0]} is unknown; allowed: {', '.join(allowed)}")
    costs = []
    for f in COST_FIELDS:
        if f not in table and f in ABSENT_FIELDS:  # a file written before the field existed
            src = ABSENT_FIELDS[f]
            while src is not None and src not in table and src in ABSENT_FIELDS:
                src = ABSENT_FIELDS[src]  # ... and before the field it stood for
            v = table.get(src, 0.0) if src else 0.0  # a missing source field is reported as itself
        elif f not in table:
            raise TargetError(f"{origin}: cpu.{f} is missing; allowed: a number >= 0")
        else:
            v = table[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise TargetError(f"{origin}: cpu.{f}={v!r} is out of range; allowed: a number >= 0")
        costs.append(float(v))
    threads = _number(table.get("threads", 1), f"{origin}: cpu.threads", True)
    column_block = _number(table.get("column_block", 1), f"{origin}: cpu.column_block", True)
    env, fit, static = data.get("environment", {}), data.get("fit", {}), data.get("static_ms", {})
    for tname, t in (("environment", env), ("fit", fit), ("static_ms", static)):
        if not isinstance(t, dict):
            raise TargetError(f"{origin}: [{tname}] must be a table")
    unexercised = tuple(f for f in str(fit.get("unexercised", "")).split(",") if f)
    for f in unexercised:
        if f not in COST_FIELDS:
            raise TargetError(f"{origin}: fit.unexercised entry {f!r} is unknown; allowed: {', '.join(COST_FIELDS)}")
    static_ms = {str(k): float(_number(v, f"{origin}: static_ms.{k}", False)) for k, v in static.items()}  # ms > 0
    return HardwareTarget(
        name=name,
        description=str(data.get("description", "")),
        kind=kind,
        default_batch_size=batch,
        path=path,
        sources=sources,
        cpu=CpuCosts(*costs),
        threads=int(threads),
        column_block=column_block,
        unexercised=unexercised,
        environment=dict(env),
        fit=dict(fit),
        static_ms=static_ms,
    )


def _from_mapping(data: dict[str, Any], origin: str, path: str | None) -> HardwareTarget:
    if data.get("kind") == "cpu":
        return _cpu_from_mapping(data, origin, path)
    hw = data.get("hardware")
    if not isinstance(hw, dict):
        raise TargetError(
            f"{origin}: table [hardware] is missing; allowed: a [hardware] table with {', '.join(_REQUIRED)}"
        )
    unknown = sorted(set(hw) - set(_HW_FIELDS))
    if unknown:
        raise TargetError(f"{origin}: hardware.{unknown[0]} is unknown; allowed: {', '.join(_HW_FIELDS)}")
    for name in _REQUIRED:
        if name not in hw:
            raise TargetError(f"{origin}: hardware.{name} is missing; allowed: a positive number")
    values = {k: _number(v, f"{origin}: hardware.{k}", k in _INT_FIELDS) for k, v in hw.items()}
    kind, name, batch, sources = _common(data, origin)
    energy = energy_from_table(data["energy"], origin) if "energy" in data else None
    return HardwareTarget(
        name=name,
        description=str(data.get("description", "")),
        kind=kind,
        default_batch_size=batch,
        path=path,
        sources=sources,
        energy=energy,
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


def load_target(target: "str | os.PathLike[str] | HardwareTarget") -> HardwareTarget:
    """Return a built-in target by name, or read a target TOML file by path."""
    if isinstance(target, HardwareTarget):
        return target
    if not isinstance(target, (str, os.PathLike)):
        raise TargetError(
            f"target={target!r} is not a target name or path; allowed: {', '.join(list_targets())} or a path to a .toml target file"
        )
    text = str(target)
    builtin = BUILTIN_DIR / f"{text}.toml"
    if isinstance(target, str) and "/" not in text and not text.endswith(".toml"):
        if not builtin.is_file():
            raise TargetError(
                f"target={text!r} is unknown; allowed: {', '.join(list_targets())} or a path to a .toml target file"
            )
        return _cached_builtin(text)
    path = Path(target)
    if not path.is_file():
        raise TargetError(
            f"target={text!r} is not a file; allowed: {', '.join(list_targets())} or a path to a .toml target file"
        )
    return _from_mapping(_read(path, text), text, str(path.resolve()))


_BUILTIN_CACHE: dict[str, HardwareTarget] = {}


def _cached_builtin(name: str) -> HardwareTarget:
    if name not in _BUILTIN_CACHE:
        path = BUILTIN_DIR / f"{name}.toml"
        _BUILTIN_CACHE[name] = _from_mapping(_read(path, name), name, None)
    return _BUILTIN_CACHE[name]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    return _toml_string(str(v))


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string: a JSON string, with DEL escaped too (TOML forbids it raw)."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise TargetError(
            f"text {text!r} holds a lone surrogate; allowed: valid Unicode text (target names, descriptions, records)"
        )
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: Any) -> str:
    """A key of a free-form table: bare when TOML allows it, else quoted."""
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def target_toml(target: HardwareTarget, comments: dict[str, str] | None = None) -> str:
    """TOML text of ``target`` (``comments``: a trailing comment per field of its model table)."""
    comments = comments or {}
    lines = [
        f"# dynas target {target.name!r} ({target.kind}); written by dynas, readable by any command's --target",
        f"name = {_toml_value(target.name)}",
        f"description = {_toml_value(target.description)}",
        f"kind = {_toml_value(target.kind)}",
        f"default_batch_size = {target.default_batch_size}",
        "",
    ]
    if target.kind == "cpu":
        assert target.cpu is not None
        lines.append("[cpu]")
        lines.append(f"threads = {target.threads}")
        lines.append(f"column_block = {target.column_block}  # output columns a convolution computes at once")
        for k, v in target.cpu._asdict().items():
            note = f"  # {comments[k]}" if k in comments else ""
            lines.append(f"{k} = {_toml_value(v)}{note}")
    else:
        lines.append("[hardware]")
        lines += [f"{k} = {_toml_value(getattr(target, k))}" for k in _HW_FIELDS]
        if target.energy is not None:
            lines += ["", "[energy]"] + [f"{k} = {_toml_value(getattr(target.energy, k))}" for k in ENERGY_FIELDS]
    for title, table in (
        ("environment", target.environment),
        ("fit", target.fit),
        ("static_ms", target.static_ms),
        ("sources", target.sources),
    ):
        if table:
            lines += ["", f"[{title}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write_target(target: HardwareTarget, path: "str | Path", comments: dict[str, str] | None = None) -> Path:
    """Write ``target`` as TOML to ``path`` atomically, after checking that it reads back."""
    out = Path(path)
    text = target_toml(target, comments)
    try:
        _from_mapping(tomllib.loads(text), str(out), None)  # round-trip check, before anything is written
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"target {target.name!r} cannot be written as TOML: {exc}") from None
    try:
        return atomic_write_text(out, text, TargetError)
    except OSError as exc:
        raise TargetError(f"output={str(out)!r} cannot be written: {exc.strerror}") from None
