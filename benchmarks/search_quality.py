"""Search quality: hypervolume versus trials for several samplers, against a reference front.

For each (backbone, target) setting, every sampler runs ``--trials`` trials for each seed on
the default search space with the prior proxy.  The reference front is the union of every
trial of every run plus one long NSGA-II run of ``--reference-trials`` trials.  Printed:
hypervolume after n trials as a fraction of the reference front's hypervolume (mean over
seeds), with the default reference point of ``dynas.results.hypervolume``.

    python benchmarks/search_quality.py [--trials 500] [--seeds 0 1] [--reference-trials 3000]
"""

from __future__ import annotations

import argparse
import logging
import time

import optuna
import pandas as pd

from dynas.results import hypervolume, hypervolume_history
from dynas.search.study import SearchOptions, run_search

CHECKPOINTS = (50, 100, 250, 500, 1000)


def _run(backbone: str, target: str, sampler: str, trials: int, seed: int) -> optuna.Study:
    return run_search(
        SearchOptions(
            backbone=backbone,
            target=target,
            sampler=sampler,
            trials=trials,
            seed=seed,
            storage=optuna.storages.InMemoryStorage(),
            study_name="bench",
            show_progress=False,
        )
    )


def _union(studies: list[optuna.Study]) -> optuna.Study:
    union = optuna.create_study(directions=["minimize", "maximize"])
    for k, v in studies[0].user_attrs.items():
        union.set_user_attr(k, v)
    for s in studies:
        union.add_trials(s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    return union


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"])
    ap.add_argument("--targets", nargs="+", default=["v100", "tx2"])
    ap.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "random"])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--reference-trials", type=int, default=3000)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("dynas").setLevel(logging.WARNING)
    rows = []
    for backbone in args.backbones:
        for target in args.targets:
            runs: dict[tuple[str, int], optuna.Study] = {}
            seconds: dict[str, float] = {}
            for sampler in args.samplers:
                t0 = time.perf_counter()
                for seed in args.seeds:
                    runs[sampler, seed] = _run(backbone, target, sampler, args.trials, seed)
                seconds[sampler] = (time.perf_counter() - t0) / len(args.seeds)
            long_run = _run(backbone, target, "nsga2", args.reference_trials, 12345)
            ref_hv = hypervolume(_union([*runs.values(), long_run]))
            for sampler in args.samplers:
                row = {"backbone": backbone, "target": target, "sampler": sampler}
                for n in CHECKPOINTS:
                    if n <= args.trials:
                        fr = [hypervolume_history(runs[sampler, s])[n - 1] / ref_hv for s in args.seeds]
                        row[f"hv@{n}"] = sum(fr) / len(fr)
                row["s/run"] = seconds[sampler]
                rows.append(row)
            print(
                pd.DataFrame(rows[-len(args.samplers) :]).to_string(index=False, float_format=lambda v: f"{v:.3f}"),
                flush=True,
            )
    print()
    print(f"Hypervolume after n trials / hypervolume of the reference front (mean of seeds {args.seeds}):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
