"""``dynas targets`` (the built-in hardware targets) and ``dynas predict`` (one config's latency)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dynas.cli.common import add_command, echo, positive_int, table
from dynas.errors import ConfigError

__all__ = ["add_parsers", "export_hints"]

#: target of ``dynas predict`` when neither --target nor an exported file names one
DEFAULT_TARGET = "v100"


def _cmd_targets(args: argparse.Namespace) -> int:
    from dynas.predictors.targets import list_targets, load_target

    rows = []
    for name in list_targets():
        t = load_target(name)
        rows.append(
            {
                "name": t.name,
                "SMs": t.n_sm,
                "lanes/SM": t.lanes_per_sm,
                "clock GHz": t.clock_hz / 1e9,
                "DRAM GB/s": t.dram_bandwidth_Bps / 1e9,
                "batch": t.default_batch_size,
                **(
                    {
                        "static W": t.energy.static_power_w,
                        "pJ/FLOP": t.energy.pj_per_flop,
                        "pJ/B DRAM": t.energy.pj_per_dram_byte,
                    }
                    if t.energy is not None
                    else {}
                ),
                "description": t.description,
            }
        )
    echo(
        table(
            rows,
            [
                "name",
                "SMs",
                "lanes/SM",
                "clock GHz",
                "DRAM GB/s",
                "batch",
                "static W",
                "pJ/FLOP",
                "pJ/B DRAM",
                "description",
            ],
        )
    )
    echo("energy figures: [energy] of each target file, their sources in its [sources] (docs/energy.md)")
    return 0


def export_hints(source: str) -> tuple[str | None, int | None]:
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
        raise ConfigError(
            f"config target={target!r} is not a target name; allowed: a built-in target name or a .toml path"
        )
    batch = data.get("batch_size")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"config batch_size={batch!r} is not allowed; allowed: a positive integer")
    return target, batch


def _cmd_predict(args: argparse.Namespace) -> int:
    from dynas.predictors.latency import predict
    from dynas.spaces.config import load_config

    cfg = load_config(args.config)
    hint_target, hint_batch = export_hints(args.config)
    target = args.target if args.target is not None else (hint_target or DEFAULT_TARGET)
    batch = args.batch_size if args.batch_size is not None else (hint_batch if args.target is None else None)
    pred = predict(cfg, target, batch)
    if args.json:
        echo(json.dumps(pred.to_dict(), indent=2))
        return 0
    h, w = cfg.input_size
    echo(f"{cfg.backbone} @ {h}x{w} on {pred.target}, batch {pred.batch_size}")
    echo(
        f"latency {pred.latency_ms:.4g} ms per batch ({pred.latency_ms_per_image:.4g} ms per image); "
        f"static {pred.static_latency_ms:.4g} ms; speed-up {pred.speedup:.3f}x"
    )
    echo(
        f"FLOPs {pred.dense_gflops:.4g} -> {pred.expected_gflops:.4g} GFLOPs per image "
        f"({pred.flops_ratio:.3f} of dense)"
    )
    if pred.energy_mj is not None:
        echo(
            f"energy {pred.energy_mj:.4g} mJ per batch ({pred.energy_mj_per_image:.4g} mJ per image); "
            f"static {pred.static_energy_mj:.4g} mJ"
        )
    echo()
    rows: list[dict[str, Any]] = [
        {"stage": "stem", "choice": "", "latency ms": pred.stem_ms, "static ms": pred.stem_ms}
    ]
    for s in pred.stages:
        rows.append(
            {
                "stage": str(s.stage),
                "choice": s.choice,
                "latency ms": s.latency_ms,
                "static ms": s.static_latency_ms,
                "compute ms": s.compute_ms,
                "memory ms": s.memory_ms,
                "launch ms": s.launch_ms,
                "masker": s.masker,
                "bound": s.bound,
                "energy mJ": s.energy_mj,
            }
        )
    rows[0]["energy mJ"] = pred.stem_energy_mj
    rows.append(
        {
            "stage": "head",
            "choice": "",
            "latency ms": pred.head_ms,
            "static ms": pred.head_ms,
            "energy mJ": pred.head_energy_mj,
        }
    )
    rows.append(
        {
            "stage": "total",
            "choice": "",
            "latency ms": pred.latency_ms,
            "static ms": pred.static_latency_ms,
            "energy mJ": pred.energy_mj,
        }
    )
    cols = ["stage", "choice", "latency ms", "static ms", "compute ms", "memory ms", "launch ms", "masker", "bound"]
    cols += ["energy mJ"] if pred.energy_mj is not None else []
    echo(table(rows, cols))
    return 0


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    """Register ``targets`` and ``predict`` with ``sub`` (their shared flags come from ``parent``)."""
    add_command(
        sub,
        parent,
        "targets",
        _cmd_targets,
        help="list the built-in hardware targets",
        description="List the built-in hardware targets and their numbers.",
    )

    p = add_command(
        sub,
        parent,
        "predict",
        _cmd_predict,
        help="predict the latency of one config",
        description="Predict the latency of one dynamic config (a JSON file, a JSON string or an exported config).\n"
        "An exported config's own target and batch size are used unless --target is given.",
    )
    p.add_argument("config", metavar="CONFIG", help="config JSON file or JSON string")
    p.add_argument(
        "--target",
        default=None,
        metavar="T",
        help="built-in target name or a target .toml file (default: the exported file's target, else "
        f"{DEFAULT_TARGET})",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="images per batch (default: the exported file's, else the target's default)",
    )
    p.add_argument("--json", action="store_true", help="print the full prediction as one JSON object")
