"""Trials per second versus worker processes, per storage, with a cheap and a slow proxy.

    python benchmarks/scaleout_throughput.py [--repeats 3] [--postgres URL] [--out FILE.csv]

For each storage (a journal file; PostgreSQL when a URL is given by ``--postgres`` or
``DYNAS_TEST_POSTGRES_URL``; ``bash -c '. .ci/postgres && python benchmarks/...'`` starts a
throwaway server), each proxy and 1, 2 and 4 workers, it runs a fresh ResNet-18 / A100 study of
a fixed number of trials through :func:`dynas.search.run_search` (what ``dynas search --workers
N`` runs) and times it from the call to the return: worker start-up, the storage's writes and
the claims of the trial budget included, the proxy fit excluded (done once, before timing).

Proxies: ``prior`` (the analytical proxy, well under 1 ms per trial, so the storage and the
sampler are what is measured) and ``tests.slow_proxy:sleep_200ms`` (the same plus 200 ms
of sleep per trial, standing in for an expensive proxy; sleeping frees the CPU, so this shows
how workers overlap slow trials even on a 2-core machine).

Prints the median wall time over ``--repeats`` runs of each cell, trials per second, and the
speed-up over one worker of the same storage and proxy, all measured side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.slow_proxy, for this process and its workers
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")

import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from dynas.search.study import SearchOptions, plan_search, run_search  # noqa: E402

PROXIES = {"prior": 120, "tests.slow_proxy:sleep_200ms": 40}  # proxy -> trials per study
WORKERS = (1, 2, 4)


def one_run(storage: str, proxy: str, trials: int, workers: int) -> float:
    options = SearchOptions(
        backbone="resnet18",
        target="a100",
        proxy=proxy,
        trials=trials,
        workers=workers,
        storage=storage,
        study_name=f"bench-{uuid.uuid4().hex[:8]}",
        show_progress=False,
        seed=0,
    )
    plan = plan_search(options)
    plan.study_attrs()  # proxy fit and FLOP tables: once per process, not timed
    start = time.perf_counter()
    study = run_search(plan)
    wall_s = time.perf_counter() - start
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if complete != trials:
        raise SystemExit(f"{storage} {proxy} x{workers}: {complete} complete trials, expected {trials}")
    return wall_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--postgres", default=os.environ.get("DYNAS_TEST_POSTGRES_URL"))
    ap.add_argument("--out", default=None, help="also write the table as CSV")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        storages = {"journal": lambda: f"journal:///{Path(tmp) / uuid.uuid4().hex}.journal"}
        if args.postgres:
            storages["postgresql"] = lambda: args.postgres
        else:
            print("PostgreSQL skipped: no --postgres URL and no DYNAS_TEST_POSTGRES_URL", file=sys.stderr)
        for kind, url in storages.items():
            for proxy, trials in PROXIES.items():
                for workers in WORKERS:
                    walls = [one_run(url(), proxy, trials, workers) for _ in range(args.repeats)]
                    wall_s = statistics.median(walls)
                    rows.append(
                        dict(
                            storage=kind,
                            proxy=proxy.rsplit(":", 1)[-1],
                            workers=workers,
                            trials=trials,
                            median_wall_s=wall_s,
                            trials_per_s=trials / wall_s,
                            runs_s=" ".join(f"{w:.2f}" for w in walls),
                        )
                    )
                    print(
                        f"{kind:10s} {proxy:36s} workers={workers}: median {wall_s:6.2f} s "
                        f"({trials / wall_s:6.2f} trials/s)",
                        file=sys.stderr,
                        flush=True,
                    )
    df = pd.DataFrame(rows)
    base = df[df.workers == 1].set_index(["storage", "proxy"]).trials_per_s
    df["speedup_vs_1"] = [r.trials_per_s / base[(r.storage, r.proxy)] for r in df.itertuples()]
    print(f"cpu cores: {os.cpu_count()}, repeats: {args.repeats}, optuna {optuna.__version__}")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.out:
        df.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
