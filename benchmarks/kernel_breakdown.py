"""Where the predicted time of kernel_speed.py's configs goes, by kind of work: docs/kernels.md.

For each config of ``benchmarks/kernel_speed.py`` (rate as there), the CPU work model
(:mod:`dynas.predictors.cpu`) counts the work of every stage and a calibrated CPU target prices
it; this prints the stages' predicted milliseconds split into compute, memory and per-call
costs (``dynas.predictors.cpu_terms.KINDS``), static against dynamic, and the number of
operators each dispatches.  It explains a measured speed-up table with the costs fitted on the
same host; it measures nothing.

    python benchmarks/kernel_breakdown.py --target benchmarks/data/cpu-2core-dec07b/cpu-2core-dec07b.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import CONFIGS  # noqa: E402

from dynas.predictors.cpu_terms import KINDS, TERM_KINDS, TERMS  # noqa: E402
from dynas.predictors.latency import predict, stage_work  # noqa: E402
from dynas.predictors.targets import load_target  # noqa: E402
from dynas.spaces.config import ArchConfig, load_config, stage_runs  # noqa: E402

TARGET = Path(__file__).resolve().parent / "data/cpu-2core-dec07b/cpu-2core-dec07b.toml"


def _stages_by_kind(cfg: ArchConfig, target, n: int) -> tuple[np.ndarray, float]:
    """[len(KINDS)] predicted ms of the stages by kind of cost, and the operators dispatched."""
    cost = target.cpu.vector_ms()  # [terms] ms per unit of work
    runs = stage_runs(cfg)
    work = sum(
        stage_work(cfg.backbone, cfg.input_size, s, st, n, runs[s], target.column_block)
        for s, st in enumerate(cfg.stages)
    )  # [terms]
    return (TERM_KINDS * (work * cost)).sum(axis=1), float(work[TERMS.index("op_calls")])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default=str(TARGET))
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args(argv)
    target = load_target(args.target)
    if target.cpu is None:
        ap.error(f"--target={args.target!r} is not a calibrated CPU target; allowed: a target of dynas calibrate")
    static = ArchConfig.static(args.backbone, (224, 224))
    kinds = " / ".join(KINDS)
    print(f"target {target.name}; stages' predicted ms by kind ({kinds}); operators dispatched")
    print(
        f"| config | batch | static ({kinds}) | dynamic ({kinds}) | operators static / dynamic | predicted speed-up |"
    )
    print("|---|---:|---|---|---:|---:|")
    for name, (_, rate, build) in CONFIGS.items():
        cfg = load_config({"backbone": args.backbone, "input_size": 224, "stages": build(rate)})
        for n in args.batch_sizes:
            (s_ms, s_ops), (d_ms, d_ops) = _stages_by_kind(static, target, n), _stages_by_kind(cfg, target, n)
            speedup = predict(cfg, target, n).speedup
            print(
                f"| {name} @ {rate} | {n} | {' / '.join(f'{v:.0f}' for v in s_ms)} | "
                f"{' / '.join(f'{v:.0f}' for v in d_ms)} | {s_ops:.0f} / {d_ops:.0f} | {speedup:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
