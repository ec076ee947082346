"""What multi-objective early stopping saves: the finetune proxy on the synthetic task.

    python benchmarks/early_stopping.py [--trials 24] [--steps 40] [--seed 0] [--out FILE.csv]

Three fresh searches side by side in one run, same seed, same search space (ResNet-18 at 32x32
on the A100 target), same finetune proxy (prepared once and shared, so its preparation is not
timed):

1. ``--early-stop none`` for ``--trials`` trials; its wall time T is the budget;
2. ``--early-stop dominance`` with a timeout of T (and room for many more trials);
3. ``--early-stop halving`` with a timeout of T.

Prints per run: finished and stopped trials, training steps spent, trials per hour, and the
final hypervolume (reference: latency ratio 1.5, chance-level top-1).  For the two early-stopping
runs it also prints the hypervolume and the time at the moment they had finished as many trials
as run 1 (same trial budget).  Writes one CSV row per run (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from dynas.kernels.finetune import FinetuneProxy
from dynas.results import hypervolume
from dynas.search.study import SearchOptions, finished_trials, plan_search, run_search


def _steps_spent(study: optuna.Study, steps: int) -> int:
    return sum(
        steps if t.state == TrialState.COMPLETE else int(t.user_attrs["stopped_at_step"])
        for t in finished_trials(study)
        if "duplicate_of" not in t.user_attrs
    )


def _hv_at(study: optuna.Study, n: int) -> tuple[float, float]:
    """Hypervolume and elapsed seconds once ``n`` trials had finished (trial-number order)."""
    trials = sorted(finished_trials(study), key=lambda t: t.number)[:n]
    first = min(t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start)
    sub = optuna.create_study(directions=["minimize", "maximize"])
    for k, v in study.user_attrs.items():
        sub.set_user_attr(k, v)
    sub.add_trials(trials)
    return hypervolume(sub), (max(t.datetime_complete for t in trials) - first).total_seconds()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data" / "early-stopping-cpu-2core.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    proxy = FinetuneProxy(steps=args.steps, checkpoints=3, pretrain_steps=200)
    base = SearchOptions(
        backbone="resnet18",
        input_size=32,
        target="a100",
        proxy="finetune",
        trials=args.trials,
        seed=args.seed,
        show_progress=False,
    )
    rows = []
    budget_s = None
    for rule in ("none", "dominance", "halving"):
        options = dataclasses.replace(
            base,
            early_stop=rule,
            storage=optuna.storages.InMemoryStorage(),
            trials=args.trials if rule == "none" else 10 * args.trials,
            timeout_s=budget_s,
        )
        plan = dataclasses.replace(plan_search(options), proxy=proxy)
        plan.study_attrs()  # prepares the static backbone once (cached on the shared proxy), untimed
        t0 = time.perf_counter()
        study = run_search(plan)
        wall = time.perf_counter() - t0
        if rule == "none":
            budget_s = wall
        done = finished_trials(study)
        stopped = [t for t in done if t.state == TrialState.PRUNED]
        row = {
            "early_stop": rule,
            "seed": args.seed,
            "steps_per_trial": args.steps,
            "wall_s": round(wall, 1),
            "finished": len(done),
            "stopped": len(stopped),
            "train_steps": _steps_spent(study, args.steps),
            "trials_per_hour": round(3600 * len(done) / wall, 1),
            "hypervolume": round(hypervolume(study), 3),
        }
        if rule != "none" and len(done) >= args.trials:
            hv_n, t_n = _hv_at(study, args.trials)
            row.update({f"hv_at_{args.trials}": round(hv_n, 3), f"s_at_{args.trials}": round(t_n, 1)})
        rows.append(row)
        print(row, flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
