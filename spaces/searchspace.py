"""The Optuna search space of dynamic configurations for one backbone.

A :class:`SearchSpace` is a plain frozen dataclass of options; :meth:`SearchSpace.suggest` turns an
Optuna trial into a validated :class:`~dynas.spaces.config.ArchConfig` through a conditional
space.  For every stage ``i``:

* ``s{i}_paradigm`` -- categorical over the paradigms allowed at that stage;
* ``s{i}_spatial_granularity`` -- for ``spatial`` and ``spatial+channel``: categorical over the
  patch sides that divide the stage's output map (intersected with the user's restriction);
* ``s{i}_channel_granularity`` -- for ``channel``, ``spatial+channel``, ``layer+channel``:
  categorical over the channel-group sizes valid for the stage's gated width (intersected too);
* ``s{i}_rate`` -- every paradigm but ``static``: float on the grid
  ``rate_min, rate_min + rate_step, ..., rate_max`` (rounded to 4 decimals);
* ``s{i}_channel_rate`` -- for the combined paradigms: same grid.

With ``exit_heads`` (a search with latency budgets, ``docs/search.md``), early exits join the
space: ``s{i}_exit`` (bool, every stage but the last, whose exit is the network's own head) and,
when more than one head type is allowed and at least one exit is placed, ``exit_head``
(categorical over ``exit_heads``).  The conv head keeps its default width.

The distribution of a parameter depends only on the backbone, the input size and the options, so
it is the same in every trial of a study, as Optuna requires.  A stage where a restriction leaves
no valid granularity loses the paradigms that need one; a stage left with no paradigm at all is a
:class:`~dynas.errors.ConfigError`, raised when the space is constructed.

:meth:`SearchSpace.to_dict` / :meth:`SearchSpace.from_dict` store the options in a study's user
attributes; :meth:`SearchSpace.params_of` gives the Optuna params of a config (for
``study.enqueue_trial``) and :meth:`SearchSpace.config_from_params` rebuilds a config from a
finished trial's ``params``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

from dynas.checks import check_choice
from dynas.errors import ConfigError
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import (
    EXIT_HEADS,
    PARADIGMS,
    ArchConfig,
    StageConfig,
    check_paradigm,
    load_config,
    uses_channel,
    uses_spatial,
)
from dynas.spaces.config import (
    channel_granularities as _valid_channel,
)
from dynas.spaces.config import (
    spatial_granularities as _valid_spatial,
)

__all__ = ["SearchSpace", "SpaceOptions", "StageOptions", "param_name"]

_COMBINED = ("spatial+channel", "layer+channel")
_RATE_DECIMALS = 4
_TOL = 1e-9
_FIELDS = (
    "backbone",
    "input_size",
    "paradigms",
    "spatial_granularities",
    "channel_granularities",
    "rate_min",
    "rate_max",
    "rate_step",
    "exit_heads",
)


def param_name(stage: int, field: str) -> str:
    """Optuna parameter name of ``field`` at ``stage``, e.g. ``param_name(0, "rate") == "s0_rate"``."""
    return f"s{stage}_{field}"


@dataclass(frozen=True)
class StageOptions:
    """What one stage may choose from (after restrictions)."""

    stage: int
    paradigms: tuple[str, ...]
    spatial_granularities: tuple[int, ...]
    channel_granularities: tuple[int, ...]


def _fmt(values: Sequence[object]) -> str:
    return ", ".join(str(v) for v in values)


def _number(value: Any, name: str, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} is not a number; allowed: {allowed}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name}={value!r} is not finite; allowed: {allowed}")
    if abs(round(v, _RATE_DECIMALS) - v) > _TOL:
        raise ConfigError(f"{name}={value!r} has more than {_RATE_DECIMALS} decimals; allowed: a multiple of 0.0001")
    return round(v, _RATE_DECIMALS)


def _exit_heads(value: Any) -> tuple[str, ...] | None:
    """``None`` (no exits in the space) or the head types, canonical order, duplicates dropped."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(
            f"exit_heads={value!r} is not a non-empty list; allowed: null (no exits) or a list of {_fmt(EXIT_HEADS)}"
        )
    for h in value:
        check_choice("exit_heads", h, EXIT_HEADS)
    return tuple(h for h in EXIT_HEADS if h in value)


def _paradigms(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"paradigms={value!r} is not a list; allowed: a non-empty list of {_fmt(PARADIGMS)}")
    if not value:
        raise ConfigError(f"paradigms=[] is empty; allowed: a non-empty list of {_fmt(PARADIGMS)}")
    for p in value:
        if p not in PARADIGMS:
            raise ConfigError(f"paradigms: {p!r} is unknown; allowed: {_fmt(PARADIGMS)}")
    return tuple(p for p in PARADIGMS if p in value)  # canonical order, duplicates dropped


def _granularities(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}={value!r} is not a list; allowed: null or a non-empty list of positive integers")
    if not value:
        raise ConfigError(
            f"{name}=[] is empty; allowed: null (no restriction) or a non-empty list of positive integers"
        )
    for g in value:
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigError(f"{name}: {g!r} is not a positive integer; allowed: a list of positive integers")
    return tuple(sorted(set(int(g) for g in value)))


@dataclass(frozen=True, kw_only=True)
class SpaceOptions:
    """What a search may choose from, for any backbone (``dynas search --paradigms``,
    ``--spatial-granularities``, ``--channel-granularities``, ``--rate-min/max/step``).

    ``paradigms`` are allowed everywhere they are possible (all of them, the default, means every
    paradigm the backbone offers, :attr:`~dynas.spaces.backbones.BackboneSpec.paradigms`; naming
    one it does not offer is an error); ``spatial_granularities`` /
    ``channel_granularities`` (``None`` = all valid values) restrict the granularities to the
    listed values where they are valid for a stage; rates are searched on the grid
    ``rate_min .. rate_max`` with ``rate_step`` (at most 4 decimals each).  ``exit_heads``
    (``None``: no exits, the default) puts early exits in the space, with these head types
    (``dynas search --exit-heads``; a search with budgets defaults it to ``("light",)``).  Kept as given, except
    that lists and comma-separated strings become tuples (so that options compare and hash by
    value); :class:`SearchSpace` checks them against a backbone.
    """

    paradigms: tuple[str, ...] = PARADIGMS
    spatial_granularities: tuple[int, ...] | None = None
    channel_granularities: tuple[int, ...] | None = None
    rate_min: float = 0.1
    rate_max: float = 1.0
    rate_step: float = 0.05
    exit_heads: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("paradigms", "spatial_granularities", "channel_granularities", "exit_heads"):
            given = value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(","))
            if value is not None and (not isinstance(value, tuple) or value is not given):
                object.__setattr__(self, name, tuple(value))

    def to_kwargs(self) -> dict[str, Any]:
        """These options as keyword arguments (``SearchSpace(backbone, input_size, **options.to_kwargs())``)."""
        return {f.name: getattr(self, f.name) for f in fields(SpaceOptions)}


@dataclass(frozen=True)
class SearchSpace(SpaceOptions):
    """The search over dynamic configs of ``backbone`` at ``input_size`` with the options of
    :class:`SpaceOptions` (keyword arguments: ``SearchSpace("resnet50", paradigms=...)``).

    Options are checked and normalised on construction (``input_size`` becomes ``(H, W)``, lists
    become sorted tuples); a bad option raises :class:`ConfigError`.
    """

    backbone: str
    input_size: Any = 224

    def __post_init__(self) -> None:
        # Replaces SpaceOptions.__post_init__: a space takes lists only, not comma-separated text.
        if not isinstance(self.backbone, str):
            raise ConfigError(f"backbone={self.backbone!r} is not a string; allowed: a backbone name")
        spec = get_backbone(self.backbone, self.input_size)  # checks name and size
        set_ = object.__setattr__  # normalise the options of this frozen dataclass
        set_(self, "input_size", spec.input_hw)
        paradigms = _paradigms(self.paradigms)
        if paradigms == PARADIGMS:  # the default, "all": every paradigm the backbone offers
            paradigms = spec.paradigms
        for p in paradigms:
            check_paradigm(spec, p, "paradigms")
        set_(self, "paradigms", paradigms)
        set_(self, "spatial_granularities", _granularities(self.spatial_granularities, "spatial_granularities"))
        set_(self, "channel_granularities", _granularities(self.channel_granularities, "channel_granularities"))
        lo = _number(self.rate_min, "rate_min", "a number in (0, 1]")
        hi = _number(self.rate_max, "rate_max", "a number in [rate_min, 1]")
        step = _number(self.rate_step, "rate_step", "a number > 0")
        if not 0.0 < lo <= 1.0:
            raise ConfigError(f"rate_min={self.rate_min!r} is out of range; allowed: a number in (0, 1]")
        if not lo <= hi <= 1.0:
            raise ConfigError(f"rate_max={self.rate_max!r} is out of range; allowed: a number in [rate_min={lo}, 1]")
        if step <= 0.0:
            raise ConfigError(f"rate_step={self.rate_step!r} is not positive; allowed: a number > 0")
        n = (hi - lo) / step
        if abs(hi - lo - round(n) * step) > _TOL:
            raise ConfigError(
                f"rate_step={self.rate_step!r} does not divide rate_max - rate_min = {hi - lo:.4g}; "
                f"allowed: a step that reaches rate_max from rate_min in whole steps"
            )
        set_(self, "rate_min", lo)
        set_(self, "rate_max", hi)
        set_(self, "rate_step", step)
        set_(self, "exit_heads", _exit_heads(self.exit_heads))
        if self.exit_heads is not None:  # the backbone must take exits (DenseNet does not yet): the config says why
            ArchConfig(self.backbone, self.input_size, ArchConfig.static(self.backbone, self.input_size).stages, (0,))
        _ = self._stage_options  # resolve per-stage choices now, so errors surface at construction

    # ------------------------------------------------------------------ derived

    @cached_property
    def _stage_options(self) -> tuple[StageOptions, ...]:
        spec = get_backbone(self.backbone, self.input_size)
        out = []
        for i in range(spec.num_stages):
            sg = _valid_spatial(spec, i)
            cg = _valid_channel(spec, i)
            if self.spatial_granularities is not None:
                sg = tuple(g for g in sg if g in self.spatial_granularities)
            if self.channel_granularities is not None:
                cg = tuple(g for g in cg if g in self.channel_granularities)
            ps = tuple(
                p for p in self.paradigms if not (uses_spatial(p) and not sg) and not (uses_channel(p) and not cg)
            )
            if not ps:
                h, w = spec.stage_out_hw(i)
                raise ConfigError(
                    f"stage {i}: no paradigm left of {_fmt(self.paradigms)} (spatial granularities valid for "
                    f"its {h}x{w} map: {_fmt(_valid_spatial(spec, i))}; channel granularities valid for width "
                    f"{spec.stage_width(i)}: {_fmt(_valid_channel(spec, i))}); allowed: add 'static' or "
                    f"granularities valid at this stage"
                )
            out.append(
                StageOptions(i, ps, sg if any(map(uses_spatial, ps)) else (), cg if any(map(uses_channel, ps)) else ())
            )
        dropped = [p for p in self.paradigms if not any(p in o.paradigms for o in out)]
        if dropped:
            warnings.warn(
                f"{self.backbone}: paradigm(s) {_fmt(dropped)} are possible at no stage with "
                f"spatial_granularities={self.spatial_granularities}, "
                f"channel_granularities={self.channel_granularities}; they will not be searched",
                stacklevel=5,  # warn at the caller of SearchSpace(...)
            )
        return tuple(out)

    @property
    def num_stages(self) -> int:
        return len(self._stage_options)

    def stage_options(self, stage: int) -> StageOptions:
        """Paradigms and granularities that ``stage`` chooses from."""
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ConfigError(f"stage={stage!r} does not exist; allowed: 0 .. {self.num_stages - 1}")
        return self._stage_options[stage]

    @property
    def rates(self) -> tuple[float, ...]:
        """Every rate on the grid, rounded to 4 decimals."""
        n = round((self.rate_max - self.rate_min) / self.rate_step)
        return tuple(round(self.rate_min + k * self.rate_step, _RATE_DECIMALS) for k in range(n + 1))

    def num_configs(self) -> int:
        """Number of distinct configs in the space (exact; may be astronomically large)."""
        r = len(self.rates)
        total = 1
        for o in self._stage_options:
            s, c = len(o.spatial_granularities), len(o.channel_granularities)
            per = {
                "static": 1,
                "spatial": s * r,
                "channel": c * r,
                "layer": r,
                "spatial+channel": s * c * r * r,
                "layer+channel": c * r * r,
            }
            total *= sum(per[p] for p in o.paradigms)
        if self.exit_heads is not None:  # no exit, or a non-empty set of exit stages with one head type
            total *= 1 + (2 ** len(self.exit_stages) - 1) * len(self.exit_heads)
        return total

    @property
    def exit_stages(self) -> tuple[int, ...]:
        """Stages that may get an exit: every stage but the last (none without ``exit_heads``)."""
        return () if self.exit_heads is None else tuple(range(self.num_stages - 1))

    # ------------------------------------------------------------------ sampling

    def _assemble(self, pick: Callable[[str, tuple | None], Any]) -> ArchConfig:
        """Build a config by asking ``pick(param_name, choices)`` for each parameter in order;
        ``choices`` is ``None`` for a rate (a float on the rate grid)."""
        stages = []
        for o in self._stage_options:
            i = o.stage
            p = pick(param_name(i, "paradigm"), o.paradigms)
            if p == "static":
                stages.append(StageConfig())
                continue
            sg = pick(param_name(i, "spatial_granularity"), o.spatial_granularities) if uses_spatial(p) else None
            cg = pick(param_name(i, "channel_granularity"), o.channel_granularities) if uses_channel(p) else None
            rate = pick(param_name(i, "rate"), None)
            channel_rate = pick(param_name(i, "channel_rate"), None) if p in _COMBINED else None
            stages.append(
                StageConfig(
                    paradigm=p, rate=rate, spatial_granularity=sg, channel_granularity=cg, channel_rate=channel_rate
                )
            )
        exits = tuple(s for s in self.exit_stages if pick(param_name(s, "exit"), (False, True)))
        head = self.exit_heads[0] if exits else EXIT_HEADS[0]
        if exits and len(self.exit_heads) > 1:
            head = pick("exit_head", self.exit_heads)
        return ArchConfig(self.backbone, self.input_size, tuple(stages), exits, head)

    def suggest(self, trial: Any) -> ArchConfig:
        """Sample a config with ``trial`` (an ``optuna.Trial``); always a valid config."""

        def pick(name: str, choices: tuple | None) -> Any:
            if choices is None:
                v = trial.suggest_float(name, self.rate_min, self.rate_max, step=self.rate_step)
                return round(v, _RATE_DECIMALS)
            return trial.suggest_categorical(name, choices)

        return self._assemble(pick)

    def config_from_params(self, params: Mapping[str, Any]) -> ArchConfig:
        """The config that :meth:`suggest` returns for trial parameters ``params`` (e.g.
        ``FrozenTrial.params``).  Raises :class:`ConfigError` if a parameter is missing or outside
        the space; parameters that the config does not use are ignored."""

        def pick(name: str, choices: tuple | None) -> Any:
            if name not in params:
                raise ConfigError(f"params: {name!r} is missing; the search space needs it for this config")
            return self._check(name, params[name], choices)

        return self._assemble(pick)

    def params_of(self, config: Any) -> dict[str, Any]:
        """Optuna parameters that make :meth:`suggest` return ``config`` (for
        ``study.enqueue_trial``).  Raises :class:`ConfigError` if ``config`` is not in the space."""
        cfg = load_config(config)
        if (cfg.backbone, cfg.input_size) != (self.backbone, self.input_size):
            raise ConfigError(
                f"config is for {cfg.backbone} at {cfg.input_size}; allowed: {self.backbone} at {self.input_size}"
            )
        params: dict[str, Any] = {}
        for i, st in enumerate(cfg.stages):
            values = {"paradigm": st.paradigm}
            if st.paradigm != "static":
                values["rate"] = st.rate
                if uses_spatial(st.paradigm):
                    values["spatial_granularity"] = st.spatial_granularity
                if uses_channel(st.paradigm):
                    values["channel_granularity"] = st.channel_granularity
                if st.paradigm in _COMBINED:
                    values["channel_rate"] = st.channel_rate
            for field, v in values.items():
                params[param_name(i, field)] = v
        if cfg.exits and self.exit_heads is None:
            raise ConfigError(
                f"config has exits {list(cfg.exits)}; allowed: configs without exits (this space has no exits)"
            )
        params.update({param_name(s, "exit"): s in cfg.exits for s in self.exit_stages})
        if cfg.exits and self.exit_heads is not None and len(self.exit_heads) > 1:
            params["exit_head"] = cfg.exit_head
        elif cfg.exits:
            check_choice("exit_head", cfg.exit_head, self.exit_heads, problem="is not in the search space")
        # One check path for both directions: rebuilding must validate every value.
        self.config_from_params(params)
        return params

    def _check(self, name: str, value: Any, choices: tuple | None) -> Any:
        if choices is not None:
            return check_choice(name, value, choices, problem="is not in the search space")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} is not a number; allowed: {self._grid_text()}")
        k = (value - self.rate_min) / self.rate_step
        if not (self.rate_min - _TOL <= value <= self.rate_max + _TOL) or abs(k - round(k)) > 1e-6:
            raise ConfigError(f"{name}={value!r} is not on the rate grid; allowed: {self._grid_text()}")
        return round(float(value), _RATE_DECIMALS)

    def _grid_text(self) -> str:
        return f"{self.rate_min:g} .. {self.rate_max:g} in steps of {self.rate_step:g}"

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable options (what :meth:`from_dict` reads back)."""
        h, w = self.input_size
        return {
            "backbone": self.backbone,
            "input_size": h if h == w else [h, w],
            "paradigms": list(self.paradigms),
            "spatial_granularities": None if self.spatial_granularities is None else list(self.spatial_granularities),
            "channel_granularities": None if self.channel_granularities is None else list(self.channel_granularities),
            "rate_min": self.rate_min,
            "rate_max": self.rate_max,
            "rate_step": self.rate_step,
            # only with exits, so that spaces without exits store what they always stored
            **({"exit_heads": list(self.exit_heads)} if self.exit_heads is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchSpace":
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"search space={type(data).__name__} is not an object; allowed: an object with {_fmt(_FIELDS)}"
            )
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"search space key {unknown[0]!r} is unknown; allowed: {_fmt(_FIELDS)}")
        if "backbone" not in data:
            raise ConfigError("search space key 'backbone' is missing; allowed: a backbone name")
        return cls(**dict(data))

    def describe(self) -> str:
        """One line for humans, e.g. ``resnet50 @ 224x224, 4 stages; paradigms ...; rates ...``."""
        h, w = self.input_size
        parts = [
            f"{self.backbone} @ {h}x{w}, {self.num_stages} stages",
            f"paradigms {_fmt(self.paradigms)}",
            f"rates {self._grid_text()} ({len(self.rates)} values)",
        ]
        if any(uses_spatial(p) for p in self.paradigms):
            parts.append("S per stage " + " / ".join(_fmt(o.spatial_granularities) or "-" for o in self._stage_options))
        if any(uses_channel(p) for p in self.paradigms):
            parts.append("G per stage " + " / ".join(_fmt(o.channel_granularities) or "-" for o in self._stage_options))
        if self.exit_heads is not None:
            parts.append(f"exits after any of stages {_fmt(self.exit_stages)} ({'/'.join(self.exit_heads)} head)")
        parts.append(f"{self.num_configs():.3g} configs")
        return "; ".join(parts)
