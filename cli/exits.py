"""``dynas exits``: confidence thresholds of a trained early-exit model for a latency budget.

``dynas exits CONFIG --weights RUN/model.pt --target T --budget-ms X`` runs the trained model
once over the validation split of ``--data`` (every exit computed), fits per-exit confidence
thresholds whose mean predicted latency per image on T meets X (MSDNet's budgeted-batch
procedure: :func:`dynas.kernels.exits.fit_thresholds`, :mod:`dynas.predictors.thresholds`),
writes them into the config (``exit_thresholds``; CONFIG itself unless ``-o``), then runs the
confidence policy with them on the same split and prints its top-1 and the mean predicted
latency per image.  ``--budgets-ms B1,B2,...`` prints the accuracy-vs-budget table (with the
budget and deadline policies' accuracy at each budget) and, with ``--html``, a plotly chart.

Everything that can be refused (config without exits, unknown target, a budget below the first
exit's cost, weights of another config, a data set of another class count, unwritable outputs)
is refused with one line before anything is written.  docs/early-exits.md has the details.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from dynas.cli.common import (
    UsageError,
    add_command,
    check_output,
    echo,
    nonneg_int,
    number_list,
    positive_int,
    positive_number,
    table,
)
from dynas.errors import ConfigError

__all__ = ["add_parsers", "policy_rows"]

#: the data the exit features default to (docs/early-exits.md, "The harder synthetic set")
DEFAULT_EXIT_DATA = "synthetic-hard"


def policy_rows(exits: list[Any], exit_top1: list[float], budgets_ms: list[float]) -> list[dict[str, Any]]:
    """Per budget (ms per image), what the budget and deadline policies answer with.

    ``exits``: the target's :class:`~dynas.predictors.result.ExitPrediction` s, own head last;
    ``exit_top1``: each exit's top-1 (%) on the validation split.  The budget policy answers
    from the deepest exit whose latency straight to it fits; the deadline policy, under a clock
    that runs exactly as predicted, from the deepest exit whose anytime latency (earlier heads
    included) fits.  ``None`` where no exit fits.
    """
    rows = []
    for b in budgets_ms:
        row: dict[str, Any] = {"budget_ms": b}
        for policy, cost in (("budget", "latency_ms_per_image"), ("deadline", "anytime_latency_ms_per_image")):
            fits = [e.exit for e in exits if getattr(e, cost) <= b * (1 + 1e-12)]
            k = max(fits) if fits else None
            row[f"{policy}_exit"] = k
            row[f"{policy}_top1"] = None if k is None else exit_top1[k]
        rows.append(row)
    return rows


def _raw_config(source: str) -> dict[str, Any] | None:
    """CONFIG as the JSON object it is (a file, or inline JSON text), to write back with its extra keys."""
    try:
        text = source if source.lstrip().startswith("{") else Path(source).read_text()
        raw = json.loads(text)
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything checked before the model runs: config, target, budgets, output paths."""
    from dynas.kernels.evaluate import config_target
    from dynas.predictors.latency import predict
    from dynas.predictors.targets import load_target
    from dynas.predictors.thresholds import check_budget
    from dynas.spaces.config import load_config

    if args.budget_ms is None and not args.budgets_ms:
        raise UsageError("--budget-ms or --budgets-ms is missing; allowed: --budget-ms X and/or --budgets-ms B1,B2,...")
    if args.budget_ms is None and args.output:
        raise UsageError(f"-o={args.output!r} needs --budget-ms (the budget whose thresholds are written)")
    if args.html and not args.budgets_ms:
        raise UsageError(f"--html={args.html!r} needs --budgets-ms (the curve it plots)")
    check_output("-o", args.output)
    check_output("--html", args.html)
    cfg = load_config(args.config)
    if not cfg.exits:
        raise ConfigError(
            f'config={args.config!r} has no exits; allowed: a config with "exits": [...] (docs/early-exits.md)'
        )
    out = None
    if args.budget_ms is not None:
        out = args.output or (args.config if os.path.isfile(args.config) else None)
        if out is None:
            raise UsageError("CONFIG is inline JSON, not a file; allowed: -o OUT to write the config with thresholds")
        check_output("-o", out)
    target = load_target(args.target or config_target(args.config) or "v100")
    pred = predict(cfg, target, args.latency_batch_size)
    first = pred.exits[0].anytime_latency_ms_per_image
    budgets = [check_budget(b, first, cfg.exits[0]) for b in (args.budget_ms, *args.budgets_ms) if b is not None]
    return {
        "cfg": cfg,
        "target": target,
        "batch_size": pred.batch_size,
        "exits": pred.exits,
        "budgets": budgets,
        "out": out,
    }


class _Normalised:
    """A loader's ``(images, labels)`` batches with the images normalised, re-iterable (read twice)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Any:
        from dynas.kernels.imagefolder import normalise

        return ((normalise(x), y) for x, y in self.loader)  # [B, 3, H, W] float, [B]


def _val_batches(args: argparse.Namespace, model: Any, cfg: Any) -> tuple[_Normalised, str]:
    """The validation split of ``--data`` as normalised ``(images, labels)`` batches, and its description."""
    import torch

    from dynas.kernels.data import check_datasets, load_datasets

    data = load_datasets(args.data, cfg.input_size, args.seed, splits=("val",), check=False)
    if data.num_classes != model.fc.out_features:
        raise ConfigError(
            f"--data={args.data!r} has {data.num_classes} classes; the weights have {model.fc.out_features}; "
            "allowed: the data the model was trained on"
        )
    data = check_datasets(data, threads=max(1, os.cpu_count() or 1))
    loader = torch.utils.data.DataLoader(
        data.val, batch_size=args.batch_size, num_workers=args.workers if data.decodes else 0
    )
    return _Normalised(loader), data.source


def _confidence_run(model: Any, batches: _Normalised, thresholds: tuple[float, ...]) -> tuple[float, list[float]]:
    """Top-1 (%) of the confidence policy with ``thresholds`` over ``batches`` and the share of images per exit."""
    import torch

    model.eval().set_exit_policy("confidence", thresholds=list(thresholds))
    hits, counts = 0, torch.zeros(len(model.config.exits) + 1)
    with torch.no_grad():
        for x, y in batches:
            hits += int((model(x).argmax(dim=1) == y).sum())
            counts += torch.bincount(model.last_exit, minlength=len(counts)).float()  # [exits]
    model.set_exit_policy("final")
    n = float(counts.sum())
    return 100.0 * hits / n, [float(c) / n for c in counts]


def _fit(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """Run the model, fit the thresholds for every budget, evaluate the chosen one, write it."""
    import torch

    from dynas.kernels.evaluate import trained_model
    from dynas.kernels.exits import exit_outputs, fit_from_outputs, with_thresholds

    cfg, exits = plan["cfg"], plan["exits"]
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model = trained_model(cfg, args.weights)
        batches, source = _val_batches(args, model, cfg)
        confidence, correct = exit_outputs(model, batches)  # [exits, n] each
        fits = fit_from_outputs(cfg, confidence, correct, plan["target"], plan["budgets"], args.latency_batch_size)
        exit_top1 = [100.0 * float(v) for v in correct.float().mean(dim=1)]
        result: dict[str, Any] = {
            "config": cfg.short(),
            "target": plan["target"].name,
            "batch_size": plan["batch_size"],
            "data": source,
            "images": int(correct.shape[1]),
            "exits": [
                {
                    "exit": e.exit,
                    "after_stage": e.after_stage,
                    "top1": t,
                    "latency_ms_per_image": e.latency_ms_per_image,
                    "anytime_latency_ms_per_image": e.anytime_latency_ms_per_image,
                }
                for e, t in zip(exits, exit_top1)
            ],
        }
        if args.budgets_ms:
            curve = fits[1:] if args.budget_ms is not None else fits
            rows = policy_rows(list(exits), exit_top1, [f.budget_ms for f in curve])
            result["curve"] = [
                {**f.to_dict(), "confidence_top1": 100.0 * f.accuracy, **row} for f, row in zip(curve, rows)
            ]
        if args.budget_ms is not None:
            chosen = fits[0]
            top1, shares = _confidence_run(model, batches, chosen.thresholds)
            costs = [e.anytime_latency_ms_per_image for e in exits]
            result["chosen"] = {
                **chosen.to_dict(),
                "measured_top1": top1,
                "measured_shares": shares,
                "measured_mean_latency_ms": sum(s * c for s, c in zip(shares, costs)),
            }
            result["written"] = _write(args, plan, with_thresholds(cfg, chosen))
    finally:
        torch.set_num_threads(threads)
    return result


def _write(args: argparse.Namespace, plan: dict[str, Any], new_cfg: Any) -> str:
    """The config with ``exit_thresholds``, its other keys kept, validated, then written atomically."""
    from dynas.files import atomic_write_text
    from dynas.spaces.config import load_config

    raw = _raw_config(args.config) or {}
    raw.pop("exit_thresholds", None)
    raw.update(new_cfg.to_dict())
    if load_config(raw) != new_cfg:  # the written file must read back as the fitted config
        raise ConfigError(f"config={args.config!r}: the config with thresholds does not read back; not written")
    atomic_write_text(plan["out"], json.dumps(raw, indent=2, allow_nan=False) + "\n", ConfigError)
    return str(plan["out"])


def _html(path: str, result: dict[str, Any]) -> None:
    import plotly.graph_objects as go

    from dynas.files import atomic_write_text

    fig = go.Figure()
    x = [r["budget_ms"] for r in result["curve"]]
    for key, name in (
        ("confidence_top1", "confidence policy (fitted thresholds)"),
        ("budget_top1", "budget policy (deepest exit that fits)"),
        ("deadline_top1", "deadline policy (clock as predicted)"),
    ):
        fig.add_trace(go.Scatter(x=x, y=[r[key] for r in result["curve"]], mode="lines+markers", name=name))
    fig.add_trace(
        go.Scatter(
            x=[e["anytime_latency_ms_per_image"] for e in result["exits"]],
            y=[e["top1"] for e in result["exits"]],
            mode="markers+text",
            text=[f"exit after stage {e['after_stage']}" for e in result["exits"]],
            textposition="bottom right",
            name="each exit alone (anytime cost)",
        )
    )
    fig.update_layout(
        title=f"dynas exits: {result['config']} on {result['target']} ({result['images']} val images)",
        xaxis_title="budget: mean predicted latency per image (ms)",
        yaxis_title="top-1 on the validation split (%)",
        template="plotly_white",
    )
    atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True), ConfigError)


def _print(result: dict[str, Any]) -> None:
    echo(
        f"{result['config']} on {result['target']} (batch {result['batch_size']}), "
        f"{result['images']} validation images of {result['data']}"
    )
    echo(
        table(result["exits"], ["exit", "after_stage", "top1", "latency_ms_per_image", "anytime_latency_ms_per_image"])
    )
    if "curve" in result:
        echo()
        rows = [{**r, "thresholds": ",".join(f"{t:.3g}" for t in r["thresholds"])} for r in result["curve"]]
        cols = ["budget_ms", "confidence_top1", "mean_latency_ms", "thresholds", "budget_top1", "deadline_top1"]
        echo(table(rows, cols))
        echo("(top-1 in %, latencies in ms per image; budget/deadline: one exit for all images)")
    if "chosen" in result:
        c = result["chosen"]
        echo()
        echo(
            f"budget {c['budget_ms']:g} ms per image: thresholds {', '.join(f'{t:.4g}' for t in c['thresholds'])}; "
            f"confidence policy top-1 {c['measured_top1']:.2f}%, mean predicted latency "
            f"{c['measured_mean_latency_ms']:.4g} ms per image (images per exit: "
            f"{' / '.join(f'{100 * s:.0f}%' for s in c['measured_shares'])})"
        )
        echo(f"written: {result['written']}")


def _cmd_exits(args: argparse.Namespace) -> int:
    plan = _plan(args)
    result = _fit(args, plan)
    if args.html:
        _html(args.html, result)
        result["html"] = args.html
    if args.json:
        echo(json.dumps(result, indent=2, allow_nan=False))
    else:
        _print(result)
        if args.html:
            echo(f"written: {args.html}")
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``exits`` sub-command to ``sub`` (``common``: the -q/-v parent)."""
    p = add_command(
        sub,
        common,
        "exits",
        _cmd_exits,
        help="confidence thresholds of a trained early-exit model for a latency budget",
        description="Fit per-exit confidence thresholds of CONFIG's exits so that the mean predicted latency per\n"
        "image on --target meets --budget-ms (MSDNet's budgeted-batch procedure, on the validation split of\n"
        "--data), write them into the config (exit_thresholds) and print the confidence policy's top-1 there.\n"
        "--budgets-ms prints the accuracy-vs-budget table, beside the budget and deadline policies.\n"
        "docs/early-exits.md describes the procedure and the policies.",
    )
    p.add_argument("config", metavar="CONFIG", help="config or exported JSON file with exits (RUN/config.json)")
    p.add_argument("--weights", required=True, metavar="FILE", help="trained weights: RUN/model.pt (or checkpoint.pt)")
    p.add_argument(
        "--data",
        default=DEFAULT_EXIT_DATA,
        metavar="DATA",
        help="the data the model was trained on (its val split is used): image folder DIR, "
        "synthetic[-hard][:N] or a torch.save file",
    )
    p.add_argument(
        "--target", default=None, metavar="T", help="hardware target (default: the config's export target, else v100)"
    )
    p.add_argument(
        "--budget-ms", type=positive_number, default=None, metavar="X", help="budget: mean latency per image (ms)"
    )
    p.add_argument(
        "--budgets-ms",
        type=number_list,
        default=(),
        metavar="B1,B2,...",
        help="budgets of the accuracy-vs-budget table",
    )
    p.add_argument("-o", "--output", default=None, metavar="OUT", help="write the config here (default: CONFIG)")
    p.add_argument("--html", default=None, metavar="FILE", help="plotly chart of the --budgets-ms curve")
    p.add_argument(
        "--latency-batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="batch size of the predicted latencies (default: the target's)",
    )
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the synthetic sets (as dynas train)")
    p.add_argument("--workers", type=nonneg_int, default=4, metavar="N", help="loader workers (image folders)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
