"""What a search is told (:class:`SearchOptions`) and what it resolves to (:class:`SearchPlan`).

::

    options = SearchOptions(backbone="resnet50", target="a100", trials=200)
    plan = plan_search(options)   # validates everything; touches no file

:class:`SearchOptions` is a plain frozen dataclass.  The options of the search space are one
:class:`~dynas.spaces.searchspace.SpaceOptions` (``space``) and those of early stopping one
:class:`~dynas.search.stopping.StopRule` (``stop``); their fields may also be given and read by
their flat names (:data:`FLAT_OPTIONS`), as ``dynas search`` spells them::

    SearchOptions(rate_min=0.2, early_stop="halving")
    SearchOptions(space=SpaceOptions(rate_min=0.2), stop=StopRule("halving"))   # the same options

:func:`plan_search` resolves the target, batch size, search space, proxy, storage URL and study
name and raises a one-line :class:`~dynas.errors.DynasError` for any bad option, before anything
is written.  With ``budgets_ms``, ``budgets_mj`` or ``budget_ratios`` the search places early
exits and scores each trial at every budget (:mod:`dynas.search.budgets`); the budgets' unit is
the objective's (energy budgets: ``objective="energy"``, the default with ``budgets_mj``).
:meth:`SearchPlan.study_attrs` is what a study stores about how it was run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import optuna

import dynas
from dynas.checks import check_choice, check_int, check_positive
from dynas.errors import ConfigError, StudyError
from dynas.predictors.energy import no_energy_error
from dynas.predictors.latency import predict
from dynas.predictors.proxy import AccuracyProxy, get_proxy
from dynas.predictors.targets import HardwareTarget, load_target
from dynas.search.budgets import BUDGET_UNITS, check_budgets, check_reachable, static_budget_top1
from dynas.search.samplers import SAMPLERS, make_sampler
from dynas.search.stopping import StopRule
from dynas.search.storage import DEFAULT_JOURNAL, DEFAULT_STORAGE, parse_storage_url
from dynas.spaces.backbones import parse_input_size
from dynas.spaces.config import ArchConfig
from dynas.spaces.searchspace import SearchSpace, SpaceOptions

__all__ = [
    "DIRECTIONS",
    "OBJECTIVE_NAMES",
    "OBJECTIVES",
    "objective_names",
    "FLAT_OPTIONS",
    "SearchOptions",
    "SearchPlan",
    "plan_search",
    "json_ready",
]

#: study directions, in the order of the objective values
DIRECTIONS = ("minimize", "maximize")
#: ``--objective`` -> the name of the first objective value (the cost minimised), with its unit
OBJECTIVES: dict[str, str] = {"latency": "latency_ms", "energy": "energy_mj"}
#: names of the objective values (``trial.values[i]``) of the default (latency) objective
OBJECTIVE_NAMES = ("latency_ms", "top1")


def objective_names(objective: str = "latency") -> tuple[str, str]:
    """Names of the objective values (``trial.values[i]``) of a search minimising ``objective``:
    ``("latency_ms", "top1")`` or ``("energy_mj", "top1")`` (both for the whole batch)."""
    check_choice("objective", objective, list(OBJECTIVES))
    return OBJECTIVES[objective], "top1"


#: flat name -> (field of SearchOptions, field of that one): the names ``SearchOptions(...)``
#: also takes, and reads, for the options of the search space and of early stopping
FLAT_OPTIONS: dict[str, tuple[str, str]] = {
    **{f.name: ("space", f.name) for f in dataclasses.fields(SpaceOptions)},
    "early_stop": ("stop", "name"),  # stopper of dynas.search.stopping.STOPPERS; acts only on proxies with checkpoints
    "stop_margin": ("stop", "margin"),  # top-1 points (dominance)
    "stop_min_trials": (
        "stop",
        "min_trials",
    ),  # dominance: dominating trials needed; halving: trials at the checkpoint needed
    "stop_eta": ("stop", "eta"),  # halving: the best 1/eta go on
}


def _takes_flat_names(cls: type) -> type:
    """Let ``cls(...)`` and ``dataclasses.replace`` take the names of :data:`FLAT_OPTIONS`
    (each replaces that field of the nested options, given or default), and make them readable
    attributes."""
    generated = cls.__init__
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kw: Any) -> None:
        nested: dict[str, dict[str, Any]] = {}
        for flat, (outer, inner) in FLAT_OPTIONS.items():
            if flat in kw:
                nested.setdefault(outer, {})[inner] = kw.pop(flat)
        for outer, changes in nested.items():
            kw[outer] = dataclasses.replace(kw.get(outer, defaults[outer]), **changes)
        generated(self, *args, **kw)

    cls.__init__ = __init__  # type: ignore[misc]
    for flat, (outer, inner) in FLAT_OPTIONS.items():
        setattr(cls, flat, property(attrgetter(f"{outer}.{inner}"), doc=f"``{outer}.{inner}``"))
    return cls


@_takes_flat_names
@dataclass(frozen=True)
class SearchOptions:
    """Everything ``dynas search`` can be told.  Defaults are the embedded default search."""

    backbone: str = "resnet101"
    target: str = "v100"  # built-in name or path to a target TOML file
    input_size: Any = 224  # int or (H, W)
    batch_size: int | None = None  # None: the target's default batch size
    #: the cost minimised beside top-1, per batch: "latency" (ms) or "energy" (mJ); None: "energy" with
    #: budgets_mj, else "latency" (resolved when the options are made)
    objective: str | None = None
    proxy: str = "prior"
    proxy_options: Mapping[str, Any] | None = None  # keyword options of the proxy (finetune: data, steps, ...)
    stop: StopRule = StopRule()  # early stopping (flat names: early_stop, stop_margin, stop_min_trials, stop_eta)
    trials: int = 500  # total finished trials (complete, or stopped early) the study should hold
    timeout_s: float | None = None  # stop this run after this many seconds
    sampler: str = "tpe"
    seed: int = 0
    storage: Any = None  # storage URL (or an optuna storage); None: DEFAULT_STORAGE, or DEFAULT_JOURNAL if workers > 1
    workers: int = 1  # worker processes on this machine (joblib); trials is still the study's total
    heartbeat_s: float = 10.0  # workers beat this often; a trial silent for 2x this is failed and retried
    study_name: str | None = (
        None  # None: "{backbone}-{target}-b{batch}-{H}x{W}-{proxy}", plus "-energy" for that objective
    )
    max_latency_ms: float | None = None  # constraint on the predicted latency of one batch (either objective)
    max_latency_ratio: float | None = None  # constraint on dynamic / static latency
    space: SpaceOptions = SpaceOptions()  # search-space options (flat names: paradigms, ..., rate_step, exit_heads)
    show_progress: bool = True
    #: latency budgets (ms, whole batch): exits join the space, trials score their mean top-1 over the budgets
    budgets_ms: tuple[float, ...] | None = None
    budgets_mj: tuple[float, ...] | None = None  # energy budgets (mJ, whole batch), with objective="energy"
    #: the same, as ratios of the static network's latency (its energy with objective="energy")
    budget_ratios: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Scalar checks only; the backbone, target, proxy and space are checked by plan_search.
        check_int("trials", self.trials, minimum=1, numpy=True)
        check_int("seed", self.seed, minimum=0, maximum=2**32 - 1, numpy=True)
        check_int("workers", self.workers, minimum=1, maximum=256, numpy=True)
        _check_positive("heartbeat_s", self.heartbeat_s)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1, numpy=True)
        for name in ("timeout_s", "max_latency_ms", "max_latency_ratio"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value)
        if self.proxy_options is not None and not isinstance(self.proxy_options, Mapping):
            raise ConfigError(
                f"proxy_options={self.proxy_options!r} is not a mapping; allowed: a dict of keyword options"
            )
        check_choice("sampler", self.sampler, sorted(SAMPLERS))
        if self.objective is None:
            object.__setattr__(self, "objective", "energy" if self.budgets_mj is not None else "latency")
        check_choice("objective", self.objective, list(OBJECTIVES))
        self._check_budgets()
        if self.study_name is not None and (not isinstance(self.study_name, str) or not self.study_name.strip()):
            raise StudyError(f"study_name={self.study_name!r} is empty; allowed: a non-empty string")
        for name, kind in (("space", SpaceOptions), ("stop", StopRule)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not a {kind.__name__}; allowed: {kind.__name__}(...)"
                )

    def _check_budgets(self) -> None:
        names = ("budgets_ms", "budgets_mj", "budget_ratios")
        for name in names:
            object.__setattr__(self, name, check_budgets(name, getattr(self, name)))
        given = [n for n in names if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(
                f"{given[1]}={list(getattr(self, given[1]))!r} is given with {given[0]}; allowed: one of the two"
            )
        if given and given[0] != "budget_ratios" and given[0] != f"budgets_{self.budget_unit}":
            want = "energy" if given[0] == "budgets_mj" else "latency"
            raise ConfigError(
                f"objective={self.objective!r} is not supported with {given[0]}; allowed: objective={want!r} "
                "(the budgets' unit is the objective's: budgets_ms with latency, budgets_mj with energy)"
            )
        if not given and isinstance(self.space, SpaceOptions) and self.space.exit_heads is not None:
            raise ConfigError(
                f"exit_heads={self.space.exit_heads!r} needs budgets; allowed: exit_heads with budgets_ms, "
                "budgets_mj or budget_ratios"
            )

    @property
    def has_budgets(self) -> bool:
        """Exits are searched and trials scored per budget."""
        return any(getattr(self, n) is not None for n in ("budgets_ms", "budgets_mj", "budget_ratios"))

    @property
    def budget_unit(self) -> str:
        """The unit of the budgets (:data:`~dynas.search.budgets.BUDGET_UNITS`): the objective's."""
        return "mj" if self.objective == "energy" else "ms"


def _check_positive(name: str, value: Any) -> None:
    check_positive(name, value, problem="is not a positive number", allowed="a finite number > 0")


@dataclass(frozen=True)
class SearchPlan:
    """A validated search: what :func:`~dynas.search.study.run_search` will do, resolved from
    :class:`SearchOptions`."""

    options: SearchOptions
    target: HardwareTarget
    target_label: str  # the target's name in the study name (a target file's stem)
    batch_size: int
    input_size: tuple[int, int]
    space: SearchSpace
    proxy: AccuracyProxy = field(compare=False)
    storage_url: Any  # str URL, or an optuna storage passed through the Python API
    study_name: str
    stop_rule: StopRule = StopRule()
    #: the budgets trials are scored at (whole batch, sorted; ratios resolved), in budget_unit; None: no budgets
    budgets: tuple[float, ...] | None = None
    budget_unit: str = "ms"  # "ms" (latency budgets) or "mj" (energy budgets)

    @property
    def budgets_ms(self) -> tuple[float, ...] | None:
        """The latency budgets (ms, whole batch); None without budgets or with energy budgets."""
        return self.budgets if self.budget_unit == "ms" else None

    @property
    def budgets_mj(self) -> tuple[float, ...] | None:
        """The energy budgets (mJ, whole batch); None without budgets or with latency budgets."""
        return self.budgets if self.budget_unit == "mj" else None

    @property
    def objective_names(self) -> tuple[str, str]:
        """Names of the objective values: ``(latency_ms | energy_mj, top1)``."""
        return objective_names(self.options.objective)

    def study_attrs(self) -> dict[str, Any]:
        """Study user attrs stored at creation (JSON-ready); also the reference for resuming."""
        o = self.options
        static = ArchConfig.static(o.backbone, self.input_size)
        static_pred = predict(static, self.target, self.batch_size)
        static_top1 = float(self.proxy.static_score(static))
        path = getattr(self.target, "path", None)
        budgets = {}
        if self.budgets is not None:
            chance = float(self.proxy.chance_top1(static))
            budgets = {
                "budget_ratios": o.budget_ratios,
                "chance_top1": chance,
                "static_budget_top1": static_budget_top1(
                    static_pred, static_top1, self.budgets, chance, self.budget_unit
                ),
            }
            if self.budgets_mj is not None:  # latency studies keep the attrs they always had
                budgets["budgets_mj"] = self.budgets_mj
        return json_ready(
            {
                "dynas_version": dynas.__version__,
                "objective": o.objective,
                "objectives": list(self.objective_names),
                "backbone": o.backbone,
                "input_size": list(self.input_size),
                "target": self.target_label,
                "target_path": str(Path(path).resolve()) if path is not None else None,
                "target_spec": _target_dict(self.target),
                "batch_size": self.batch_size,
                "proxy": o.proxy,
                "proxy_options": self.proxy.options(),
                "early_stop": self.stop_rule.to_dict(),
                "search_space": self.space.to_dict(),
                "max_latency_ms": o.max_latency_ms,
                "max_latency_ratio": o.max_latency_ratio,
                "static_latency_ms": static_pred.latency_ms,
                "static_latency_ms_per_image": static_pred.latency_ms_per_image,
                "static_energy_mj": static_pred.static_energy_mj,  # None: the target predicts no energy
                "static_energy_mj_per_image": static_pred.static_energy_mj_per_image,
                "static_top1": static_top1,
                "reference_top1": float(self.proxy.reference_top1(static)),
                "sampler": o.sampler,
                "seed": o.seed,
                "budgets_ms": self.budgets_ms,  # None without budgets (as studies made before budgets read)
                **budgets,
            }
        )


def json_ready(obj: Any) -> Any:
    """``obj`` as stored in a study's attrs (JSON): tuples become lists, paths strings, NumPy
    scalars Python numbers, so that a stored value compares equal to a freshly computed one."""

    def default(x: Any) -> Any:
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        return str(x)

    return json.loads(json.dumps(obj, default=default))


def _target_dict(target: Any) -> dict[str, Any]:
    if hasattr(target, "to_dict"):
        d = dict(target.to_dict())
    elif dataclasses.is_dataclass(target):
        d = dataclasses.asdict(target)
    else:
        d = dict(vars(target))
    # Where the file lives is not part of what the target is (stored as target_path instead).
    d.pop("path", None)
    return d


def plan_search(options: SearchOptions) -> SearchPlan:
    """Validate ``options`` and resolve every default; writes nothing.

    Raises :class:`~dynas.errors.DynasError` (one line) for any bad option.
    """
    o = options
    hw = parse_input_size(o.input_size)
    space_kw = o.space.to_kwargs()
    if o.has_budgets and space_kw["exit_heads"] is None:
        space_kw["exit_heads"] = ("light",)  # the default exit space: placements only, light heads
    space = SearchSpace(o.backbone, hw, **space_kw)
    target = o.target if not isinstance(o.target, (str, os.PathLike)) else load_target(o.target)
    path = getattr(target, "path", None)
    label = Path(path).stem if path is not None else target.name
    batch = o.batch_size if o.batch_size is not None else int(target.default_batch_size)
    proxy = get_proxy(o.proxy, **dict(o.proxy_options or {}))
    make_sampler(o.sampler, o.seed)  # raises ConfigError when it cannot be built (gp without SciPy)
    storage = o.storage if o.storage is not None else (DEFAULT_STORAGE if o.workers == 1 else DEFAULT_JOURNAL)
    if isinstance(storage, str):
        parse_storage_url(storage)
    elif not isinstance(storage, optuna.storages.BaseStorage):
        raise StudyError(f"storage={storage!r} is not a database URL; allowed: e.g. {DEFAULT_STORAGE}")
    elif o.workers > 1:
        raise StudyError(
            f"workers={o.workers} needs a storage URL that other processes can open; allowed: "
            f"{DEFAULT_JOURNAL}, postgresql://..., or workers=1 with a storage object"
        )
    if o.budgets_mj is not None and getattr(target, "energy", None) is None:
        raise no_energy_error(f"budgets_mj={list(o.budgets_mj)!r}", label, "budgets_ms, or a target with [energy]")
    if o.objective == "energy" and getattr(target, "energy", None) is None:
        raise no_energy_error("objective='energy'", label, "objective='latency', or a target with [energy]")
    budgets, stop = None, o.stop
    if o.has_budgets:
        budgets, stop = _plan_budgets(o, proxy, space, target, batch, label)
    # The latency objective keeps the names studies had before there was a choice.
    suffix = "" if o.objective == "latency" else f"-{o.objective}"
    suffix += "-budgets" if budgets is not None else ""
    name = o.study_name or f"{o.backbone}-{label}-b{batch}-{hw[0]}x{hw[1]}-{o.proxy}{suffix}"
    return SearchPlan(o, target, label, batch, hw, space, proxy, storage, name, stop, budgets, o.budget_unit)


def _plan_budgets(
    o: SearchOptions, proxy: AccuracyProxy, space: SearchSpace, target: Any, batch: int, label: str
) -> tuple[tuple[float, ...], StopRule]:
    """The budgets (in the objective's unit) and the stop rule of a search with budgets; refuses what
    cannot work."""
    given = next(n for n in ("budgets_ms", "budgets_mj", "budget_ratios") if getattr(o, n) is not None)
    if not proxy.scores_exits:
        why = (
            "it has no published ImageNet accuracies of early exits to fit"
            if o.proxy == "prior"
            else "it does not report exit_top1 (AccuracyProxy.scores_exits)"
        )
        raise ConfigError(
            f"proxy={o.proxy!r} cannot score early exits, which {given} needs ({why}); "
            "allowed: --proxy finetune (measures each exit's top-1)"
        )
    if o.stop.name != "none" and o.stop != StopRule():
        raise ConfigError(
            f"early_stop={o.stop.name!r} is not allowed with {given}: checkpoints report the own head's top-1, the "
            "budget score needs every exit's at the end; allowed: early_stop='none' (the default with budgets)"
        )
    unit = o.budget_unit
    if o.budget_ratios is not None:
        static = predict(ArchConfig.static(o.backbone, space.input_size), target, batch)
        static_cost = getattr(static, BUDGET_UNITS[unit].field)  # latency_ms or energy_mj, whole batch
        budgets = tuple(r * static_cost for r in o.budget_ratios)
    else:
        budgets = tuple(getattr(o, given))
    check_reachable(budgets, space, target, batch, label, o.budget_ratios, unit)
    return budgets, StopRule("none")
