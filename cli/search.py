"""``dynas search`` (run or resume a study), ``dynas pareto`` (its front) and ``dynas export``
(one trial as a training config)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from dynas.cli.common import (
    add_command,
    check_output,
    default_of,
    echo,
    image_size,
    int_list,
    nonneg_int,
    number,
    number_list,
    positive_int,
    safe_name,
    str_list,
    table,
    torch_default,
)
from dynas.cli.search_report import print_exported, print_front, raise_infeasible
from dynas.errors import ConfigError
from dynas.search.options import FLAT_OPTIONS, OBJECTIVES
from dynas.search.study import DEFAULT_JOURNAL, DEFAULT_STORAGE, SAMPLERS, SearchOptions

__all__ = ["add_parsers", "search_default", "search_options", "print_front"]

#: Pareto rows ``dynas search`` and ``dynas pareto`` print unless --top says otherwise
TOP_ROWS = 20

#: the finetune proxy, whose options --finetune-steps etc. are
FINETUNE_PROXY = "dynas.kernels.finetune:FinetuneProxy"

#: finetune option -> its flag, for messages
_FINETUNE_FLAGS = {
    "steps": "--finetune-steps",
    "batch_size": "--finetune-batch-size",
    "distill": "--no-distill",
    "pretrain_steps": "--pretrain-steps",
}


def search_default(name: str) -> Any:
    """The default of search option ``name`` (a :class:`~dynas.search.study.SearchOptions` field,
    or a flat name of its space and stopping options, :data:`~dynas.search.options.FLAT_OPTIONS`):
    the one place the search flags read their defaults from."""
    if name in FLAT_OPTIONS:
        owner, field = FLAT_OPTIONS[name]
        return getattr(default_of(SearchOptions, owner), field)
    return default_of(SearchOptions, name)


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The :class:`~dynas.search.study.SearchOptions` of ``dynas search`` 's arguments."""
    kw: dict[str, Any] = dict(
        backbone=args.backbone,
        target=args.target,
        input_size=args.input_size,
        batch_size=args.batch_size,
        proxy=args.proxy,
        trials=args.trials,
        timeout_s=args.timeout,
        sampler=args.sampler,
        seed=args.seed,
        storage=args.storage,
        workers=args.workers,
        heartbeat_s=args.heartbeat_s,
        study_name=args.study_name,
        objective=args.objective,
        max_latency_ms=args.max_latency_ms,
        max_latency_ratio=args.max_latency_ratio,
        spatial_granularities=args.spatial_granularities,
        channel_granularities=args.channel_granularities,
        rate_min=args.rate_min,
        rate_max=args.rate_max,
        rate_step=args.rate_step,
        show_progress=not args.no_progress,
        budgets_ms=args.budgets_ms,
        budgets_mj=args.budgets_mj,
        budget_ratios=args.budget_ratios,
    )
    if args.exit_heads is not None:
        kw["exit_heads"] = args.exit_heads
    if args.paradigms is not None:
        kw["paradigms"] = args.paradigms
    finetune = {
        "data": args.data,
        "steps": args.finetune_steps,
        "batch_size": args.finetune_batch_size,
        "checkpoints": args.checkpoints,
        "weights": args.weights,
        "pretrain_steps": args.pretrain_steps,
        "distill": False if args.no_distill else None,
    }
    given = {k: v for k, v in finetune.items() if v is not None}
    if given:
        if args.proxy != "finetune":
            first = next(iter(given))
            flag = _FINETUNE_FLAGS.get(first, "--" + first)
            raise ConfigError(f"{flag} applies to --proxy finetune only; got --proxy {args.proxy}")
        kw["proxy_options"] = given
    kw.update(
        early_stop=args.early_stop,
        stop_margin=args.stop_margin,
        stop_min_trials=args.stop_min_trials,
        stop_eta=args.stop_eta,
    )
    return SearchOptions(**kw)


def _cmd_search(args: argparse.Namespace) -> int:
    from dynas.results import export_trial, pareto_table, select_trial, write_csv, write_html
    from dynas.search.study import plan_search, run_search

    plan = plan_search(search_options(args))  # validates every option; writes nothing
    stem = safe_name(plan.study_name)
    html = args.html if args.html is not None else f"dynas-{stem}.html"
    export = args.export if args.export is not None else f"dynas-{stem}-export.json"
    for option, path in (("--html", html), ("--csv", args.csv), ("--export", export)):
        check_output(option, path)

    study = run_search(plan)
    print_front(study, args.top)
    if not study.best_trials:
        raise_infeasible(study, plan.options)
    trial = select_trial(study)  # before writing the report and the export
    write_html([study], html, breakdown_trial=trial.number)
    if args.csv:
        write_csv(pareto_table(study), args.csv)
    export_trial(study, trial, export)
    echo()
    echo(f"HTML report: {html}")
    if args.csv:
        echo(f"Pareto CSV:  {args.csv}")
    print_exported(study, trial, export)
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    from dynas.results import hypervolume, pareto_table, write_csv, write_html
    from dynas.search.study import load_study

    check_output("--csv", args.csv)
    check_output("--html", args.html)
    study = load_study(args.storage, args.study_name)
    others = [load_study(args.storage, name) for name in (args.compare or ())]
    print_front(study, args.top)
    if others:
        rows = []
        for s in [study, *others]:
            a = s.user_attrs
            front = pareto_table(s)
            rows.append(
                {
                    "study": s.study_name,
                    "target": a.get("target"),
                    "batch": a.get("batch_size"),
                    "trials": sum(1 for t in s.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                    "front": len(front),
                    "best speed-up": float(front["speedup"].max()) if len(front) else float("nan"),
                    "hypervolume": hypervolume(s),
                }
            )
        echo()
        echo(table(rows, ["study", "target", "batch", "trials", "front", "best speed-up", "hypervolume"]))
    if args.csv:
        write_csv(pareto_table(study), args.csv)
        echo(f"Pareto CSV: {args.csv}")
    if args.html:
        write_html([study, *others], args.html)
        echo(f"HTML report: {args.html}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dynas.results import export_trial, select_trial
    from dynas.search.study import load_study

    check_output("--output", args.output)
    study = load_study(args.storage, args.study_name)
    output = args.output or f"dynas-{safe_name(study.study_name)}-export.json"
    check_output("--output", output)
    trial = select_trial(
        study,
        trial=args.trial,
        max_latency_ms=args.max_latency_ms,
        min_top1=args.min_top1,
        max_latency_ms_per_image=args.max_latency_ms_per_image,
    )
    export_trial(study, trial, output)
    print_exported(study, trial, output)
    return 0


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------


def _sampler_help() -> str:
    lines = [f"{name}: {(fn.__doc__ or '').strip().splitlines()[0].rstrip('.')}" for name, fn in SAMPLERS.items()]
    return "sampler (" + "; ".join(lines) + ")"


def _add_what_args(p: argparse.ArgumentParser) -> None:
    from dynas.spaces.backbones import list_backbones

    g = p.add_argument_group("what to search")
    g.add_argument(
        "--backbone",
        default=search_default("backbone"),
        help=f"backbone, one of {len(list_backbones())} (docs/backbones.md): resnet18..152, regnetx_* and regnety_* "
        "400mf..32gf, densenet121/169/201",
    )
    g.add_argument(
        "--target",
        default=search_default("target"),
        metavar="T",
        help="built-in target name (see 'dynas targets') or a .toml file",
    )
    g.add_argument(
        "--input-size", type=image_size, default=search_default("input_size"), metavar="N|HxW", help="input resolution"
    )
    g.add_argument(
        "--batch-size", type=positive_int, default=None, metavar="N", help="images per batch (default: the target's)"
    )
    g.add_argument(
        "--proxy",
        default=search_default("proxy"),
        help="accuracy proxy: prior (published curves, instant), finetune (a short real fine-tune per "
        "candidate, see the finetune options), or package.module:callable returning a dynas AccuracyProxy",
    )
    g.add_argument(
        "--objective",
        default=search_default("objective"),
        choices=list(OBJECTIVES),
        help="cost minimised beside top-1, per batch: latency (ms, the default) or energy (mJ; targets with an "
        "[energy] table, see 'dynas targets'; the default with --budgets-mj); trials record both either way",
    )
    g.add_argument(
        "--max-latency-ms",
        type=number,
        default=None,
        metavar="X",
        help="constraint: predicted latency of one batch <= X ms (either objective)",
    )
    g.add_argument(
        "--max-latency-ratio",
        type=number,
        default=None,
        metavar="X",
        help="constraint: dynamic / static latency <= X (either objective)",
    )


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "latency or energy budgets and early exits (docs/search.md#latency-budgets-and-early-exits)"
    )
    g.add_argument(
        "--budgets-ms",
        type=number_list,
        metavar="B1,B2",
        help="latency budgets (ms, whole batch): early exits join the search space and each trial scores the mean, "
        "over the budgets, of the top-1 of its deepest exit that fits (chance if none); needs --proxy finetune",
    )
    g.add_argument(
        "--budget-ratios",
        type=number_list,
        metavar="R1,R2",
        help="the same budgets as ratios of the static network's predicted latency on the target (its energy with "
        "--objective energy; not with --budgets-ms or --budgets-mj)",
    )
    g.add_argument(
        "--budgets-mj",
        type=number_list,
        metavar="B1,B2",
        help="energy budgets (mJ, whole batch; targets with an [energy] table): as --budgets-ms, with the deepest exit "
        "whose predicted energy fits; the cost minimised is energy (--objective energy, the default here)",
    )
    g.add_argument("--exit-heads", type=str_list, metavar="H1,H2", help="exit heads searched (default: light)")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    # None = not given: only given options reach the proxy, and they are refused without --proxy finetune.
    default = functools.partial(torch_default, FINETUNE_PROXY)  # default("steps"): the proxy's default

    g = p.add_argument_group("finetune proxy (--proxy finetune)")
    g.add_argument(
        "--data",
        default=None,
        metavar="SPEC",
        help="synthetic (built in, default), synthetic:N (N training images), a torch.save file "
        "(train_images, train_labels, val_images, val_labels) or package.module:function returning loaders",
    )
    g.add_argument(
        "--finetune-steps",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"training steps per candidate (default {default('steps')})",
    )
    g.add_argument(
        "--finetune-batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"training batch size (default {default('batch_size')})",
    )
    g.add_argument(
        "--checkpoints",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"held-out evaluations per candidate, evenly spaced, the last at the end (default "
        f"{default('checkpoints')}); early stopping decides at each",
    )
    g.add_argument(
        "--weights", default=None, metavar="FILE", help="static backbone state dict (torchvision names) to start from"
    )
    g.add_argument(
        "--pretrain-steps",
        type=nonneg_int,
        default=None,
        metavar="N",
        help=f"steps training the static backbone on the data once, before the search (default "
        f"{default('pretrain_steps')}); it is the starting point and teacher of every candidate",
    )
    g.add_argument("--no-distill", action="store_true", help="no distillation from the static backbone")


def _add_stopping_args(p: argparse.ArgumentParser) -> None:
    from dynas.search.stopping import STOPPERS

    g = p.add_argument_group("early stopping (proxies with checkpoints: finetune)")
    g.add_argument(
        "--early-stop",
        default=search_default("early_stop"),
        choices=sorted(STOPPERS),
        help="dominance: stop a candidate when --stop-min-trials complete trials at least as fast score "
        "--stop-margin points more at the same checkpoint; halving: keep the best 1/--stop-eta at each checkpoint; none",
    )
    g.add_argument(
        "--stop-margin",
        type=number,
        default=search_default("stop_margin"),
        metavar="P",
        help="top-1 points (dominance)",
    )
    g.add_argument(
        "--stop-min-trials",
        type=positive_int,
        default=search_default("stop_min_trials"),
        metavar="N",
        help="dominance: dominating complete trials needed; halving: trials at the checkpoint needed before it acts",
    )
    g.add_argument(
        "--stop-eta",
        type=positive_int,
        default=search_default("stop_eta"),
        metavar="N",
        help="halving: keep the best 1/N",
    )


def _add_space_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search space")
    g.add_argument(
        "--paradigms",
        type=str_list,
        default=None,
        metavar="A,B",
        help=f"paradigms allowed per stage (default: all: {','.join(search_default('paradigms'))})",
    )
    g.add_argument(
        "--spatial-granularities",
        type=int_list,
        default=None,
        metavar="1,2,4",
        help="restrict patch sides S to these (default: every valid one)",
    )
    g.add_argument(
        "--channel-granularities",
        type=int_list,
        default=None,
        metavar="1,2",
        help="restrict channels per group G to these (default: every valid one)",
    )
    g.add_argument(
        "--rate-min", type=number, default=search_default("rate_min"), metavar="X", help="lowest activation rate"
    )
    g.add_argument(
        "--rate-max", type=number, default=search_default("rate_max"), metavar="X", help="highest activation rate"
    )
    g.add_argument(
        "--rate-step", type=number, default=search_default("rate_step"), metavar="X", help="activation-rate grid step"
    )


def _add_optimisation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--trials",
        type=positive_int,
        default=search_default("trials"),
        metavar="N",
        help="total finished trials of the study (complete, or stopped early)",
    )
    g.add_argument("--timeout", type=number, default=None, metavar="S", help="stop this run after S seconds")
    g.add_argument("--sampler", default=search_default("sampler"), choices=sorted(SAMPLERS), help=_sampler_help())
    g.add_argument("--seed", type=nonneg_int, default=search_default("seed"), metavar="N", help="sampler seed")
    g.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help=f"Optuna storage: sqlite:///F.db, journal:///F.journal (many workers, one machine) or "
        f"postgresql://USER@HOST/DB (many machines) (default: {DEFAULT_STORAGE}; {DEFAULT_JOURNAL} with --workers > 1)",
    )
    g.add_argument(
        "--study-name",
        default=None,
        metavar="NAME",
        help="study name (default: BACKBONE-TARGET-bBATCH-HxW-PROXY, plus -energy with --objective energy)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (with --workers > 1: no progress lines)")
    g = p.add_argument_group("scale-out")
    g.add_argument(
        "--workers",
        type=positive_int,
        default=search_default("workers"),
        metavar="N",
        help="worker processes on this machine, sharing one study; --trials stays the study's total. "
        "On several machines, run the same command on each with one postgresql:// --storage",
    )
    g.add_argument(
        "--heartbeat-s",
        type=number,
        default=search_default("heartbeat_s"),
        metavar="S",
        help="database storages: a running trial whose worker is silent for 2*S seconds is failed and retried",
    )


def _add_study_args(p: argparse.ArgumentParser) -> None:
    """--storage and --study-name of the commands that read a stored study."""
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        metavar="URL",
        help="Optuna storage: sqlite:///F.db, journal:///F.journal or postgresql://USER@HOST/DB",
    )
    p.add_argument(
        "--study-name",
        default=None,
        metavar="NAME",
        help="study to read (default: the only study in the storage)",
    )


def _add_search_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = add_command(
        sub,
        parent,
        "search",
        _cmd_search,
        help="run or resume a search",
        description="Search dynamic configs with Optuna: minimise predicted latency (or, --objective energy,\n"
        "energy) of one batch, maximise the accuracy proxy's top-1.  Re-running the same command resumes the study (--trials is the total).\n"
        "Afterwards prints the Pareto front, writes an HTML report and exports one config (the fastest\n"
        "Pareto trial at least as accurate as the static network, else the most accurate).",
    )
    _add_what_args(p)
    _add_budget_args(p)
    _add_finetune_args(p)
    _add_stopping_args(p)
    _add_space_args(p)
    _add_optimisation_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--top", type=nonneg_int, default=TOP_ROWS, metavar="N", help="print at most N Pareto rows (0: all)")
    g.add_argument("--html", default=None, metavar="F", help="HTML report (default: dynas-STUDY.html)")
    g.add_argument("--csv", default=None, metavar="F", help="also write the Pareto front as CSV")
    g.add_argument("--export", default=None, metavar="F", help="exported config (default: dynas-STUDY-export.json)")


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    """Register ``search``, ``pareto`` and ``export`` with ``sub`` (shared flags from ``parent``)."""
    _add_search_parser(sub, parent)

    p = add_command(
        sub,
        parent,
        "pareto",
        _cmd_pareto,
        help="show the Pareto front of a stored study",
        description="Print the Pareto front of a stored study; optionally write CSV and an HTML report\n"
        "(with --compare, one front per study in the same plot).",
    )
    _add_study_args(p)
    p.add_argument(
        "--compare",
        type=str_list,
        default=None,
        metavar="NAME2,NAME3",
        help="other studies of the same storage to compare with",
    )
    p.add_argument("--top", type=nonneg_int, default=TOP_ROWS, metavar="N", help="print at most N Pareto rows (0: all)")
    p.add_argument("--csv", default=None, metavar="F", help="write the Pareto front as CSV")
    p.add_argument("--html", default=None, metavar="F", help="write an HTML report")

    p = add_command(
        sub,
        parent,
        "export",
        _cmd_export,
        help="export one trial as a training config",
        description="Export one trial of a stored study as a JSON training config.  Choose it by number, by a\n"
        "latency bound (the most accurate trial within it) or by a top-1 floor (the fastest reaching it);\n"
        "with no criterion: the fastest Pareto trial at least as accurate as the static network.",
    )
    _add_study_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--trial", type=nonneg_int, default=None, metavar="N", help="trial number")
    g.add_argument("--max-latency-ms", type=number, default=None, metavar="X", help="latency bound for one batch (ms)")
    g.add_argument(
        "--max-latency-ms-per-image", type=number, default=None, metavar="X", help="latency bound per image (ms)"
    )
    p.add_argument(
        "--min-top1",
        type=number,
        default=None,
        metavar="Y",
        help="top-1 floor (%%); with a latency bound: the most accurate trial meeting both",
    )
    p.add_argument(
        "-o", "--output", default=None, metavar="FILE", help="output JSON (default: dynas-STUDY-export.json)"
    )
