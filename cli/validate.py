"""``dynas validate``: measure networks the calibration never saw and score a target's
predictions of them (registered by :mod:`dynas.cli`).

Scoring lives in the library (:mod:`dynas.results.validation`); this module measures (with the
helpers :mod:`dynas.cli.measure` shares with ``dynas calibrate``), calls it and prints.  torch is
imported only inside the command, so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from dynas.cli.common import (
    UsageError,
    add_command,
    check_output,
    default_of,
    echo,
    positive_int,
    safe_name,
    table,
    torch_default,
)
from dynas.cli.measure import (
    RUN_ROUNDS,
    check_device,
    measuring_args,
    print_round_spread,
    progress,
    read_csv,
    set_threads,
)
from dynas.spaces.design import validation_plan

__all__ = ["add_parsers"]

_logger = logging.getLogger("dynas")

#: the command line's own choice (the library functions have no such default)
VALIDATE_REPEATS = 7  # timed passes per network of ``dynas validate``


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
        raise UsageError(
            f"--configs={path!r} holds no configs; allowed: a JSON config, a JSON list of configs, or JSON lines"
        )
    return [load_config(d) for d in data]


def _host_ratio(target: Any, items: Sequence[Any], device: str, when: str) -> float | None:
    """Time the target's recorded static networks of the backbones, input sizes and batch sizes
    of ``items`` again; their median now / at calibration, None when it recorded none of them."""
    from dynas.kernels.calibrate import host_speed
    from dynas.results.validation import host_ratio

    refs = host_speed(
        target.static_ms, sorted({(i.config.backbone, i.config.input_size, i.batch_size) for i in items}), device
    )
    for r in refs:
        _logger.info(
            "static %s, %s: %.2f ms, %.2f ms at calibration (x%.3f)",
            r["key"],
            when,
            r["measured_ms"],
            r["calibrated_ms"],
            r["ratio"],
        )
    if not refs:
        _logger.warning(
            "target %s records no static network of these backbones, sizes and batch sizes: host speed not checked",
            target.name,
        )
    return host_ratio(refs)


def _measure_validation(args: argparse.Namespace, target: Any) -> Any:
    """Measure the held-out networks (with the host checks ``--host-check`` asks for); the table."""
    import pandas as pd

    from dynas.kernels.calibrate import run_rounds, static_reference
    from dynas.spaces.design import PlanItem

    check_device(args.device)
    threads = args.threads or (target.threads if target.kind == "cpu" else None)
    set_threads(threads)
    if args.configs:
        items = [PlanItem(c, n) for c in _load_config_list(args.configs) for n in args.batch_size]
    else:
        items = validation_plan(args.backbones, args.input_size, args.batch_size, args.count, args.seed)
    check = args.host_check or ("pairs" if target.fit.get("host_normalized_networks") else "ends")
    check = check if target.kind == "cpu" and target.static_ms else "none"
    before = _host_ratio(target, items, args.device, "before") if check != "none" else None
    reference = static_reference(target.static_ms, args.device) if check == "each" else None
    _logger.info(
        "measuring %d held-out networks on %s, %d round(s)%s",
        len(items),
        args.device,
        args.rounds,
        {"each": ", each followed by its static network", "pairs": ", each pass paired with the static network's"}.get(
            check, ""
        ),
    )
    measured = pd.DataFrame(
        run_rounds(
            items,
            args.rounds,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            progress=progress(None),
            reference=reference,
            blocks=not args.no_blocks,
            paired=check == "pairs",
        )
    )
    if before is not None:
        measured["host_ratio_before"] = before
        measured["host_ratio_after"] = _host_ratio(target, items, args.device, "after")
    return measured


def _print_scores(df: Any, target: Any) -> None:
    """validate's score table and the notes that read it (host speed, gated blocks, noise, scaling)."""
    from dynas.results.validation import HOST_STEADY, score_validation

    scores = score_validation(df, target)
    rows = [
        {
            "part": r["part"],
            "batch": r["batch_size"],
            "count": r["count"],
            "MAPE %": r["mape_pct"],
            "within 10%": f"{100 * r['within_10pct']:.0f}%",
            "Spearman": r["spearman"],
            "Kendall": r["kendall"],
            "max |err| %": r["max_abs_err_pct"],
        }
        for r in scores.table.to_dict("records")
    ]
    how, ratios = scores.host_scaling, scores.host_ratios
    echo(f"target {target.name}: predicted vs measured")
    echo(table(rows, ["part", "batch", "count", "MAPE %", "within 10%", "Spearman", "Kendall", "max |err| %"]))
    if len(ratios) == 2:
        echo(
            f"host speed: the calibration's static networks take {ratios[0]:.3f} x their calibrated time before "
            f"these measurements and {ratios[1]:.3f} x after (1 = unchanged)"
            + (
                ""
                if scores.steady_ratio is not None or how == "each"
                else f"; the host's speed moved by more than {100 * HOST_STEADY:.0f}% meanwhile, so differences of that "
                "size are the machine's, not the model's"
            )
        )
    if scores.gated_blocks:
        echo(
            f"'blocks': {scores.blocks} blocks; the {scores.gated_blocks} of stages whose gates "
            "choose per sample which blocks run are scored with their stage (which blocks run changes every pass)"
        )
    print_round_spread(df)
    if how == "each":
        echo("'x host': each prediction scaled by its static network's time right after it / at calibration")
    elif how == "pairs":
        echo(
            "'x host': each prediction scaled by its static network's time, timed pass by pass alongside it, / at "
            "calibration"
        )
    elif how == "steady":
        echo(f"'networks x host': the predictions scaled by {scores.steady_ratio:.3f}")


def _cmd_validate(args: argparse.Namespace) -> int:
    from dynas.predictors.calibration import compare
    from dynas.predictors.targets import load_target
    from dynas.results.validation import worst_networks, write_validation_csv, write_validation_html

    target = load_target(args.target)
    stem = f"validate-{safe_name(target.name)}"
    csv_path, html_path = args.csv or f"{stem}.csv", args.html or f"{stem}.html"
    check_output("--csv", csv_path)
    check_output("--html", html_path)
    measured = read_csv("--measurements", args.measurements) if args.measurements else _measure_validation(args, target)
    df = compare(measured, target)
    write_validation_csv(df, csv_path)
    write_validation_html(df, html_path, f"dynas validate: target {target.name}")
    _print_scores(df, target)
    worst = worst_networks(df)
    if not worst.empty:
        echo("worst networks:")
        echo(
            table(
                [
                    {
                        "backbone": r.backbone,
                        "batch": int(r.batch_size),
                        "config": r.choice,
                        "measured ms": r.measured_ms,
                        "predicted ms": r.predicted_ms,
                        "error %": 100 * r.rel_err,
                    }
                    for r in worst.itertuples()
                ],
                ["backbone", "batch", "config", "measured ms", "predicted ms", "error %"],
            )
        )
    echo(f"table: {csv_path}\nplot: {html_path}")
    return 0


def _add_validate_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = add_command(
        sub,
        parent,
        "validate",
        _cmd_validate,
        help="compare a target's predictions with held-out measurements",
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
    measuring_args(
        p,
        validation_plan,
        "CPU threads (default: the calibrated target's, else torch's)",
        "backbones of the random configs",
        repeats=VALIDATE_REPEATS,
        seed_help="seed of the random configs and weights",
    )
    p.add_argument("--configs", default=None, metavar="FILE", help="JSON config(s) to measure instead of random ones")
    p.add_argument(
        "--count",
        type=positive_int,
        default=default_of(validation_plan, "count"),
        metavar="N",
        help="random configs (backbones in turn)",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=torch_default(RUN_ROUNDS, "rounds"),
        metavar="N",
        help="measure the whole plan N times (minutes apart); each network keeps its fastest round (4 on a "
        "busy machine)",
    )
    p.add_argument(
        "--host-check",
        choices=("ends", "each", "pairs", "none"),
        default=None,
        help="time the target's recorded static networks again before and after the plan (ends), also "
        "right after every network (each; about twice the time), also after every pass of every "
        "network (pairs; about twice the time), or not at all (default: pairs for a target calibrated "
        "in pairs, else ends)",
    )
    p.add_argument(
        "--no-blocks",
        action="store_true",
        help="do not time single blocks (their extra passes about double the measuring time)",
    )
    p.add_argument(
        "--measurements",
        default=None,
        metavar="CSV",
        help="score an earlier validation CSV against TARGET instead of measuring",
    )
    p.add_argument("--csv", default=None, metavar="FILE", help="output table (default: validate-TARGET.csv)")
    p.add_argument("--html", default=None, metavar="FILE", help="output plot (default: validate-TARGET.html)")


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    """Register ``validate`` with ``sub`` (shared flags from ``parent``)."""
    _add_validate_parser(sub, parent)
