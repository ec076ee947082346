"""The canonical architecture config: frozen dataclasses with a JSON round-trip.

User-facing JSON::

    {"backbone": "resnet101", "input_size": 224,
     "stages": [{"paradigm": "spatial", "spatial_granularity": 8, "rate": 0.5},
                {"paradigm": "channel", "channel_granularity": 2, "rate": 0.5},
                {"paradigm": "layer", "rate": 0.5},
                {"paradigm": "static"}]}

Early exits (optional; see ``docs/early-exits.md``)::

    {..., "exits": [0, 2], "exit_head": "conv", "exit_width": 128, "exit_thresholds": [0.9, 0.8]}

``exits`` lists the 0-based stages after which an exit classifier sits, in increasing order; the
network's own head is always the last exit, so the last stage cannot be listed.  ``exit_head`` is
``"light"`` (the default: global average pool + linear, like the network's own head) or
``"conv"`` (1x1 conv + BN + ReLU to ``exit_width`` channels, default 128, then pool + linear).
``exit_thresholds`` (written by the threshold tool) holds one confidence threshold in [0, 1] per
entry of ``exits``: a sample leaves at the first exit whose top softmax probability reaches it.
A config without exits has none of these keys, in JSON or in memory.

``rate`` is the activation rate of the stage's *primary* decision: positions for ``spatial`` and
``spatial+channel``, channel groups for ``channel``, samples for ``layer`` and ``layer+channel``.
The combined paradigms carry the channel-group rate in ``channel_rate``.  Exported files add
keys (``predictions``, ``training``, ...); :func:`load_config` ignores those and reads the
architecture back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dynas.errors import ConfigError
from dynas.spaces.backbones import ALL_PARADIGMS, BackboneSpec, get_backbone, list_backbones

__all__ = [
    "PARADIGMS",
    "StageConfig",
    "ArchConfig",
    "load_config",
    "spatial_granularities",
    "channel_granularities",
    "uses_spatial",
    "uses_channel",
    "uses_layer",
    "budget_count",
    "stage_gate_kind",
    "stage_runs",
    "EXIT_HEADS",
    "DEFAULT_EXIT_HEAD",
    "DEFAULT_EXIT_WIDTH",
    "check_paradigm",
]

PARADIGMS: tuple[str, ...] = ALL_PARADIGMS

#: keys of an exported file that are not part of the architecture ("realised": what a finetune-proxy search's
#: export adds; "budgets": what a search with latency budgets' export adds; "trained": what dynas train adds in
#: RUN/config.json)
_EXPORT_KEYS = frozenset(
    {
        "dynas_version",
        "target",
        "batch_size",
        "predictions",
        "training",
        "laudnet_args",
        "study",
        "trial",
        "proxy",
        "notes",
        "realised",
        "trained",
        "budgets",
    }
)
_EXIT_KEYS = ("exits", "exit_head", "exit_width", "exit_thresholds")
#: exit head types: "light" = global average pool + linear; "conv" = 1x1 conv + BN + ReLU to
#: ``exit_width`` channels, then global average pool + linear
EXIT_HEADS: tuple[str, ...] = ("light", "conv")
DEFAULT_EXIT_HEAD = "light"
#: width of the "conv" exit head's 1x1 conv (128: the width of MSDNet's CIFAR classifier convs)
DEFAULT_EXIT_WIDTH = 128
_STAGE_KEYS = ("paradigm", "rate", "spatial_granularity", "channel_granularity", "channel_rate")


def uses_spatial(paradigm: str) -> bool:
    return paradigm in ("spatial", "spatial+channel")


def uses_channel(paradigm: str) -> bool:
    return paradigm in ("channel", "spatial+channel", "layer+channel")


def uses_layer(paradigm: str) -> bool:
    return paradigm in ("layer", "layer+channel")


def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def spatial_granularities(spec: BackboneSpec, stage: int) -> tuple[int, ...]:
    """Patch sides S that divide the stage's output map in both directions."""
    h, w = spec.stage_out_hw(stage)
    return tuple(d for d in _divisors(h) if w % d == 0)


def channel_granularities(spec: BackboneSpec, stage: int) -> tuple[int, ...]:
    """Channels per group G that divide the stage's gated width (and leave at least 2 groups)."""
    width = spec.stage_width(stage)
    return tuple(d for d in _divisors(width) if width // d >= 2)


def check_paradigm(spec: BackboneSpec, paradigm: str, where: str) -> None:
    """Raise :class:`ConfigError` (one line) when ``spec``'s backbone does not offer ``paradigm``."""
    if paradigm not in spec.paradigms:
        raise ConfigError(
            f"{where}: paradigm={paradigm!r} is not offered on {spec.name} ({spec.paradigm_note}); "
            f"allowed: {', '.join(spec.paradigms)}"
        )


def _rate(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}={value!r} is not a number; allowed: a number in (0, 1]")
    v = float(value)
    if not math.isfinite(v) or v <= 0.0 or v > 1.0:
        raise ConfigError(f"{where}={value!r} is out of range; allowed: a number in (0, 1]")
    return v


def _int(value: Any, where: str, allowed: tuple[int, ...], rule: str = "is not allowed") -> int:
    """Check an integer choice; ``rule`` says why a value outside ``allowed`` is rejected."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{where}={value!r} is not an integer; allowed: {_fmt(allowed)}")
    if value not in allowed:
        raise ConfigError(f"{where}={value!r} {rule}; allowed: {_fmt(allowed)}")
    return int(value)


def _fmt(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values)


def budget_count(rate: float, n: int) -> int:
    """Decisions that are on in budget mode: ``round(rate * n)`` (half up), at least 1."""
    return max(1, min(n, int(math.floor(rate * n + 0.5))))


def stage_gate_kind(spec: BackboneSpec, stage: int, st: "StageConfig") -> str | None:
    """``"layer"`` / ``"spatial"`` when the stage's blocks have one decision per sample (a layer
    gate, or a spatial gate whose one patch covers the whole map), else None."""
    if uses_layer(st.paradigm):
        return "layer"
    if uses_spatial(st.paradigm) and spec.stage_out_hw(stage) == (st.spatial_granularity,) * 2:
        return "spatial"
    return None


def stage_runs(config: "ArchConfig") -> tuple[int | None, ...]:
    """Per stage, the blocks every sample runs in budget mode when the stage's gates are one
    decision per sample (:func:`stage_gate_kind`), else None.

    round(rate x blocks), with the rounding remainder carried from stage to stage so that the
    network's total is exact to within one block (rate 0.5 on ResNet-50's 3-4-6-3: 2-2-3-1).
    """
    spec = config.spec
    carry = 0.0
    out: list[int | None] = []
    for s, st in enumerate(config.stages):
        if stage_gate_kind(spec, s, st) is None:
            out.append(None)
            continue
        depth = spec.stage_depth(s)
        want = st.rate * depth + carry
        runs = min(depth, max(1, math.floor(want + 0.5)))
        carry = want - runs
        out.append(runs)
    return tuple(out)


@dataclass(frozen=True)
class StageConfig:
    """Choices for one stage (all its blocks share them)."""

    paradigm: str = "static"
    rate: float = 1.0
    spatial_granularity: int | None = None
    channel_granularity: int | None = None
    channel_rate: float | None = None

    @property
    def spatial_rate(self) -> float:
        return self.rate if uses_spatial(self.paradigm) else 1.0

    @property
    def channel_density(self) -> float:
        if self.paradigm == "channel":
            return self.rate
        return self.channel_rate if uses_channel(self.paradigm) else 1.0

    @property
    def layer_rate(self) -> float:
        return self.rate if uses_layer(self.paradigm) else 1.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"paradigm": self.paradigm}
        if self.paradigm == "static":
            return d
        if uses_spatial(self.paradigm):
            d["spatial_granularity"] = self.spatial_granularity
        if uses_channel(self.paradigm):
            d["channel_granularity"] = self.channel_granularity
        d["rate"] = self.rate
        if self.paradigm in ("spatial+channel", "layer+channel"):
            d["channel_rate"] = self.channel_rate
        return d

    def short(self) -> str:
        """Compact form such as ``S8@0.50``, ``C2@0.50``, ``L@0.50``, ``S4@0.60+C2@0.80``."""
        p = self.paradigm
        if p == "static":
            return "static"
        if p == "spatial":
            return f"S{self.spatial_granularity}@{self.rate:.2f}"
        if p == "channel":
            return f"C{self.channel_granularity}@{self.rate:.2f}"
        if p == "layer":
            return f"L@{self.rate:.2f}"
        if p == "spatial+channel":
            return f"S{self.spatial_granularity}@{self.rate:.2f}+C{self.channel_granularity}@{self.channel_rate:.2f}"
        return f"L@{self.rate:.2f}+C{self.channel_granularity}@{self.channel_rate:.2f}"


@dataclass(frozen=True)
class ArchConfig:
    """A validated dynamic architecture: a backbone, an input size and one choice per stage."""

    backbone: str
    input_size: tuple[int, int]
    stages: tuple[StageConfig, ...]
    #: stages (0-based, increasing) followed by an exit classifier; the own head is the last exit
    exits: tuple[int, ...] = ()
    exit_head: str = DEFAULT_EXIT_HEAD
    exit_width: int = DEFAULT_EXIT_WIDTH  # used by exit_head "conv" only
    #: one confidence threshold per entry of ``exits`` (None: not computed yet)
    exit_thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Validate eagerly so that an ArchConfig in hand is always a valid one.
        _validate(self)

    @property
    def spec(self) -> BackboneSpec:
        return get_backbone(self.backbone, self.input_size)

    def to_dict(self) -> dict[str, Any]:
        h, w = self.input_size
        d: dict[str, Any] = {
            "backbone": self.backbone,
            "input_size": h if h == w else [h, w],
            "stages": [s.to_dict() for s in self.stages],
        }
        if self.exits:  # a config without exits keeps exactly the keys it always had
            d["exits"] = list(self.exits)
            d["exit_head"] = self.exit_head
            if self.exit_head == "conv":
                d["exit_width"] = self.exit_width
            if self.exit_thresholds is not None:
                d["exit_thresholds"] = list(self.exit_thresholds)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def short(self) -> str:
        """One part per stage (``S8@0.50 | static | ...``), then ``[exits 0,2 light]`` if any."""
        base = " | ".join(s.short() for s in self.stages)
        if not self.exits:
            return base
        return f"{base} [exits {','.join(str(e) for e in self.exits)} {self.exit_head}]"

    @classmethod
    def static(cls, backbone: str, input_size: Any = 224) -> "ArchConfig":
        spec = get_backbone(backbone, input_size)
        return cls(backbone, spec.input_hw, tuple(StageConfig() for _ in range(spec.num_stages)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArchConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"config={type(data).__name__} is not an object; allowed: a JSON object with backbone, input_size, stages"
            )
        unknown = sorted(set(data) - {"backbone", "input_size", "stages"} - set(_EXIT_KEYS) - _EXPORT_KEYS)
        if unknown:
            raise ConfigError(
                f"config key {unknown[0]!r} is unknown; allowed: backbone, input_size, stages, "
                f"{', '.join(_EXIT_KEYS)} (exports may add {', '.join(sorted(_EXPORT_KEYS))})"
            )
        backbone = data.get("backbone")
        if not isinstance(backbone, str):
            raise ConfigError(
                f"backbone={backbone!r} is missing or not a string; allowed: {', '.join(list_backbones())}"
            )
        spec = get_backbone(backbone, data.get("input_size", 224))
        stages_raw = data.get("stages")
        if not isinstance(stages_raw, list):
            raise ConfigError(
                f"stages={stages_raw!r} is not a list; allowed: a list of {spec.num_stages} stage objects"
            )
        stages = tuple(_stage_from_dict(i, s) for i, s in enumerate(stages_raw))
        return cls(backbone, spec.input_hw, stages, **_exits_from_dict(data))

    @classmethod
    def from_json(cls, text: str) -> "ArchConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        return cls.from_dict(data)


def _stage_from_dict(i: int, raw: Any) -> StageConfig:
    where = f"stage {i}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{where}: {raw!r} is not an object; allowed: {{"paradigm": ..., "rate": ...}}')
    unknown = sorted(set(raw) - set(_STAGE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: key {unknown[0]!r} is unknown; allowed: {', '.join(_STAGE_KEYS)}")
    paradigm = raw.get("paradigm", "static")
    if paradigm not in PARADIGMS:
        raise ConfigError(f"{where}: paradigm={paradigm!r} is unknown; allowed: {', '.join(PARADIGMS)}")
    if paradigm == "static":
        extra = [k for k in raw if k != "paradigm" and not (k == "rate" and raw[k] == 1)]
        if extra:
            raise ConfigError(f"{where}: field {extra[0]!r} is not used by paradigm 'static'; allowed: paradigm only")
        return StageConfig()
    return StageConfig(
        paradigm=paradigm,
        rate=raw.get("rate"),
        spatial_granularity=raw.get("spatial_granularity"),
        channel_granularity=raw.get("channel_granularity"),
        channel_rate=raw.get("channel_rate"),
    )


def _exits_from_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """The exit fields of a config dict (JSON lists become tuples; validation is ``_validate_exits``)."""
    if "exits" not in data:
        extra = [k for k in _EXIT_KEYS if k in data]
        if extra:
            raise ConfigError(f"config key {extra[0]!r} needs 'exits'; allowed: {extra[0]} only with a list of exits")
        return {}
    out: dict[str, Any] = {}
    for key in ("exits", "exit_thresholds"):
        raw = data.get(key)
        if key in data and raw is not None:
            if not isinstance(raw, (list, tuple)):
                what = "stage indices" if key == "exits" else "numbers in [0, 1], one per exit"
                raise ConfigError(f"{key}={raw!r} is not a list; allowed: a list of {what}")
            out[key] = tuple(raw)
    for key in ("exit_head", "exit_width"):
        if key in data:
            out[key] = data[key]
    return out


def _validate_exits(cfg: ArchConfig, spec: BackboneSpec) -> None:
    last = spec.num_stages - 1
    allowed = f"stages 0..{last - 1} ({cfg.backbone}'s stage {last} is followed by its own head, the last exit)"
    if not isinstance(cfg.exits, tuple):
        raise ConfigError(f"exits={cfg.exits!r} is not a tuple; allowed: a list of {allowed}")
    if cfg.exits and spec.family == "densenet":
        raise ConfigError(
            f"exits={list(cfg.exits)!r} on {cfg.backbone}: early exits are not built for DenseNet yet; "
            "allowed: exits on ResNet and RegNet backbones"
        )
    for e in cfg.exits:
        if isinstance(e, bool) or not isinstance(e, int):
            raise ConfigError(f"exits: {e!r} is not a stage index; allowed: {allowed}")
        if e == last:
            raise ConfigError(
                f"exits: stage {e} is the last stage, whose exit is the network's own head; allowed: {allowed}"
            )
        if not 0 <= e < last:
            raise ConfigError(f"exits: stage {e} does not exist in {cfg.backbone}; allowed: {allowed}")
    if len(set(cfg.exits)) != len(cfg.exits):
        twice = next(e for e in cfg.exits if cfg.exits.count(e) > 1)
        raise ConfigError(f"exits={list(cfg.exits)} lists stage {twice} twice; allowed: distinct stages")
    if list(cfg.exits) != sorted(cfg.exits):
        raise ConfigError(f"exits={list(cfg.exits)} is not in increasing order; allowed: {sorted(cfg.exits)}")
    if cfg.exit_head not in EXIT_HEADS:
        raise ConfigError(f"exit_head={cfg.exit_head!r} is unknown; allowed: {', '.join(EXIT_HEADS)}")
    w = cfg.exit_width
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ConfigError(f"exit_width={w!r} is not allowed; allowed: an integer >= 1")
    if cfg.exit_head != "conv" and w != DEFAULT_EXIT_WIDTH:
        raise ConfigError(
            f"exit_width={w!r} is not used by exit_head {cfg.exit_head!r}; allowed: only with exit_head 'conv'"
        )
    if not cfg.exits and (
        cfg.exit_head != DEFAULT_EXIT_HEAD or w != DEFAULT_EXIT_WIDTH or cfg.exit_thresholds is not None
    ):
        raise ConfigError(
            "exit_head, exit_width and exit_thresholds need exits; allowed: them only with a list of exits"
        )
    t = cfg.exit_thresholds
    if t is None:
        return
    if not isinstance(t, tuple) or len(t) != len(cfg.exits):
        n = len(t) if isinstance(t, (tuple, list)) else t
        raise ConfigError(
            f"exit_thresholds has {n} entries; allowed: exactly {len(cfg.exits)}, one per entry of exits "
            "(the network's own head takes every sample left)"
        )
    for i, v in enumerate(t):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"exit_thresholds[{i}]={v!r} is out of range; allowed: a number in [0, 1]")


def _validate(cfg: ArchConfig) -> None:
    spec = get_backbone(cfg.backbone, cfg.input_size)
    if not isinstance(cfg.input_size, tuple) or cfg.input_size != spec.input_hw:
        raise ConfigError(
            f"input_size={cfg.input_size!r} is not normalised; allowed: the tuple {spec.input_hw!r} (ArchConfig.from_dict normalises ints)"
        )
    if len(cfg.stages) != spec.num_stages:
        raise ConfigError(
            f"stages has {len(cfg.stages)} entries; allowed: exactly {spec.num_stages} for {cfg.backbone}"
        )
    for i, st in enumerate(cfg.stages):
        where = f"stage {i}"
        if not isinstance(st, StageConfig):
            raise ConfigError(f"{where}: {st!r} is not a StageConfig")
        p = st.paradigm
        if p not in PARADIGMS:
            raise ConfigError(f"{where}: paradigm={p!r} is unknown; allowed: {', '.join(PARADIGMS)}")
        check_paradigm(spec, p, where)
        if p == "static":
            if (st.rate, st.spatial_granularity, st.channel_granularity, st.channel_rate) != (1.0, None, None, None):
                raise ConfigError(f"{where}: paradigm 'static' takes no rate or granularity; got {st!r}")
            continue
        _rate(st.rate, f"{where}: rate")
        if uses_spatial(p):
            h, w = spec.stage_out_hw(i)
            _int(
                st.spatial_granularity,
                f"{where}: spatial_granularity",
                spatial_granularities(spec, i),
                f"does not divide the stage's {h}x{w} output map",
            )
        elif st.spatial_granularity is not None:
            raise ConfigError(
                f"{where}: field 'spatial_granularity' is not used by paradigm {p!r}; allowed: only with spatial, spatial+channel"
            )
        if uses_channel(p):
            n = spec.stage_width(i)
            _int(
                st.channel_granularity,
                f"{where}: channel_granularity",
                channel_granularities(spec, i),
                f"must divide the gated width {n} and leave at least 2 groups",
            )
        elif st.channel_granularity is not None:
            raise ConfigError(
                f"{where}: field 'channel_granularity' is not used by paradigm {p!r}; allowed: only with channel, spatial+channel, layer+channel"
            )
        if p in ("spatial+channel", "layer+channel"):
            if st.channel_rate is None:
                raise ConfigError(f"{where}: channel_rate is missing; paradigm {p!r} needs a number in (0, 1]")
            _rate(st.channel_rate, f"{where}: channel_rate")
        elif st.channel_rate is not None:
            raise ConfigError(
                f"{where}: field 'channel_rate' is not used by paradigm {p!r}; allowed: only with spatial+channel, layer+channel"
            )
    _validate_exits(cfg, spec)


def load_config(source: "ArchConfig | Mapping[str, Any] | str | os.PathLike[str]") -> ArchConfig:
    """Return an :class:`ArchConfig` from a config object, a dict, a JSON string or a JSON file path."""
    if isinstance(source, ArchConfig):
        return source
    if isinstance(source, Mapping):
        return ArchConfig.from_dict(source)
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if isinstance(source, str) and text.lstrip().startswith("{"):
            return ArchConfig.from_json(text)
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config={text!r} is not a file; allowed: a JSON file path, a JSON string or a dict")
        try:
            body = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config={text!r} cannot be read: {exc}") from None
        return ArchConfig.from_json(body)
    raise ConfigError(
        f"config={type(source).__name__} is not supported; allowed: ArchConfig, dict, JSON string or path"
    )
