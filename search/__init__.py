"""Multi-objective search of dynamic configurations (Optuna studies)."""

from dynas.search.stopping import STOPPERS, EarlyStopper, StopRule, make_stopper, register_stopper
from dynas.search.study import (
    DEFAULT_STORAGE,
    DIRECTIONS,
    OBJECTIVE_NAMES,
    OBJECTIVES,
    SAMPLERS,
    SearchOptions,
    SearchPlan,
    finished_trials,
    list_studies,
    load_study,
    make_sampler,
    open_storage,
    plan_search,
    register_sampler,
    run_search,
)
from dynas.spaces.searchspace import SpaceOptions

__all__ = [
    "DEFAULT_STORAGE",
    "DIRECTIONS",
    "OBJECTIVE_NAMES",
    "OBJECTIVES",
    "SAMPLERS",
    "SearchOptions",
    "SearchPlan",
    "SpaceOptions",
    "register_sampler",
    "make_sampler",
    "plan_search",
    "run_search",
    "finished_trials",
    "STOPPERS",
    "EarlyStopper",
    "StopRule",
    "make_stopper",
    "register_stopper",
    "open_storage",
    "list_studies",
    "load_study",
]
