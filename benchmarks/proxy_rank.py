"""How well each accuracy proxy ranks configs: Spearman against a longer fine-tune.

    python benchmarks/proxy_rank.py [--configs 16] [--budgets 15 45] [--reference-steps 150] [--seed 0]

On a harder variant of the synthetic task (ResNet-18 at 32x32; squares of 1/16 of the image,
background noise 0.4, contrast 1.5, so that configs still differ after the reference
fine-tune; on the built-in set every config reaches ~100% and no ranking is left to measure),
written as a tensor file and passed as ``data=``, ``--configs`` random configs of the search
space (seeded) are scored by the ``prior`` proxy and by the ``finetune`` proxy at each step
budget of ``--budgets``; the reference is the same fine-tune with ``--reference-steps`` steps.  Prints the
Spearman rank correlation of each proxy's score with the reference top-1 (and Kendall's tau),
and writes every score to ``--out``.  All fine-tunes start from the same prepared static
backbone (200 steps on the data), as in a search.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import torch

from dynas.kernels.finetune import FinetuneProxy
from dynas.kernels.trainer import synthetic_images
from dynas.predictors.accuracy import PriorProxy
from dynas.spaces.config import ArchConfig
from dynas.spaces.searchspace import SearchSpace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=16)
    ap.add_argument("--budgets", type=int, nargs="+", default=[15, 45])
    ap.add_argument("--reference-steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--data", default="/tmp/dynas-proxy-rank-data.pt", help="where the tensor file is written")
    ap.add_argument("--out", default=str(Path(__file__).parent / "data" / "proxy-rank-synthetic.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    space = SearchSpace("resnet18", input_size=(32, 32))
    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    configs: list[ArchConfig] = []
    while len(configs) < args.configs:
        trial = sampler_study.ask()
        cfg = space.suggest(trial)
        sampler_study.tell(trial, 0.0)
        if cfg not in configs:
            configs.append(cfg)

    x, y = synthetic_images(2048 + 512, (32, 32), seed=args.seed, noise=0.4, contrast=1.5, side_fraction=4)
    torch.save(
        {
            "train_images": x[:2048],
            "train_labels": y[:2048],
            "val_images": x[2048:],
            "val_labels": y[2048:],
            "num_classes": 10,
        },
        args.data,
    )  # [N, 3, 32, 32], [N]
    prior = PriorProxy()
    common = dict(data=args.data, checkpoints=1, pretrain_steps=args.pretrain_steps)
    proxies = {f"finetune_{b}": FinetuneProxy(steps=b, **common) for b in args.budgets}
    proxies["reference"] = FinetuneProxy(steps=args.reference_steps, **common)
    shared = proxies["reference"].prepare("resnet18", (32, 32))
    for p in proxies.values():
        p._prepared[("resnet18", (32, 32))] = shared  # one prepared static backbone for all
    rows = []
    for i, cfg in enumerate(configs):
        row = {"config": cfg.short(), "prior": prior.score(cfg)}
        for name, p in proxies.items():
            t0 = time.perf_counter()
            row[name] = p.score(cfg)
            row[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(i, row, flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    names = ["prior", *[f"finetune_{b}" for b in args.budgets]]
    summary = pd.DataFrame(
        {
            "proxy": names,
            "spearman": [df[n].corr(df["reference"], method="spearman") for n in names],
            "kendall": [df[n].corr(df["reference"], method="kendall") for n in names],
            "s_per_config": [0.0 if n == "prior" else df[f"{n}_s"].median() for n in names],
        }
    )
    print(f"static backbone: {shared['top1']:.1f}% after {args.pretrain_steps} steps")
    print(
        f"{len(df)} configs; reference: finetune {args.reference_steps} steps (median {df['reference_s'].median():.1f} s per config)"
    )
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
