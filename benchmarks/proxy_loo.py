"""Leave-one-out check of the 'prior' accuracy proxy, plus its per-call cost.

Run from the repository root::

    python benchmarks/proxy_loo.py

Prints the fitted parameters, the leave-one-out table (each published LAUDNet ResNet-101 point
predicted by a fit that did not see it), its MAE / max error in top-1 points, and the time of
``PriorProxy.score`` (first call per stage choice, then memoized).  Timings are printed, never
asserted.
"""

from __future__ import annotations

import json
import random
import time

import pandas as pd

from dynas.predictors.accuracy import PriorProxy, fit_prior, leave_one_out
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import PARADIGMS, ArchConfig, StageConfig, channel_granularities, spatial_granularities


def _random_configs(n: int, backbone: str, seed: int = 0) -> list[ArchConfig]:
    rng = random.Random(seed)
    spec = get_backbone(backbone)
    rates = [round(0.1 + 0.05 * i, 2) for i in range(19)]
    out = []
    for _ in range(n):
        stages = []
        for s in range(spec.num_stages):
            p = rng.choice(PARADIGMS)
            if p == "static":
                stages.append(StageConfig())
                continue
            sg = rng.choice(spatial_granularities(spec, s)) if p in ("spatial", "spatial+channel") else None
            cg = (
                rng.choice(channel_granularities(spec, s))
                if p in ("channel", "spatial+channel", "layer+channel")
                else None
            )
            cr = rng.choice(rates) if p in ("spatial+channel", "layer+channel") else None
            stages.append(StageConfig(p, rng.choice(rates), sg, cg, cr))
        out.append(ArchConfig(backbone, spec.input_hw, tuple(stages)))
    return out


def main() -> None:
    t0 = time.perf_counter()
    fit = fit_prior()
    t_fit = time.perf_counter() - t0
    print("Fitted prior (all 13 published points):")
    print(json.dumps(fit.to_dict(), indent=2))

    t0 = time.perf_counter()
    df, summary = leave_one_out()
    t_loo = time.perf_counter() - t0
    print("\nLeave-one-out (top-1 %, ResNet-101, same rate in all stages):")
    with pd.option_context("display.float_format", "{:.2f}".format, "display.width", 120):
        print(df.to_string(index=False))
    by_paradigm = df.groupby("paradigm")["abs_error"].agg(["mean", "max"])
    print("\nper paradigm (points):")
    print(by_paradigm.to_string(float_format="{:.3f}".format))
    print(
        f"\nLOO MAE {summary['mae']:.3f} points, max {summary['max_abs_error']:.3f} points over {summary['n_points']} points"
    )

    proxy = PriorProxy()
    configs = _random_configs(2000, "resnet50")
    t0 = time.perf_counter()
    for c in configs:
        proxy.score(c)
    cold = (time.perf_counter() - t0) / len(configs)
    t0 = time.perf_counter()
    for _ in range(5):
        for c in configs:
            proxy.score(c)
    warm = (time.perf_counter() - t0) / (5 * len(configs))
    print(f"\nfit {t_fit * 1e3:.0f} ms (first one includes the torch import and FLOPs count), LOO {t_loo * 1e3:.0f} ms")
    print(f"score: {cold * 1e6:.1f} us per config while filling the memo, {warm * 1e6:.1f} us per config after warm-up")


if __name__ == "__main__":
    main()
