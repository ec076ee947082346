"""The commands that time networks on this machine: ``dynas bench`` (a config's real speed-up)
and ``dynas calibrate`` (measure, fit a target file); also the helpers they share with
``dynas validate`` (:mod:`dynas.cli.validate`): threads, device check, progress log, CSV input,
the round-noise report and the measuring options.

Fitting and scoring live in the library (:mod:`dynas.predictors.calibration`,
:mod:`dynas.results.validation`); these modules measure, call it and print.  torch is imported
only inside the commands, so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Callable

from dynas.cli.common import (
    UsageError,
    add_command,
    check_output,
    default_of,
    echo,
    int_list,
    nonneg_int,
    positive_int,
    positive_number,
    str_list,
    table,
    torch_default,
)
from dynas.spaces.design import calibration_plan

__all__ = [
    "add_parsers",
    "set_threads",
    "check_device",
    "progress",
    "read_csv",
    "print_round_spread",
    "measuring_args",
]

_logger = logging.getLogger("dynas")

#: the library functions whose defaults the options show (see common.TORCH_DEFAULTS)
BENCH = "dynas.kernels.bench:bench"
RUN_PLAN = "dynas.kernels.calibrate:run_plan"
RUN_ROUNDS = "dynas.kernels.calibrate:run_rounds"

#: the command line's own choices (the library functions have no such default)
CALIBRATE_BUDGET_S = 300.0  # ``dynas calibrate`` 's measurement time budget (seconds)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from dynas.kernels.bench import bench

    r = bench(
        args.config,
        device=args.device,
        batch_size=args.batch_size,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        memory_format=args.memory_format,
        gate_mode=args.gates,
    )
    if args.json:
        echo(json.dumps(r.to_dict(), indent=2))
        return 0
    h, w = r.input_size
    echo(
        f"{r.backbone} @ {h}x{w}, batch {r.batch_size}, {r.device}, {r.threads} threads, {r.memory_format}, torch {r.torch_version}"
    )
    how = {
        "budget": "exactly the configured rates, learned choice",
        "random": "exactly the configured rates, random choice per sample",
    }[r.gate_mode]
    echo(f"config: {r.config}  ({r.gate_mode} gate mode: {how})")
    echo("kernels: pure PyTorch (dynas has no compiled extension; every fast path runs ATen operators)")
    echo(f"static  {r.static_ms:9.3f} ms  (p10-p90 spread {r.static_spread_ms:.3f} ms)")
    echo(f"dynamic {r.dynamic_ms:9.3f} ms  (p10-p90 spread {r.dynamic_spread_ms:.3f} ms)")
    echo(
        f"speed-up x{r.speedup:.2f} over {r.repeats} interleaved pairs; fast vs reference path max abs err {r.max_abs_err:.2e}"
    )
    echo(
        f"FLOPs limit x{r.flops_limit:.2f} (static / executed FLOPs): the speed-up reaches {r.speedup / r.flops_limit:.0%} of it"
    )
    return 0


# --------------------------------------------------------------------------------------------
# helpers of calibrate and validate
# --------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device='cuda' is not available on this machine; allowed: cpu")


def progress(budget_s: float | None) -> Callable[..., None]:
    """A ``run_rounds`` progress callback that logs each measured network."""

    def report(done: int, elapsed: float, item: Any, m: Any) -> None:
        left = f"/{budget_s:.0f}" if budget_s is not None else ""
        _logger.info(
            "[%d networks, %.0f%s s] %s b%d %s: %.1f ms",
            done,
            elapsed,
            left,
            item.config.backbone,
            item.batch_size,
            item.config.short(),
            m.network_ms,
        )

    return report


def read_csv(option: str, path: str) -> Any:
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option}={path!r} cannot be read as CSV: {exc}".splitlines()[0]) from None


def print_round_spread(df: Any) -> None:
    """The machine's own noise (:func:`~dynas.results.validation.round_noise`): how far apart the
    rounds of the same networks came out, and with pairs how far apart relative to their static
    networks; a warning when it was too busy."""
    from dynas.results.validation import QUIET_SPREAD_PCT, round_noise

    noise = round_noise(df)
    if noise is None:
        return
    spread, paired = noise.spread, noise.paired
    echo(
        f"rounds: {spread['count']} networks measured more than once; the slowest round of each took a median "
        f"{spread['median_pct']:.1f}% longer than its fastest (90th percentile {spread['p90_pct']:.1f}%): "
        "the machine's own noise, kept apart from the model's error by keeping each fastest round"
    )
    if paired is not None:
        echo(
            f"pairs: relative to its static network, the slowest round of each took a median "
            f"{paired['median_pct']:.1f}% longer than its fastest (90th percentile {paired['p90_pct']:.1f}%): "
            "the noise the pairs leave"
        )
        if noise.busy:
            _logger.warning(
                "the machine was busy even for pairs: relative to their static networks, the rounds came "
                "out a median %.1f%% apart (more than %.0f%%); measure again when it is quieter",
                paired["median_pct"],
                QUIET_SPREAD_PCT,
            )
    elif noise.busy:
        _logger.warning(
            "the machine was busy: a median round spread of %.1f%% is more than %.0f%%, so single "
            "measurements are off by about as much as the +/-10%% a target aims at; measure again when "
            "it is quiet, or with --host-check pairs (or --rounds 4)",
            spread["median_pct"],
            QUIET_SPREAD_PCT,
        )


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------


def _read_calibrations(paths: str) -> Any:
    """The calibration CSVs of ``--measurements A.csv[,B.csv...]`` as one table; each later
    file's ``network_id`` s are shifted past the earlier ones' so that networks stay apart
    (pooled paired tables share one quietest-host reference per static network)."""
    import pandas as pd

    tables, offset = [], 0
    for path in paths.split(","):
        df = read_csv("--measurements", path)
        if "network_id" in df:
            ids = pd.to_numeric(df["network_id"], errors="coerce")
            if ids.isna().any():
                raise UsageError(
                    f"--measurements={path!r}: network_id={df['network_id'][ids.isna()].iloc[0]!r} is not "
                    "an integer; allowed: the integer ids dynas calibrate writes"
                )
            df["network_id"] = ids.astype(int) + offset
            offset = int(df["network_id"].max()) + 1
        tables.append(df)
    return pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]


def _recorded_environment(df: Any) -> dict[str, Any]:
    """The environment columns of a measurement table (first row)."""
    kinds = {"threads": int}
    keys = ("device", "device_name", "torch_version", "threads", "date", "python", "gate_mode", "malloc")
    return {k: kinds.get(k, str)(df[k].iloc[0]) for k in keys if k in df.columns}


def _measure_calibration(args: argparse.Namespace, csv_path: str) -> Any:
    """Measure the calibration design on this machine; the table, also written to ``csv_path``."""
    import pandas as pd

    from dynas.kernels.calibrate import run_rounds
    from dynas.results.pareto import atomic_write_text

    check_device(args.device)
    set_threads(args.threads)
    plan = calibration_plan(args.backbones, args.input_size, args.batch_size, args.seed)  # checks the options
    first = next(plan)
    _logger.info(
        "calibrating on %s for about %.0f s, %d round(s)%s (progress per measured network)",
        args.device,
        args.budget_s,
        args.rounds,
        ", each pass paired with the static network's" if args.host_check == "pairs" else "",
    )
    rows = run_rounds(
        itertools.chain([first], plan),
        args.rounds,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        budget_s=args.budget_s,
        progress=progress(args.budget_s / args.rounds),
        paired=args.host_check == "pairs",
    )
    df = pd.DataFrame(rows)
    atomic_write_text(csv_path, df.to_csv(index=False))
    return df


def _print_fit(target: Any, comments: dict[str, str]) -> None:
    """The fitted costs of a calibrated target and how well they fit."""
    from dynas.predictors.calibration import CV_FOLDS

    rows_out = [{"cost": k, "value": v, "meaning": comments[k]} for k, v in target.cpu._asdict().items()]
    echo(table(rows_out, ["cost", "value", "meaning"]))
    f = target.fit
    echo(
        f"fit on {f['rows']} stem/stage/head rows ({f['outlier_rows']} disturbed rows left out): "
        f"MAPE {f['parts_mape_pct']:.1f}%, {100 * f['parts_within_10pct']:.0f}% within +/-10%"
    )
    if f.get("column_block_network_cv_mape_pct"):
        echo(
            f"column block: {target.column_block} output columns per convolution step (held-out networks' MAPE by "
            f"candidate, {CV_FOLDS}-fold: {f['column_block_network_cv_mape_pct']} %)"
        )
    else:
        echo(
            f"column block: {target.column_block} output columns per convolution step (median error by candidate: "
            f"{f['column_block_median_err_pct']} %)"
        )


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from dynas.kernels.calibrate import environment
    from dynas.predictors.calibration import check_measurements, cost_comments, fit_target
    from dynas.predictors.targets import write_target

    csv_path = args.csv or str(Path(args.output).with_name(Path(args.output).stem + ".csv"))
    check_output("--output", args.output)
    check_output("--csv", csv_path)
    df = _read_calibrations(args.measurements) if args.measurements else _measure_calibration(args, csv_path)
    check_measurements(df, "calibration measurements")
    env = _recorded_environment(df) if args.measurements else environment(args.device)
    name = args.name or Path(args.output).stem
    backbones = sorted(df["backbone"].astype(str).unique()) if "backbone" in df else list(args.backbones)
    batches = sorted(int(b) for b in df["batch_size"].unique())
    sources = ",".join(Path(f).name for f in args.measurements.split(",")) if args.measurements else Path(csv_path).name
    target = fit_target(
        df,
        name,
        {
            **env,
            "calibration_csv": sources,
            "backbones": ",".join(backbones),
            "batch_sizes": ",".join(map(str, batches)),
        },
        default_batch_size=batches[0],
    )
    comments = cost_comments(target.cpu)
    write_target(target, args.output, comments)
    n_nets = df["network_id"].nunique() if "network_id" in df else df["config"].nunique()
    echo(
        f"{'read' if args.measurements else 'measured'} {n_nets} networks ({len(df)} rows) on "
        f"{env.get('device_name', '?')}, {env.get('threads', '?')} threads, torch {env.get('torch_version', '?')}: "
        f"{args.measurements or csv_path}"
    )
    _print_fit(target, comments)
    print_round_spread(df)
    if target.fit.get("host_normalized_networks"):
        echo(
            f"pairs: {target.fit['host_normalized_networks']} networks fitted in units of the quietest host seen "
            "(their times x their static network's fastest paired time / its time alongside them)"
        )
    echo(f"target: {args.output}  (use it as --target {args.output}; check it with dynas validate)")
    return 0


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------


def _add_bench_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    default = functools.partial(torch_default, BENCH)  # default("repeats"): bench()'s default

    p = add_command(
        sub,
        parent,
        "bench",
        _cmd_bench,
        help="measure a config's real speed-up (static vs dynamic)",
        description="Build the dynamic network of CONFIG and time it against its static backbone: budget gate\n"
        "mode (exactly the configured rates), fast path (real skipping), inference mode, interleaved\n"
        "A/B pairs so drift cancels; prints medians, spread, speed-up and the fast-vs-reference error.\n"
        "Freed memory is kept in the process (glibc), as calibrate and validate do.",
    )
    p.add_argument("config", metavar="CONFIG", help="config or exported JSON file")
    p.add_argument("--device", choices=("cpu", "cuda"), default=default("device"), help="where to run")
    p.add_argument(
        "--batch-size", type=positive_int, default=default("batch_size"), metavar="N", help="images per batch"
    )
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads (default: torch's)")
    p.add_argument("--repeats", type=positive_int, default=default("repeats"), metavar="N", help="timed pairs")
    p.add_argument(
        "--warmup", type=nonneg_int, default=default("warmup"), metavar="N", help="untimed runs of each first"
    )
    p.add_argument(
        "--memory-format",
        choices=("channels_last", "contiguous"),
        default=default("memory_format"),
        help="layout of both networks and the input",
    )
    p.add_argument(
        "--gates",
        choices=("budget", "random"),
        default=default("gate_mode"),
        help="budget: the (untrained) gates choose; random: uniform choice per sample, as a trained\n"
        "network's input-dependent gates and the calibrated model assume",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def measuring_args(
    p: argparse.ArgumentParser,
    plan: Callable[..., Any],
    threads_help: str,
    backbones_help: str,
    repeats: int,
    seed_help: str,
) -> None:
    """Options shared by the commands that time networks (calibrate, validate); ``plan`` is the
    function of :mod:`dynas.spaces.design` that picks their networks (its defaults are theirs)."""
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=torch_default(RUN_PLAN, "device"), help="where to measure"
    )
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help=threads_help)
    p.add_argument(
        "--batch-size",
        type=int_list,
        default=tuple(default_of(plan, "batch_sizes")),
        metavar="N[,N...]",
        help="batch sizes to measure",
    )
    p.add_argument(
        "--backbones", type=str_list, default=tuple(default_of(plan, "backbones")), metavar="A,B", help=backbones_help
    )
    p.add_argument(
        "--input-size", type=positive_int, default=default_of(plan, "input_size"), metavar="N", help="image side"
    )
    p.add_argument(
        "--repeats", type=positive_int, default=repeats, metavar="N", help="timed passes per network (median)"
    )
    p.add_argument(
        "--warmup",
        type=nonneg_int,
        default=torch_default(RUN_PLAN, "warmup"),
        metavar="N",
        help="untimed passes per network first",
    )
    p.add_argument("--seed", type=nonneg_int, default=default_of(plan, "seed"), metavar="N", help=seed_help)


def _add_calibrate_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = add_command(
        sub,
        parent,
        "calibrate",
        _cmd_calibrate,
        help="measure dynas's kernels on this device and fit a target file",
        description="Time whole dynamic networks stage by stage (stratified over paradigms, granularities, rates,\n"
        "stage shapes and batch sizes; random gate mode: exact rates, choice independent per sample),\n"
        "save the measurements as CSV with the environment, and fit the work costs of the calibrated\n"
        "model (throughputs, bandwidths, per-call overheads) into a target file that every command accepts.\n"
        "Freed memory is kept in the process (glibc mallopt) so big batch-8 tensors are not page-faulted\n"
        "on every pass; deploy the same way (README, 'Allocator').\n"
        "On a shared machine whose speed moves, --host-check pairs runs a pass of each network's static\n"
        "network after each of its passes and fits times put in units of the quietest host seen.",
    )
    p.add_argument("-o", "--output", required=True, metavar="TARGET_FILE", help="target file to write (.toml)")
    measuring_args(
        p,
        calibration_plan,
        "CPU threads (default: torch's)",
        "backbones to measure (default: one per block kind)",
        repeats=torch_default(RUN_PLAN, "repeats"),
        seed_help="seed of the design and the weights",
    )
    p.add_argument(
        "--budget-s",
        type=positive_number,
        default=CALIBRATE_BUDGET_S,
        metavar="S",
        help="measurement time budget (seconds)",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=torch_default(RUN_ROUNDS, "rounds"),
        metavar="N",
        help="measure the networks of the first BUDGET/N seconds N times (minutes apart); each keeps its\n"
        "fastest round (4 on a busy machine)",
    )
    p.add_argument(
        "--host-check",
        choices=("none", "pairs"),
        default="none",
        help="pairs: pass by pass, alternate each network with its static network and fit its times\n"
        "relative to it (about twice the time per network; for a machine whose speed moves)",
    )
    p.add_argument("--name", default=None, help="target name (default: the output file's stem)")
    p.add_argument("--csv", default=None, metavar="FILE", help="measurements CSV (default: TARGET_FILE with .csv)")
    p.add_argument(
        "--measurements",
        default=None,
        metavar="CSV[,CSV...]",
        help="fit earlier calibration CSVs instead of measuring, pooled when several (the measuring options "
        "are ignored)",
    )


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    """Register ``bench`` and ``calibrate`` with ``sub`` (shared flags from ``parent``)."""
    _add_bench_parser(sub, parent)
    _add_calibrate_parser(sub, parent)
