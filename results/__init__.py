"""Results of a dynas search: Pareto tables, hypervolume, HTML plots and config export."""

from dynas.results.export import export_trial, laudnet_args, select_trial, training_recipe
from dynas.results.pareto import (
    CHECKPOINT_COLUMNS,
    DEFAULT_REFERENCE_LATENCY_RATIO,
    DEFAULT_REFERENCE_TOP1_DROP,
    ENERGY_COLUMNS,
    PARETO_COLUMNS,
    all_trials_table,
    checkpoints_table,
    default_reference,
    front_trials,
    hypervolume,
    hypervolume_history,
    objective_column,
    pareto_table,
    write_csv,
)
from dynas.results.plots import write_html

__all__ = [
    "PARETO_COLUMNS",
    "ENERGY_COLUMNS",
    "CHECKPOINT_COLUMNS",
    "objective_column",
    "checkpoints_table",
    "DEFAULT_REFERENCE_LATENCY_RATIO",
    "DEFAULT_REFERENCE_TOP1_DROP",
    "pareto_table",
    "front_trials",
    "all_trials_table",
    "write_csv",
    "default_reference",
    "hypervolume",
    "hypervolume_history",
    "write_html",
    "select_trial",
    "export_trial",
    "training_recipe",
    "laudnet_args",
]
