"""Does depth pay on ``synthetic-hard``?  Top-1 of each exit after a brief joint training.

Trains a static ResNet-18 with exits after stages 0, 1 and 2 (and its own head) from scratch on
``synthetic-hard:N`` with :func:`dynas.kernels.recipe.exit_loss` (cross-entropies of all exits
+ distillation of the early exits from the final one), then prints each exit's held-out top-1,
and the same for the easy ``synthetic`` set for contrast.  A benchmark, not a test: the numbers
go into docs/early-exits.md with this command::

    python benchmarks/exits_depth.py --steps 300 --size 48 --sets synthetic-hard
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

from dynas.kernels.data import DataSplits, load_data
from dynas.kernels.exits import exit_accuracies
from dynas.kernels.model import build_model
from dynas.kernels.recipe import exit_loss


def train_model(
    cfg: dict[str, Any],
    splits: DataSplits,
    steps: int,
    lr: float,
    seed: int,
    loss_fn: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    label: str = "",
) -> Any:
    """``build_model(cfg)`` trained from scratch for ``steps`` steps on ``splits`` (SGD, Nesterov,
    cosine); ``loss_fn(model, x, y)`` defaults to :func:`exit_loss` of every exit's output."""
    torch.manual_seed(seed)
    model = build_model(cfg).set_num_classes(splits.num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batches = splits.train_batches()
    for step in range(steps):
        x, y = next(batches)  # [B, 3, H, W], [B]
        loss = exit_loss(model(x), y) if loss_fn is None else loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  {label} step {step:4d} loss {float(loss.detach()):.3f}", flush=True)
    return model


def run(data: str, steps: int, size: int, batch: int, lr: float, head: str, seed: int) -> list[float]:
    splits = load_data(data, (size, size), batch, seed)
    cfg = {"backbone": "resnet18", "input_size": size, "stages": [{}] * 4, "exits": [0, 1, 2], "exit_head": head}
    model = train_model(cfg, splits, steps, lr, seed, label=data)
    return exit_accuracies(model, splits.val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train", type=int, default=4096, help="training images")
    ap.add_argument("--size", type=int, default=48, help="input side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--head", default="light", choices=["light", "conv"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", default="synthetic-hard,synthetic")
    args = ap.parse_args()
    for name in args.sets.split(","):
        t0 = time.perf_counter()
        acc = run(f"{name}:{args.train}", args.steps, args.size, args.batch, args.lr, args.head, args.seed)
        cells = "  ".join(f"{lab} {100 * a:5.1f}%" for lab, a in zip(("exit@0", "exit@1", "exit@2", "final"), acc))
        print(f"{name:15s} {cells}   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
