"""The ``dynas`` command line.

Subcommands::

    dynas targets                      built-in hardware targets
    dynas predict CONFIG --target T    latency prediction of one config
    dynas search [options]             run (or resume) a search; prints the Pareto front,
                                       writes an HTML report and an exported config
    dynas pareto --study-name NAME     Pareto front of a stored study, CSV / HTML
    dynas export --study-name NAME     one trial as a training config (JSON)
    dynas bench CONFIG                 real speed-up of a config (static vs dynamic)
    dynas train CONFIG                 fine-tune a config on synthetic data (CPU demo)
    dynas calibrate -o TARGET.toml     measure this device, fit a target file
    dynas validate --target T          held-out measurements vs predictions

Every bad input (a :class:`~dynas.errors.DynasError` or an argparse error) ends as one line
``dynas: error: <message>`` on stderr and exit status 2, with no traceback.  Output paths are
checked before any long work starts, so a bad path costs nothing.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import os
import re
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from dynas.errors import ConfigError, DynasError

__all__ = ["main", "build_parser", "UsageError"]

_logger = logging.getLogger("dynas")


class UsageError(DynasError):
    """A command-line argument is invalid (bad syntax, unusable output path)."""


# --------------------------------------------------------------------------------------------
# argparse plumbing
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become :class:`UsageError` (printed on one line by main)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{' '.join(message.split())} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows defaults that are not None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, argparse._HelpAction)
        ):
            if isinstance(default, (tuple, list)):
                default = ",".join(str(v) for v in default)
                return f"{text} (default: {default})"
            text += " (default: %(default)s)"
        return text


def _input_size(text: str) -> int | tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; allowed: N or HxW, e.g. 224 or 224x320")
    h = int(m.group(1))
    return h if m.group(2) is None else (h, int(m.group(2)))


def _str_list(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; allowed: a comma-separated list")
    return items


def _int_list(text: str) -> tuple[int, ...]:
    items = _str_list(text)
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers; allowed: e.g. 1,2,4") from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= {minimum}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: an integer >= {minimum}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = _float(text)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: a finite number > 0")
    return v


def _safe_name(name: str) -> str:
    """A study name as a file-name fragment."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "study"


def _check_output(option: str, path: str | os.PathLike[str] | None) -> None:
    """Raise :class:`UsageError` unless ``path`` can be written (checked before long work)."""
    if path is None:
        return
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise UsageError(f"{option}={str(path)!r} is a directory or empty; allowed: a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{option}={str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{option}={str(path)!r}: not writable")


def _sampler_help() -> str:
    from dynas.search.study import SAMPLERS

    lines = [f"{name}: {(fn.__doc__ or '').strip().splitlines()[0].rstrip('.')}" for name, fn in SAMPLERS.items()]
    return "sampler (" + "; ".join(lines) + ")"


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------


def _frame_text(df: Any, floats: str = "{:.4g}") -> str:
    """``df`` as aligned text: numbers right-aligned, text left-aligned, missing cells blank."""
    from pandas.api.types import is_numeric_dtype

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):  # v != v: NaN
            return ""
        return floats.format(v) if isinstance(v, float) else str(v)

    columns = []
    for col in df.columns:
        cells = [str(col), *(cell(v) for v in df[col].tolist())]
        width = max(map(len, cells))
        right = is_numeric_dtype(df[col].dtype)
        columns.append([c.rjust(width) if right else c.ljust(width) for c in cells])
    return "\n".join("  ".join(row).rstrip() for row in zip(*columns))


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], floats: str = "{:.4g}") -> str:
    import pandas as pd

    return _frame_text(pd.DataFrame(list(rows), columns=list(columns)), floats)


def _print(text: str = "") -> None:
    sys.stdout.write(text + "\n")


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------


def _cmd_targets(args: argparse.Namespace) -> int:
    from dynas.predictors.targets import list_targets, load_target

    rows = []
    for name in list_targets():
        t = load_target(name)
        rows.append({
            "name": t.name,
            "SMs": t.n_sm,
            "lanes/SM": t.lanes_per_sm,
            "clock GHz": t.clock_hz / 1e9,
            "DRAM GB/s": t.dram_bandwidth_Bps / 1e9,
            "batch": t.default_batch_size,
            "description": t.description,
        })
    _print(_table(rows, ["name", "SMs", "lanes/SM", "clock GHz", "DRAM GB/s", "batch", "description"]))
    return 0


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


def _export_hints(source: str) -> tuple[str | None, int | None]:
    """Target and batch size an exported config file (or JSON string) names, if any."""
    try:
        text = source if source.lstrip().startswith("{") else Path(source).read_text()
        data = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return None, None  # load_config reports the problem
    if not isinstance(data, dict):
        return None, None
    target = data.get("target")
    if isinstance(target, dict):
        path = target.get("path")
        target = path if isinstance(path, str) and Path(path).is_file() else target.get("name")
    if target is not None and not isinstance(target, str):
        raise ConfigError(f"config target={target!r} is not a target name; allowed: a built-in target name or a .toml path")
    batch = data.get("batch_size")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"config batch_size={batch!r} is not allowed; allowed: a positive integer")
    return target, batch


def _cmd_predict(args: argparse.Namespace) -> int:
    from dynas.predictors.latency import predict
    from dynas.spaces.config import load_config

    cfg = load_config(args.config)
    hint_target, hint_batch = _export_hints(args.config)
    target = args.target if args.target is not None else (hint_target or "v100")
    batch = args.batch_size if args.batch_size is not None else (hint_batch if args.target is None else None)
    pred = predict(cfg, target, batch)
    if args.json:
        _print(json.dumps(pred.to_dict(), indent=2))
        return 0
    h, w = cfg.input_size
    _print(f"{cfg.backbone} @ {h}x{w} on {pred.target}, batch {pred.batch_size}")
    _print(
        f"latency {pred.latency_ms:.4g} ms per batch ({pred.latency_ms_per_image:.4g} ms per image); "
        f"static {pred.static_latency_ms:.4g} ms; speed-up {pred.speedup:.3f}x"
    )
    _print(
        f"FLOPs {pred.dense_gflops:.4g} -> {pred.expected_gflops:.4g} GFLOPs per image "
        f"({pred.flops_ratio:.3f} of dense)"
    )
    _print()
    rows: list[dict[str, Any]] = [{"stage": "stem", "choice": "", "latency ms": pred.stem_ms, "static ms": pred.stem_ms}]
    for s in pred.stages:
        rows.append({
            "stage": str(s.stage), "choice": s.choice, "latency ms": s.latency_ms, "static ms": s.static_latency_ms,
            "compute ms": s.compute_ms, "memory ms": s.memory_ms, "launch ms": s.launch_ms,
            "masker": s.masker, "bound": s.bound,
        })
    rows.append({"stage": "head", "choice": "", "latency ms": pred.head_ms, "static ms": pred.head_ms})
    rows.append({"stage": "total", "choice": "", "latency ms": pred.latency_ms, "static ms": pred.static_latency_ms})
    cols = ["stage", "choice", "latency ms", "static ms", "compute ms", "memory ms", "launch ms", "masker", "bound"]
    _print(_table(rows, cols))
    return 0


# --------------------------------------------------------------------------------------------
# search / pareto / export
# --------------------------------------------------------------------------------------------


def _print_front(study: Any, top: int) -> None:
    from dynas.results import checkpoints_table, hypervolume, pareto_table

    a = study.user_attrs
    df = pareto_table(study)
    from dynas.search.stopping import is_stopped

    trials = study.get_trials(deepcopy=False)
    n_done = sum(1 for t in trials if t.state.name == "COMPLETE")
    n_stopped = sum(1 for t in trials if is_stopped(t))
    stopped = f" + {n_stopped} stopped early ({(a.get('early_stop') or {}).get('name', '?')})" if n_stopped else ""
    h, w = a.get("input_size", ["?", "?"])
    _print(
        f"study {study.study_name}: {a.get('backbone')} @ {h}x{w} on {a.get('target')}, batch {a.get('batch_size')}, "
        f"proxy {a.get('proxy')}; {n_done} complete trials{stopped}, {len(df)} distinct configs on the Pareto front"
    )
    static_ms, static_top1 = a.get("static_latency_ms"), a.get("static_top1")
    if static_ms is not None and static_top1 is not None:
        _print(f"static: {static_ms:.4g} ms per batch, top-1 {static_top1:.2f}%; hypervolume {hypervolume(study):.4g}")
    checkpoints = checkpoints_table(study)
    if len(checkpoints):
        shown = checkpoints if top == 0 else checkpoints.tail(top)
        _print(f"checkpoints (held-out top-1 % after each step count; {len(shown)} of {len(checkpoints)} trials, latest last):")
        _print(_frame_text(shown))
        _print()
    if len(df) == 0:
        _print("no feasible trial on the front")
        return
    shown = df if top == 0 else df.head(top)
    _print(_frame_text(shown))
    if len(shown) < len(df):
        _print(f"({len(shown)} of {len(df)} shown; --top 0 shows all, --csv writes all)")


def _search_options(args: argparse.Namespace) -> Any:
    from dynas.search.stopping import StopRule
    from dynas.search.study import SearchOptions
    from dynas.spaces.searchspace import SpaceOptions

    kw: dict[str, Any] = dict(
        backbone=args.backbone, target=args.target, input_size=args.input_size, batch_size=args.batch_size,
        proxy=args.proxy, trials=args.trials, timeout_s=args.timeout, sampler=args.sampler, seed=args.seed,
        storage=args.storage, workers=args.workers, heartbeat_s=args.heartbeat_s,
        study_name=args.study_name, max_latency_ms=args.max_latency_ms,
        max_latency_ratio=args.max_latency_ratio, show_progress=not args.no_progress,
    )
    space: dict[str, Any] = dict(
        spatial_granularities=args.spatial_granularities, channel_granularities=args.channel_granularities,
        rate_min=args.rate_min, rate_max=args.rate_max, rate_step=args.rate_step,
    )
    if args.paradigms is not None:
        space["paradigms"] = args.paradigms
    kw["space"] = SpaceOptions(**space)
    finetune = {"data": args.data, "steps": args.finetune_steps, "batch_size": args.finetune_batch_size,
                "checkpoints": args.checkpoints, "weights": args.weights, "pretrain_steps": args.pretrain_steps,
                "distill": False if args.no_distill else None}
    given = {k: v for k, v in finetune.items() if v is not None}
    if given:
        if args.proxy != "finetune":
            flag = {"steps": "--finetune-steps", "batch_size": "--finetune-batch-size", "distill": "--no-distill",
                    "pretrain_steps": "--pretrain-steps"}.get(next(iter(given)), "--" + next(iter(given)))
            raise ConfigError(f"{flag} applies to --proxy finetune only; got --proxy {args.proxy}")
        kw["proxy_options"] = given
    kw["stop"] = StopRule(args.early_stop, args.stop_margin, args.stop_min_trials, args.stop_eta)
    return SearchOptions(**kw)


def _cmd_search(args: argparse.Namespace) -> int:
    from dynas.results import export_trial, pareto_table, select_trial, write_csv, write_html
    from dynas.search.study import plan_search, run_search

    plan = plan_search(_search_options(args))  # validates every option; writes nothing
    stem = _safe_name(plan.study_name)
    html = args.html if args.html is not None else f"dynas-{stem}.html"
    export = args.export if args.export is not None else f"dynas-{stem}-export.json"
    for option, path in (("--html", html), ("--csv", args.csv), ("--export", export)):
        _check_output(option, path)

    study = run_search(plan)
    _print_front(study, args.top)
    if not study.best_trials:
        _raise_infeasible(study, plan.options)
    trial = select_trial(study)  # before writing the report and the export
    write_html([study], html, breakdown_trial=trial.number)
    if args.csv:
        write_csv(pareto_table(study), args.csv)
    export_trial(study, trial, export)
    _print()
    _print(f"HTML report: {html}")
    if args.csv:
        _print(f"Pareto CSV:  {args.csv}")
    _print(
        f"exported trial {trial.number} ({trial.values[0]:.4g} ms per batch, top-1 {trial.values[1]:.2f}%; "
        f"{trial.user_attrs.get('short', '')}) to {export}"
    )
    return 0


def _raise_infeasible(study: Any, options: Any) -> None:
    from dynas.errors import StudyError

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    bounds = []
    if options.max_latency_ms is not None and done:
        best = min(t.values[0] for t in done)
        bounds.append(f"--max-latency-ms {options.max_latency_ms:g} (fastest trial: {best:.4g} ms)")
    if options.max_latency_ratio is not None and done:
        best = min(t.user_attrs.get("latency_ratio", float("inf")) for t in done)
        bounds.append(f"--max-latency-ratio {options.max_latency_ratio:g} (lowest ratio: {best:.4g})")
    raise StudyError(
        f"no feasible trial among the {len(done)} complete trials of study {study.study_name!r}: "
        f"{'; '.join(bounds) or 'no constraint met'}; loosen the constraints or run more trials (no report or export written)"
    )


def _cmd_pareto(args: argparse.Namespace) -> int:
    from dynas.results import hypervolume, pareto_table, write_csv, write_html
    from dynas.search.study import load_study

    _check_output("--csv", args.csv)
    _check_output("--html", args.html)
    study = load_study(args.storage, args.study_name)
    others = [load_study(args.storage, name) for name in (args.compare or ())]
    _print_front(study, args.top)
    if others:
        rows = []
        for s in [study, *others]:
            a = s.user_attrs
            front = pareto_table(s)
            rows.append({
                "study": s.study_name, "target": a.get("target"), "batch": a.get("batch_size"),
                "trials": sum(1 for t in s.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                "front": len(front), "best speed-up": float(front["speedup"].max()) if len(front) else float("nan"),
                "hypervolume": hypervolume(s),
            })
        _print()
        _print(_table(rows, ["study", "target", "batch", "trials", "front", "best speed-up", "hypervolume"]))
    if args.csv:
        write_csv(pareto_table(study), args.csv)
        _print(f"Pareto CSV: {args.csv}")
    if args.html:
        write_html([study, *others], args.html)
        _print(f"HTML report: {args.html}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dynas.results import export_trial, pareto_table, select_trial
    from dynas.search.study import load_study

    _check_output("--output", args.output)
    study = load_study(args.storage, args.study_name)
    output = args.output or f"dynas-{_safe_name(study.study_name)}-export.json"
    _check_output("--output", output)
    trial = select_trial(
        study, trial=args.trial, max_latency_ms=args.max_latency_ms, min_top1=args.min_top1,
        max_latency_ms_per_image=args.max_latency_ms_per_image,
    )
    export_trial(study, trial, output)
    _print(
        f"exported trial {trial.number} ({trial.values[0]:.4g} ms per batch, top-1 {trial.values[1]:.2f}%; "
        f"{trial.user_attrs.get('short', '')}) to {output}"
    )
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def _add_study_args(p: argparse.ArgumentParser) -> None:
    from dynas.search.study import DEFAULT_STORAGE

    p.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URL",
                   help="Optuna storage: sqlite:///F.db, journal:///F.journal or postgresql://USER@HOST/DB")
    p.add_argument(
        "--study-name", default=None, metavar="NAME",
        help="study to read (default: the only study in the storage)",
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from dynas.kernels.bench import bench

    r = bench(args.config, device=args.device, batch_size=args.batch_size, threads=args.threads,
              repeats=args.repeats, warmup=args.warmup, memory_format=args.memory_format, gate_mode=args.gates)
    if args.json:
        _print(json.dumps(r.to_dict(), indent=2))
        return 0
    h, w = r.input_size
    _print(f"{r.backbone} @ {h}x{w}, batch {r.batch_size}, {r.device}, {r.threads} threads, {r.memory_format}, torch {r.torch_version}")
    how = {"budget": "exactly the configured rates, learned choice",
           "random": "exactly the configured rates, random choice per sample"}[r.gate_mode]
    _print(f"config: {r.config}  ({r.gate_mode} gate mode: {how})")
    _print(f"static  {r.static_ms:9.3f} ms  (p10-p90 spread {r.static_spread_ms:.3f} ms)")
    _print(f"dynamic {r.dynamic_ms:9.3f} ms  (p10-p90 spread {r.dynamic_spread_ms:.3f} ms)")
    _print(f"speed-up x{r.speedup:.2f} over {r.repeats} interleaved pairs; fast vs reference path max abs err {r.max_abs_err:.2e}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dynas.kernels.trainer import train

    _check_output("--output", args.output)
    model, hist = train(args.config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        input_size=args.input_size, seed=args.seed, log=_print, log_every=args.log_every)
    _print()
    _print(f"held-out top-1 {100 * hist.final_accuracy:.1f}% (synthetic, {len(hist.stage_targets)} dynamic stages)")
    for s, target in hist.stage_targets.items():
        got = hist.final_rates.get(s, float("nan"))
        _print(f"stage {s}: realised rate {got:.3f}  target {target:.3f}  |diff| {abs(got - target):.3f}")
    if args.output:
        import torch

        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        from dynas.results.pareto import atomic_write_bytes

        atomic_write_bytes(args.output, buf.getvalue())
        _print(f"weights: {args.output}")
    return 0


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _progress(budget_s: float | None) -> Callable[..., None]:
    def report(done: int, elapsed: float, item: Any, m: Any) -> None:
        left = f"/{budget_s:.0f}" if budget_s is not None else ""
        _logger.info("[%d networks, %.0f%s s] %s b%d %s: %.1f ms", done, elapsed, left, item.config.backbone,
                     item.batch_size, item.config.short(), m.network_ms)

    return report


def _default_path(output: str, suffix: str) -> str:
    p = Path(output)
    return str(p.with_name(p.stem + suffix))


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import pandas as pd

    from dynas.kernels.calibrate import environment, run_rounds
    from dynas.spaces.design import calibration_plan
    from dynas.predictors.calibration import CV_FOLDS, check_measurements, cost_comments, fit_target
    from dynas.predictors.targets import write_target
    from dynas.results.pareto import atomic_write_text

    csv_path = args.csv or _default_path(args.output, ".csv")
    _check_output("--output", args.output)
    _check_output("--csv", csv_path)
    if args.measurements:
        df = _read_calibrations(args.measurements)
    else:
        _check_device(args.device)
        _set_threads(args.threads)
        plan = calibration_plan(args.backbones, args.input_size, args.batch_size, args.seed)  # checks the options
        first = next(plan)
        _logger.info("calibrating on %s for about %.0f s, %d round(s)%s (progress per measured network)", args.device,
                     args.budget_s, args.rounds, ", each pass paired with the static network's"
                     if args.host_check == "pairs" else "")
        rows = run_rounds(itertools.chain([first], plan), args.rounds, device=args.device, repeats=args.repeats,
                          warmup=args.warmup, seed=args.seed, budget_s=args.budget_s,
                          progress=_progress(args.budget_s / args.rounds), paired=args.host_check == "pairs")
        df = pd.DataFrame(rows)
        atomic_write_text(csv_path, df.to_csv(index=False))
    check_measurements(df, "calibration measurements")
    env = _recorded_environment(df) if args.measurements else environment(args.device)
    name = args.name or Path(args.output).stem
    backbones = sorted(df["backbone"].astype(str).unique()) if "backbone" in df else list(args.backbones)
    batches = sorted(int(b) for b in df["batch_size"].unique())
    sources = ",".join(Path(f).name for f in args.measurements.split(",")) if args.measurements else Path(csv_path).name
    target = fit_target(df, name, {**env, "calibration_csv": sources,
                                   "backbones": ",".join(backbones), "batch_sizes": ",".join(map(str, batches))},
                        default_batch_size=batches[0])
    comments = cost_comments(target.cpu)
    write_target(target, args.output, comments)
    n_nets = df["network_id"].nunique() if "network_id" in df else df["config"].nunique()
    _print(f"{'read' if args.measurements else 'measured'} {n_nets} networks ({len(df)} rows) on "
           f"{env.get('device_name', '?')}, {env.get('threads', '?')} threads, torch {env.get('torch_version', '?')}: "
           f"{args.measurements or csv_path}")
    rows_out = [{"cost": k, "value": v, "meaning": comments[k]} for k, v in target.cpu._asdict().items()]
    _print(_table(rows_out, ["cost", "value", "meaning"]))
    f = target.fit
    _print(f"fit on {f['rows']} stem/stage/head rows ({f['outlier_rows']} disturbed rows left out): "
           f"MAPE {f['parts_mape_pct']:.1f}%, {100 * f['parts_within_10pct']:.0f}% within +/-10%")
    if f.get("column_block_network_cv_mape_pct"):
        _print(f"column block: {target.column_block} output columns per convolution step (held-out networks' MAPE by "
               f"candidate, {CV_FOLDS}-fold: {f['column_block_network_cv_mape_pct']} %)")
    else:
        _print(f"column block: {target.column_block} output columns per convolution step (median error by candidate: "
               f"{f['column_block_median_err_pct']} %)")
    _print_round_spread(df)
    if f.get("host_normalized_networks"):
        _print(f"pairs: {f['host_normalized_networks']} networks fitted in units of the quietest host seen (their times x "
               "their static network's fastest paired time / its time alongside them)")
    _print(f"target: {args.output}  (use it as --target {args.output}; check it with dynas validate)")
    return 0


def _read_calibrations(paths: str) -> Any:
    """The calibration CSVs of ``--measurements A.csv[,B.csv...]`` as one table; each later
    file's ``network_id`` s are shifted past the earlier ones' so that networks stay apart
    (pooled paired tables share one quietest-host reference per static network)."""
    import pandas as pd

    tables, offset = [], 0
    for path in paths.split(","):
        df = _read_csv("--measurements", path)
        if "network_id" in df:
            ids = pd.to_numeric(df["network_id"], errors="coerce")
            if ids.isna().any():
                raise UsageError(f"--measurements={path!r}: network_id={df['network_id'][ids.isna()].iloc[0]!r} is not "
                                 "an integer; allowed: the integer ids dynas calibrate writes")
            df["network_id"] = ids.astype(int) + offset
            offset = int(df["network_id"].max()) + 1
        tables.append(df)
    return pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]


def _read_csv(option: str, path: str) -> Any:
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option}={path!r} cannot be read as CSV: {exc}".splitlines()[0]) from None


def _recorded_environment(df: Any) -> dict[str, Any]:
    """The environment columns of a measurement table (first row)."""
    kinds = {"threads": int}
    keys = ("device", "device_name", "torch_version", "threads", "date", "python", "gate_mode", "malloc")
    return {k: kinds.get(k, str)(df[k].iloc[0]) for k in keys if k in df.columns}


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device='cuda' is not available on this machine; allowed: cpu")


def _load_config_list(path: str) -> list[Any]:
    from dynas.spaces.config import load_config

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"--configs={path!r} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise UsageError(f"--configs={path!r} is not JSON or JSON lines: {exc}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UsageError(f"--configs={path!r} holds no configs; allowed: a JSON config, a JSON list of configs, or JSON lines")
    return [load_config(d) for d in data]


def _cmd_validate(args: argparse.Namespace) -> int:
    import pandas as pd

    from dynas.kernels.calibrate import run_rounds, static_reference
    from dynas.spaces.design import PlanItem, validation_plan
    from dynas.predictors.calibration import compare, per_sample_gated
    from dynas.predictors.targets import load_target
    from dynas.results.validation import write_validation_csv, write_validation_html

    target = load_target(args.target)
    stem = f"validate-{_safe_name(target.name)}"
    csv_path, html_path = args.csv or f"{stem}.csv", args.html or f"{stem}.html"
    _check_output("--csv", csv_path)
    _check_output("--html", html_path)
    if args.measurements:
        measured = _read_csv("--measurements", args.measurements)
    else:
        _check_device(args.device)
        threads = args.threads or (target.threads if target.kind == "cpu" else None)
        _set_threads(threads)
        if args.configs:
            items = [PlanItem(c, n) for c in _load_config_list(args.configs) for n in args.batch_size]
        else:
            items = validation_plan(args.backbones, args.input_size, args.batch_size, args.count, args.seed)
        check = args.host_check or ("pairs" if target.fit.get("host_normalized_networks") else "ends")
        check = check if target.kind == "cpu" and target.static_ms else "none"
        before = _host_ratio(target, items, args.device, "before") if check != "none" else None
        reference = static_reference(target.static_ms, args.device) if check == "each" else None
        _logger.info("measuring %d held-out networks on %s, %d round(s)%s", len(items), args.device, args.rounds,
                     {"each": ", each followed by its static network",
                      "pairs": ", each pass paired with the static network's"}.get(check, ""))
        measured = pd.DataFrame(run_rounds(items, args.rounds, device=args.device, repeats=args.repeats,
                                           warmup=args.warmup, seed=args.seed, progress=_progress(None),
                                           reference=reference, blocks=not args.no_blocks, paired=check == "pairs"))
        if before is not None:
            measured["host_ratio_before"] = before
            measured["host_ratio_after"] = _host_ratio(target, items, args.device, "after")
    df = compare(measured, target)
    write_validation_csv(df, csv_path)
    write_validation_html(df, html_path, f"dynas validate: target {target.name}")
    rows = []
    kind = df["part"].astype(str)  # [rows] network, stage<s>, block<s>.<i>
    blocks = kind.str.startswith("block")
    gated = per_sample_gated(df) if blocks.any() else blocks
    for part, sel in (("networks", kind == "network"), ("stages", kind.str.startswith("stage")),
                      ("blocks", blocks & ~gated)):
        for n in sorted(df["batch_size"].unique()):
            sub = df[sel & (df["batch_size"] == n)]
            if sub.empty:
                continue
            rows.append(_score_row(part, n, sub))
    ratios = [float(df[c].iloc[0]) for c in ("host_ratio_before", "host_ratio_after") if c in df and df[c].notna().any()]
    steady = len(ratios) == 2 and abs(ratios[0] / ratios[1] - 1) <= HOST_STEADY
    steady_ratio = math.sqrt(ratios[0] * ratios[1]) if steady else None
    host, how = _host_factors(df, target, steady_ratio)
    if host is not None:
        for part, sel_part in (("networks", kind == "network"), ("stages", kind.str.startswith("stage")),
                               ("blocks", blocks & ~gated)):
            if how == "steady" and part != "networks":
                continue
            for n in sorted(df["batch_size"].unique()):
                sel = sel_part & (df["batch_size"] == n) & host.notna()
                sub = df[sel].copy()
                if sub.empty:
                    continue
                sub["rel_err"] = sub["predicted_ms"] * host[sel] / sub["measured_ms"] - 1
                rows.append(_score_row(f"{part} x host", n, sub))
    _print(f"target {target.name}: predicted vs measured")
    _print(_table(rows, ["part", "batch", "count", "MAPE %", "within 10%", "Spearman", "Kendall", "max |err| %"]))
    if len(ratios) == 2:
        _print(f"host speed: the calibration's static networks take {ratios[0]:.3f} x their calibrated time before "
               f"these measurements and {ratios[1]:.3f} x after (1 = unchanged)"
               + ("" if steady or how == "each" else
                  f"; the host's speed moved by more than {100 * HOST_STEADY:.0f}% meanwhile, so differences of that "
                  "size are the machine's, not the model's"))
    if (blocks & gated).any():
        _print(f"'blocks': {int((blocks & ~gated).sum())} blocks; the {int((blocks & gated).sum())} of stages whose gates "
               "choose per sample which blocks run are scored with their stage (which blocks run changes every pass)")
    _print_round_spread(df)
    if how == "each":
        _print("'x host': each prediction scaled by its static network's time right after it / at calibration")
    elif how == "pairs":
        _print("'x host': each prediction scaled by its static network's time, timed pass by pass alongside it, / at "
               "calibration")
    elif how == "steady":
        _print(f"'networks x host': the predictions scaled by {steady_ratio:.3f}")
    nets = df[df["part"] == "network"]
    worst = nets.loc[nets["rel_err"].abs().sort_values(ascending=False).index].head(5)
    if not worst.empty:
        _print("worst networks:")
        _print(_table([{"backbone": r.backbone, "batch": int(r.batch_size), "config": r.choice, "measured ms": r.measured_ms,
                        "predicted ms": r.predicted_ms, "error %": 100 * r.rel_err} for r in worst.itertuples()],
                      ["backbone", "batch", "config", "measured ms", "predicted ms", "error %"]))
    _print(f"table: {csv_path}\nplot: {html_path}")
    return 0


def _print_round_spread(df: Any) -> None:
    """The machine's own noise: how far apart the rounds of the same networks came out, and
    with pairs how far apart relative to their static networks; a warning when it was too busy."""
    from dynas.predictors.calibration import round_spread

    spread = round_spread(df)
    paired = round_spread(df, "paired_spread")
    if spread is None:
        return
    _print(f"rounds: {spread['count']} networks measured more than once; the slowest round of each took a median "
           f"{spread['median_pct']:.1f}% longer than its fastest (90th percentile {spread['p90_pct']:.1f}%): "
           "the machine's own noise, kept apart from the model's error by keeping each fastest round")
    if paired is not None:
        _print(f"pairs: relative to its static network, the slowest round of each took a median "
               f"{paired['median_pct']:.1f}% longer than its fastest (90th percentile {paired['p90_pct']:.1f}%): "
               "the noise the pairs leave")
        if paired["median_pct"] > QUIET_SPREAD_PCT:
            _logger.warning("the machine was busy even for pairs: relative to their static networks, the rounds came "
                            "out a median %.1f%% apart (more than %.0f%%); measure again when it is quieter",
                            paired["median_pct"], QUIET_SPREAD_PCT)
    elif spread["median_pct"] > QUIET_SPREAD_PCT:
        _logger.warning("the machine was busy: a median round spread of %.1f%% is more than %.0f%%, so single "
                        "measurements are off by about as much as the +/-10%% a target aims at; measure again when "
                        "it is quiet, or with --host-check pairs (or --rounds 4)", spread["median_pct"], QUIET_SPREAD_PCT)


#: a median round spread above this (percent) means the machine was too busy to measure on
QUIET_SPREAD_PCT = 5.0


#: validate scales its predictions by the host's speed only when the before and after checks agree this well
HOST_STEADY = 0.03


def _score_row(part: str, batch: Any, sub: Any) -> dict[str, Any]:
    """One line of validate's table: ``summarize`` of the rows ``sub`` of one part and batch size."""
    from dynas.predictors.calibration import summarize

    s = summarize(sub)
    return {"part": part, "batch": int(batch), "count": s["count"], "MAPE %": s["mape_pct"],
            "within 10%": f"{100 * s['within_10pct']:.0f}%", "Spearman": s["spearman"], "Kendall": s["kendall"],
            "max |err| %": s["max_abs_err_pct"]}


def _host_factors(df: Any, target: Any, steady_ratio: float | None) -> tuple[Any, str]:
    """Per-row host speed factors (now / at calibration) for scoring 'networks x host', and how
    they were found: "each" (the static network timed right after each network, ``reference_ms``),
    "pairs" (the same, timed pass by pass alongside it),
    "steady" (the before/after ratio, when it held), or (None, "")."""
    import pandas as pd

    from dynas.predictors.calibration import calibrated_static_ms

    if "reference_ms" in df and df["reference_ms"].notna().any() and target.static_ms:
        then = calibrated_static_ms(df, target)  # [rows] ms
        paired = "host_check" in df and (df["host_check"].astype(str) == "pairs").any()
        return pd.to_numeric(df["reference_ms"], errors="coerce") / then, "pairs" if paired else "each"
    if steady_ratio is not None:
        return pd.Series(steady_ratio, index=df.index), "steady"
    return None, ""


def _host_ratio(target: Any, items: Sequence[Any], device: str, when: str) -> float | None:
    """Median (now / at calibration) time of the target's recorded static networks of the
    backbones, input sizes and batch sizes of ``items``; None when it recorded none of them."""
    from dynas.kernels.calibrate import host_speed

    refs = host_speed(target.static_ms, sorted({(i.config.backbone, i.config.input_size, i.batch_size) for i in items}),
                      device)
    for r in refs:
        _logger.info("static %s, %s: %.2f ms, %.2f ms at calibration (x%.3f)", r["key"], when, r["measured_ms"],
                     r["calibrated_ms"], r["ratio"])
    if not refs:
        _logger.warning("target %s records no static network of these backbones, sizes and batch sizes: "
                        "host speed not checked", target.name)
        return None
    return statistics.median(r["ratio"] for r in refs)


def _measuring_args(p: argparse.ArgumentParser, threads_help: str, backbones: Sequence[str], backbones_help: str,
                    repeats: int, seed: int, seed_help: str) -> None:
    """Options shared by the commands that time networks (calibrate, validate)."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to measure")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help=threads_help)
    p.add_argument("--batch-size", type=_int_list, default=(1, 8), metavar="N[,N...]", help="batch sizes to measure")
    p.add_argument("--backbones", type=_str_list, default=tuple(backbones), metavar="A,B", help=backbones_help)
    p.add_argument("--input-size", type=_positive_int, default=224, metavar="N", help="image side")
    p.add_argument("--repeats", type=_positive_int, default=repeats, metavar="N", help="timed passes per network (median)")
    p.add_argument("--warmup", type=_nonneg_int, default=1, metavar="N", help="untimed passes per network first")
    p.add_argument("--seed", type=_nonneg_int, default=seed, metavar="N", help=seed_help)


def build_parser() -> argparse.ArgumentParser:
    from dynas.search.stopping import STOPPERS
    from dynas.search.study import DEFAULT_JOURNAL, DEFAULT_STORAGE, SAMPLERS, SearchOptions
    from dynas.spaces.backbones import list_backbones
    from dynas.spaces.config import PARADIGMS

    d = SearchOptions()
    parser = _Parser(
        prog="dynas",
        formatter_class=_Formatter,
        description="Find, per hardware target, the best way to make a CNN dynamic "
        "(spatial / channel / layer skipping): predicted latency vs. an accuracy proxy.",
        epilog="Run 'dynas search' with no arguments for the default search (resnet101 on v100).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log every Optuna trial")
    # The same flags after the subcommand; SUPPRESS keeps them from resetting the global ones.
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and errors on stderr")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also log every Optuna trial")
    from dynas import __version__

    parser.add_argument("--version", action="version", version=f"dynas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # targets
    p = sub.add_parser("targets", parents=[common], help="list the built-in hardware targets", formatter_class=_Formatter,
                       description="List the built-in hardware targets and their numbers.")
    p.set_defaults(func=_cmd_targets)

    # predict
    p = sub.add_parser(
        "predict", parents=[common], help="predict the latency of one config", formatter_class=_Formatter,
        description="Predict the latency of one dynamic config (a JSON file, a JSON string or an exported config).\n"
        "An exported config's own target and batch size are used unless --target is given.",
    )
    p.add_argument("config", metavar="CONFIG", help="config JSON file or JSON string")
    p.add_argument("--target", default=None, metavar="T",
                   help="built-in target name or a target .toml file (default: the exported file's target, else v100)")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="images per batch (default: the exported file's, else the target's default)")
    p.add_argument("--json", action="store_true", help="print the full prediction as one JSON object")
    p.set_defaults(func=_cmd_predict)

    # search
    p = sub.add_parser(
        "search", parents=[common], help="run or resume a search", formatter_class=_Formatter,
        description="Search dynamic configs with Optuna: minimise predicted latency of one batch, maximise the\n"
        "accuracy proxy's top-1.  Re-running the same command resumes the study (--trials is the total).\n"
        "Afterwards prints the Pareto front, writes an HTML report and exports one config (the fastest\n"
        "Pareto trial at least as accurate as the static network, else the most accurate).",
    )
    g = p.add_argument_group("what to search")
    g.add_argument("--backbone", default=d.backbone, help=f"backbone; one of {', '.join(list_backbones())}")
    g.add_argument("--target", default=d.target, metavar="T", help="built-in target name (see 'dynas targets') or a .toml file")
    g.add_argument("--input-size", type=_input_size, default=d.input_size, metavar="N|HxW", help="input resolution")
    g.add_argument("--batch-size", type=_positive_int, default=None, metavar="N", help="images per batch (default: the target's)")
    g.add_argument("--proxy", default=d.proxy,
                   help="accuracy proxy: prior (published curves, instant), finetune (a short real fine-tune per "
                   "candidate, see the finetune options), or package.module:callable returning a dynas AccuracyProxy")
    g.add_argument("--max-latency-ms", type=_float, default=None, metavar="X",
                   help="constraint: predicted latency of one batch <= X ms")
    g.add_argument("--max-latency-ratio", type=_float, default=None, metavar="X",
                   help="constraint: dynamic / static latency <= X")
    g = p.add_argument_group("finetune proxy (--proxy finetune)")
    g.add_argument("--data", default=None, metavar="SPEC",
                   help="synthetic (built in, default), synthetic:N (N training images), a torch.save file "
                   "(train_images, train_labels, val_images, val_labels) or package.module:function returning loaders")
    g.add_argument("--finetune-steps", type=_positive_int, default=None, metavar="N", help="training steps per candidate (default 40)")
    g.add_argument("--finetune-batch-size", type=_positive_int, default=None, metavar="N", help="training batch size (default 32)")
    g.add_argument("--checkpoints", type=_positive_int, default=None, metavar="N",
                   help="held-out evaluations per candidate, evenly spaced, the last at the end (default 3); early stopping decides at each")
    g.add_argument("--weights", default=None, metavar="FILE", help="static backbone state dict (torchvision names) to start from")
    g.add_argument("--pretrain-steps", type=_nonneg_int, default=None, metavar="N",
                   help="steps training the static backbone on the data once, before the search (default 200); it is the "
                   "starting point and teacher of every candidate")
    g.add_argument("--no-distill", action="store_true", help="no distillation from the static backbone")
    g = p.add_argument_group("early stopping (proxies with checkpoints: finetune)")
    g.add_argument("--early-stop", default=d.early_stop, choices=sorted(STOPPERS),
                   help="dominance: stop a candidate when --stop-min-trials complete trials at least as fast score "
                   "--stop-margin points more at the same checkpoint; halving: keep the best 1/--stop-eta at each checkpoint; none")
    g.add_argument("--stop-margin", type=_float, default=d.stop_margin, metavar="P", help="top-1 points (dominance)")
    g.add_argument("--stop-min-trials", type=_positive_int, default=d.stop_min_trials, metavar="N",
                   help="dominance: dominating complete trials needed; halving: trials at the checkpoint needed before it acts")
    g.add_argument("--stop-eta", type=_positive_int, default=d.stop_eta, metavar="N", help="halving: keep the best 1/N")
    g = p.add_argument_group("search space")
    g.add_argument("--paradigms", type=_str_list, default=None, metavar="A,B",
                   help=f"paradigms allowed per stage (default: all: {','.join(PARADIGMS)})")
    g.add_argument("--spatial-granularities", type=_int_list, default=None, metavar="1,2,4",
                   help="restrict patch sides S to these (default: every valid one)")
    g.add_argument("--channel-granularities", type=_int_list, default=None, metavar="1,2",
                   help="restrict channels per group G to these (default: every valid one)")
    g.add_argument("--rate-min", type=_float, default=d.rate_min, metavar="X", help="lowest activation rate")
    g.add_argument("--rate-max", type=_float, default=d.rate_max, metavar="X", help="highest activation rate")
    g.add_argument("--rate-step", type=_float, default=d.rate_step, metavar="X", help="activation-rate grid step")
    g = p.add_argument_group("optimisation")
    g.add_argument("--trials", type=_positive_int, default=d.trials, metavar="N",
                   help="total finished trials of the study (complete, or stopped early)")
    g.add_argument("--timeout", type=_float, default=None, metavar="S", help="stop this run after S seconds")
    g.add_argument("--sampler", default=d.sampler, choices=sorted(SAMPLERS), help=_sampler_help())
    g.add_argument("--seed", type=_nonneg_int, default=d.seed, metavar="N", help="sampler seed")
    g.add_argument("--storage", default=None, metavar="URL",
                   help=f"Optuna storage: sqlite:///F.db, journal:///F.journal (many workers, one machine) or "
                   f"postgresql://USER@HOST/DB (many machines) (default: {DEFAULT_STORAGE}; {DEFAULT_JOURNAL} with --workers > 1)")
    g.add_argument("--study-name", default=None, metavar="NAME",
                   help="study name (default: BACKBONE-TARGET-bBATCH-HxW-PROXY)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (with --workers > 1: no progress lines)")
    g = p.add_argument_group("scale-out")
    g.add_argument("--workers", type=_positive_int, default=d.workers, metavar="N",
                   help="worker processes on this machine, sharing one study; --trials stays the study's total. "
                   "On several machines, run the same command on each with one postgresql:// --storage")
    g.add_argument("--heartbeat-s", type=_float, default=d.heartbeat_s, metavar="S",
                   help="database storages: a running trial whose worker is silent for 2*S seconds is failed and retried")
    g = p.add_argument_group("output")
    g.add_argument("--top", type=_nonneg_int, default=20, metavar="N", help="print at most N Pareto rows (0: all)")
    g.add_argument("--html", default=None, metavar="F", help="HTML report (default: dynas-STUDY.html)")
    g.add_argument("--csv", default=None, metavar="F", help="also write the Pareto front as CSV")
    g.add_argument("--export", default=None, metavar="F", help="exported config (default: dynas-STUDY-export.json)")
    p.set_defaults(func=_cmd_search)

    # pareto
    p = sub.add_parser("pareto", parents=[common], help="show the Pareto front of a stored study", formatter_class=_Formatter,
                       description="Print the Pareto front of a stored study; optionally write CSV and an HTML report\n"
                       "(with --compare, one front per study in the same plot).")
    _add_study_args(p)
    p.add_argument("--compare", type=_str_list, default=None, metavar="NAME2,NAME3",
                   help="other studies of the same storage to compare with")
    p.add_argument("--top", type=_nonneg_int, default=20, metavar="N", help="print at most N Pareto rows (0: all)")
    p.add_argument("--csv", default=None, metavar="F", help="write the Pareto front as CSV")
    p.add_argument("--html", default=None, metavar="F", help="write an HTML report")
    p.set_defaults(func=_cmd_pareto)

    # export
    p = sub.add_parser(
        "export", parents=[common], help="export one trial as a training config", formatter_class=_Formatter,
        description="Export one trial of a stored study as a JSON training config.  Choose it by number, by a\n"
        "latency bound (the most accurate trial within it) or by a top-1 floor (the fastest reaching it);\n"
        "with no criterion: the fastest Pareto trial at least as accurate as the static network.",
    )
    _add_study_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--trial", type=_nonneg_int, default=None, metavar="N", help="trial number")
    g.add_argument("--max-latency-ms", type=_float, default=None, metavar="X", help="latency bound for one batch (ms)")
    g.add_argument("--max-latency-ms-per-image", type=_float, default=None, metavar="X", help="latency bound per image (ms)")
    p.add_argument("--min-top1", type=_float, default=None, metavar="Y",
                   help="top-1 floor (%%); with a latency bound: the most accurate trial meeting both")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="output JSON (default: dynas-STUDY-export.json)")
    p.set_defaults(func=_cmd_export)

    # bench
    p = sub.add_parser(
        "bench", parents=[common], help="measure a config's real speed-up (static vs dynamic)", formatter_class=_Formatter,
        description="Build the dynamic network of CONFIG and time it against its static backbone: budget gate\n"
        "mode (exactly the configured rates), fast path (real skipping), inference mode, interleaved\n"
        "A/B pairs so drift cancels; prints medians, spread, speed-up and the fast-vs-reference error.\n"
        "Freed memory is kept in the process (glibc), as calibrate and validate do.",
    )
    p.add_argument("config", metavar="CONFIG", help="config or exported JSON file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N", help="images per batch")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="CPU threads (default: torch's)")
    p.add_argument("--repeats", type=_positive_int, default=30, metavar="N", help="timed pairs")
    p.add_argument("--warmup", type=_nonneg_int, default=5, metavar="N", help="untimed runs of each first")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                   help="layout of both networks and the input")
    p.add_argument("--gates", choices=("budget", "random"), default="budget",
                   help="budget: the (untrained) gates choose; random: uniform choice per sample, as a trained\n"
                   "network's input-dependent gates and the calibrated model assume")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)

    # train
    p = sub.add_parser(
        "train", parents=[common], help="fine-tune a config on the built-in synthetic data (CPU demo)",
        formatter_class=_Formatter,
        description="Fine-tune the dynamic network of CONFIG on the built-in synthetic image set with the\n"
        "LAUDNet recipe and per-stage sparsity targets; logs the loss and each stage's realised rate.",
    )
    p.add_argument("config", metavar="CONFIG", help="config or exported JSON file")
    p.add_argument("--steps", type=_positive_int, default=300, metavar="N", help="optimisation steps")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="images per step")
    p.add_argument("--lr", type=_float, default=0.05, metavar="X", help="initial learning rate (cosine decay)")
    p.add_argument("--input-size", type=_positive_int, default=64, metavar="N", help="image side of the synthetic data")
    p.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="seed of data and initialisation")
    p.add_argument("--log-every", type=_positive_int, default=25, metavar="N", help="log every N steps")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="save the trained state dict here")
    p.set_defaults(func=_cmd_train)

    # calibrate
    from dynas.spaces.design import DEFAULT_CALIBRATION_BACKBONES, DEFAULT_VALIDATION_BACKBONES

    p = sub.add_parser(
        "calibrate", parents=[common], help="measure dynas's kernels on this device and fit a target file",
        formatter_class=_Formatter,
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
    _measuring_args(p, "CPU threads (default: torch's)", DEFAULT_CALIBRATION_BACKBONES,
                    "backbones to measure (default: one per block kind)", repeats=5, seed=0,
                    seed_help="seed of the design and the weights")
    p.add_argument("--budget-s", type=_positive_float, default=300.0, metavar="S", help="measurement time budget (seconds)")
    p.add_argument("--rounds", type=_positive_int, default=2, metavar="N",
                   help="measure the networks of the first BUDGET/N seconds N times (minutes apart); each keeps its\n"
                   "fastest round (4 on a busy machine)")
    p.add_argument("--host-check", choices=("none", "pairs"), default="none",
                   help="pairs: pass by pass, alternate each network with its static network and fit its times\n"
                   "relative to it (about twice the time per network; for a machine whose speed moves)")
    p.add_argument("--name", default=None, help="target name (default: the output file's stem)")
    p.add_argument("--csv", default=None, metavar="FILE", help="measurements CSV (default: TARGET_FILE with .csv)")
    p.add_argument("--measurements", default=None, metavar="CSV[,CSV...]",
                   help="fit earlier calibration CSVs instead of measuring, pooled when several (the measuring options "
                        "are ignored)")
    p.set_defaults(func=_cmd_calibrate)

    # validate
    p = sub.add_parser(
        "validate", parents=[common], help="compare a target's predictions with held-out measurements",
        formatter_class=_Formatter,
        description="Measure networks that were not calibrated on (random configs from a seed, rates on the\n"
        "0.15, 0.25, ... lattice that calibration never uses, or the configs of --configs), predict them\n"
        "with TARGET, and report MAPE, share within +/-10%, Spearman and Kendall for whole networks,\n"
        "single stages and single blocks, the worst cases, a predicted-vs-measured HTML plot and a CSV.\n"
        "Blocks are timed in extra passes with hooks on every block (--no-blocks skips them); blocks of\n"
        "stages whose gates choose per sample which blocks run are scored with their stage.\n"
        "Before and after, it times again the static networks the target recorded at calibration and\n"
        "reports the host's speed against then (a shared machine drifts); when both agree within 3%,\n"
        "it also scores the networks with the predictions scaled by it ('networks x host'). With\n"
        "--host-check each, every network is followed by its static network, and each prediction is\n"
        "scaled by that network's own ratio ('networks/stages/blocks x host'); with pairs, a pass of\n"
        "the static network follows every pass of the network, so the ratio comes from the same seconds.\n"
        "Freed memory is kept in the process, as calibrate does.",
    )
    p.add_argument("--target", required=True, metavar="TARGET", help="target name or file (e.g. from dynas calibrate)")
    _measuring_args(p, "CPU threads (default: the calibrated target's, else torch's)", DEFAULT_VALIDATION_BACKBONES,
                    "backbones of the random configs", repeats=7, seed=1, seed_help="seed of the random configs and weights")
    p.add_argument("--configs", default=None, metavar="FILE", help="JSON config(s) to measure instead of random ones")
    p.add_argument("--count", type=_positive_int, default=24, metavar="N", help="random configs (backbones in turn)")
    p.add_argument("--rounds", type=_positive_int, default=2, metavar="N",
                   help="measure the whole plan N times (minutes apart); each network keeps its fastest round (4 on a "
                   "busy machine)")
    p.add_argument("--host-check", choices=("ends", "each", "pairs", "none"), default=None,
                   help="time the target's recorded static networks again before and after the plan (ends), also "
                        "right after every network (each; about twice the time), also after every pass of every "
                        "network (pairs; about twice the time), or not at all (default: pairs for a target calibrated "
                        "in pairs, else ends)")
    p.add_argument("--no-blocks", action="store_true",
                   help="do not time single blocks (their extra passes about double the measuring time)")
    p.add_argument("--measurements", default=None, metavar="CSV",
                   help="score an earlier validation CSV against TARGET instead of measuring")
    p.add_argument("--csv", default=None, metavar="FILE", help="output table (default: validate-TARGET.csv)")
    p.add_argument("--html", default=None, metavar="FILE", help="output plot (default: validate-TARGET.html)")
    p.set_defaults(func=_cmd_validate)
    return parser


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so in-process callers can capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("dynas: %(message)s"))


def _setup_logging(quiet: bool, verbose: bool) -> Callable[[], None]:
    import optuna

    if _HANDLER not in _logger.handlers:
        _logger.addHandler(_HANDLER)
    old_level, old_propagate, old_optuna = _logger.level, _logger.propagate, optuna.logging.get_verbosity()
    _logger.setLevel(logging.WARNING if quiet else logging.INFO)
    _logger.propagate = False
    # Optuna's own warnings include a traceback for a trial interrupted by Ctrl-C; the CLI
    # reports that itself, so Optuna speaks only with --verbose.
    optuna.logging.set_verbosity(logging.INFO if verbose and not quiet else logging.ERROR)

    def restore() -> None:
        _logger.setLevel(old_level)
        _logger.propagate = old_propagate
        _logger.removeHandler(_HANDLER)
        optuna.logging.set_verbosity(old_optuna)

    return restore


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    sys.stderr.write(f"dynas: warning: {' '.join(str(message).split())}\n")


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"dynas: error: {' '.join(message.split())}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dynas`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except DynasError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)

    restore = _setup_logging(args.quiet, args.verbose)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args))
    except DynasError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; re-run the same command to resume the search", 130)
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}", 1)
    finally:
        restore()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
