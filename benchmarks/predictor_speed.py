"""Predictor speed: milliseconds per whole-network candidate.

Two workloads, both timing ``dynas.predict`` alone (sampler time excluded):

* search: the candidates a seeded TPE search proposes over ``--trials`` trials, in order; the
  median is taken over the trials after ``--warmup`` (the memo has warmed up on earlier ones).
* random: fresh uniformly random candidates after ``--warmup`` random warm-up candidates: the
  worst case for the memo, since almost every candidate brings unseen operator shapes.  The LAUDNet reference simulator needs about 900 ms per
whole-network candidate on a 2-core machine (LAUDNet's public DyNetSimulator, LeapLabTHU/LAUDNet).

    python benchmarks/predictor_speed.py [--backbone resnet101] [--target v100] [--warmup 300] [--n 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna

from dynas.predictors.latency import clear_caches, predict
from dynas.spaces.searchspace import SearchSpace


def _configs(space: SearchSpace, n: int, seed: int):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet101")
    ap.add_argument("--target", default="v100")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--trials", type=int, default=500)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(args.backbone)
    warm = _configs(space, args.warmup, seed=1)
    timed = _configs(space, args.n, seed=2)
    clear_caches()
    t0 = time.perf_counter()
    predict(warm[0], args.target)
    cold_ms = (time.perf_counter() - t0) * 1e3
    for cfg in warm:
        predict(cfg, args.target)
    times = []
    for cfg in timed:
        t0 = time.perf_counter()
        predict(cfg, args.target)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    print(f"{args.backbone} on {args.target}: first candidate (cold memo, incl. FLOP count) {cold_ms:.1f} ms")
    print(
        f"after {args.warmup} warm-up candidates, {args.n} new candidates: median {statistics.median(times):.3f} ms, "
        f"p90 {q(0.9):.3f} ms, max {times[-1]:.3f} ms per candidate"
    )
    clear_caches()
    predict(warm[0], args.target)
    study = optuna.create_study(
        directions=["minimize", "maximize"], sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True)
    )
    from dynas.predictors.proxy import get_proxy

    proxy = get_proxy("prior")
    search_times = []
    for _ in range(args.trials):
        trial = study.ask()
        cfg = space.suggest(trial)
        t0 = time.perf_counter()
        pred = predict(cfg, args.target)
        search_times.append((time.perf_counter() - t0) * 1e3)
        study.tell(trial, [pred.latency_ms, proxy.score(cfg)])
    tail = sorted(search_times[args.warmup :]) or sorted(search_times)
    print(
        f"search workload (TPE, {args.trials} trials): median {statistics.median(tail):.3f} ms, p90 "
        f"{tail[int(0.9 * (len(tail) - 1))]:.3f} ms per candidate over trials {args.warmup}..{args.trials}; "
        f"all trials together {sum(search_times) / 1e3:.2f} s"
    )
    print(f"reference simulator: ~900 ms per candidate -> median speed-up x{900 / statistics.median(times):.0f}")


if __name__ == "__main__":
    main()
