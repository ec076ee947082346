"""Does the search's predicted speed-up hold on the device the target was calibrated on?

Runs ``dynas search`` on a calibrated target, takes three configs from its Pareto front (the
slowest, the middle and the fastest by predicted speed-up, among those predicted to be at
least ``--min-speedup`` faster than static), and times each with ``dynas bench`` (interleaved
static/dynamic pairs, random gate mode: the decision model the calibrated target assumes).
Prints predicted and measured speed-ups side by side and their relative difference.

    python benchmarks/calibrated_pareto.py --target ./cpu-mine.toml --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import optuna

from dynas.cli import main as dynas_main
from dynas.kernels.bench import bench
from dynas.predictors.latency import predict
from dynas.results.export import export_trial
from dynas.results.pareto import front_trials


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-speedup", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dynas-pareto-"))
    storage = f"sqlite:///{work / 'study.db'}"
    rc = dynas_main(
        [
            "search",
            "--backbone",
            args.backbone,
            "--target",
            args.target,
            "--trials",
            str(args.trials),
            "--batch-size",
            str(args.batch_size),
            "--storage",
            storage,
            "--study-name",
            "calibrated",
            "--seed",
            str(args.seed),
            "--html",
            str(work / "report.html"),
            "--export",
            str(work / "export.json"),
            "--no-progress",
            "-q",
        ]
    )
    if rc != 0:
        return rc
    study = optuna.load_study(study_name="calibrated", storage=storage)
    rows = []
    for t in front_trials(study):
        export_trial(study, t, work / f"trial{t.number}.json")
        p = predict(work / f"trial{t.number}.json", args.target, args.batch_size)
        if p.speedup >= args.min_speedup:
            rows.append((p.speedup, t.number, p))
    rows.sort(key=lambda r: r[0])
    if len(rows) < 3:
        print(f"only {len(rows)} front configs predicted >= x{args.min_speedup}", file=sys.stderr)
        return 1
    picks = [rows[0], rows[len(rows) // 2], rows[-1]]
    print("| config | predicted x | measured x | difference |")
    print("|---|---:|---:|---:|")
    for speedup, number, _ in picks:
        r = bench(
            work / f"trial{number}.json",
            batch_size=args.batch_size,
            threads=args.threads,
            repeats=args.repeats,
            warmup=3,
            gate_mode="random",
        )
        print(
            f"| `{r.config}` | {speedup:.2f} | {r.speedup:.2f} | {100 * (speedup / r.speedup - 1):+.1f}% |", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
