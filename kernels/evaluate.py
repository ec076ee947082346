"""Evaluate a trained dynamic model: accuracy, realised rates, predicted and measured latency.

``dynas evaluate`` and the end of ``dynas train`` print the same :func:`summarise` dict:

``top1``, ``top5``
    held-out accuracy (%) with **adaptive** gates (each input's own decisions), computed on
    the reference path (dense compute, then masked: the same numbers as the fast path, see
    :mod:`dynas.kernels.blocks`);
``images``
    held-out images counted;
``realised_rates``
    per dynamic stage, the rate the gates realised on those images, with the configured one
    (``{"0": {"rate": r, "target": t[, "channel_rate": c, "channel_target": ct]}}``);
``target``, ``batch_size``, ``latency_ms``, ``static_latency_ms``
    the latency predicted on the hardware target at the *realised* rates (the config with
    each rate replaced, :func:`~dynas.kernels.finetune.realised_config`) and the static
    network's, at the target's batch size;
``exits`` (configs with exits)
    one entry per exit, own head last: ``exit``, ``after_stage``, ``top1`` (%, every held-out
    image answered there) and the predicted ``latency_ms`` straight to it at the realised rates
    (the budget policy's cost; :mod:`dynas.kernels.exits`);
``measured`` (``--bench``)
    :func:`~dynas.kernels.bench.bench` on this machine: dynas's kernels at the realised rates
    (budget gate mode, fast path) next to the static network.

Under ``torchrun`` every process evaluates every ``world``-th held-out image and the counts
are summed (:meth:`~dynas.kernels.distributed.DistEnv.all_reduce_sum`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynas.errors import ConfigError
from dynas.kernels.distributed import DistEnv
from dynas.kernels.finetune import realised_config
from dynas.kernels.imagefolder import normalise
from dynas.kernels.trainer import rate_sums, rates_from_sums
from dynas.spaces.config import ArchConfig

__all__ = [
    "EvalResult",
    "eval_loader",
    "precision",
    "autocast",
    "evaluate_model",
    "load_weights",
    "trained_model",
    "config_target",
    "summarise",
    "summary_lines",
]


@dataclass
class EvalResult:
    top1: float  # %
    top5: float  # %
    images: int
    rates: dict[int, dict[str, float]]  # realised, adaptive gates: {stage: {"rate": r[, "channel_rate": c]}}
    exit_top1: list[float] | None = None  # %, per exit (own head last; its value is top1); None: no exits


def eval_loader(dataset: Any, batch_size: int, workers: int, env: DistEnv) -> torch.utils.data.DataLoader:
    """This process's share of ``dataset`` (every ``world``-th item from ``rank``), in order."""
    indices = list(range(env.rank, len(dataset), env.world))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=workers, pin_memory=env.device.type == "cuda"
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def precision(env: DistEnv, amp: bool) -> torch.dtype | None:
    """The autocast dtype: on CUDA with ``amp``, bfloat16 where supported, else float16; else None (float32)."""
    if env.device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Mixed precision on CUDA with ``dtype``; nothing (float32) when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate_model(
    model: torch.nn.Module, loader: Any, env: DistEnv, amp_dtype: torch.dtype | None = None, channels_last: bool = False
) -> EvalResult:
    """Top-1/top-5 (%) and realised rates of ``model`` over ``loader`` (this process's share), summed
    over processes.  Adaptive gates, reference path; the model's mode and path are restored.  A
    model with exits is run with every exit computed (policy ``"all"``): top-1/top-5 are its own
    head's, ``exit_top1`` each exit's."""
    net = _unwrap(model)
    was_training, policy = net.training, net.exit_policy
    net.eval()
    exits = len(net.config.exits)
    if exits:
        net.set_exit_policy("all")
    gated = any(b.paradigm != "static" for b in net.blocks())
    if gated:
        net.set_gate_mode("adaptive").set_path("reference")
    num_stages = len(net.config.stages)
    # top-1 hits, top-5 hits, images, then the top-1 hits of each early exit
    counts = torch.zeros(3 + exits, dtype=torch.float64, device=env.device)
    sums = torch.zeros(num_stages, 4, dtype=torch.float64, device=env.device)  # see trainer.rate_sums
    try:
        with torch.no_grad(), autocast(env.device, amp_dtype):
            for x, y in loader:
                x = normalise(x.to(env.device, non_blocking=True))  # [B, 3, H, W] float
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(env.device, non_blocking=True)  # [B]
                out = net(x)
                outs = [o.float() for o in out] if exits else [out.float()]  # [B, classes] per exit, own head last
                logits = outs[-1]
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, k]
                hit = top == y[:, None]  # [B, k]
                early = [(o.argmax(dim=1) == y).sum() for o in outs[:-1]]  # top-1 hits of each early exit
                n = torch.tensor(len(y), device=env.device)
                counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), n, *early]).double()
                if gated:
                    sums += rate_sums(net.flops_readout(), len(y), num_stages).to(env.device)
    finally:
        net.exit_policy = policy
        if gated:
            net.set_path("fast")
        net.train(was_training)
    env.all_reduce_sum(counts)
    env.all_reduce_sum(sums)
    top1_hits, top5_hits, images, *exit_hits = counts.tolist()
    if images == 0:
        raise ConfigError("data: the held-out split yielded no image; allowed: a val split with at least one image")
    exit_top1 = [100.0 * h / images for h in (*exit_hits, top1_hits)] if exits else None
    return EvalResult(
        100.0 * top1_hits / images, 100.0 * top5_hits / images, int(images), rates_from_sums(sums), exit_top1
    )


def load_weights(path: str, option: str = "--weights") -> dict[str, Any]:
    """The state dict in ``path``: ``RUN/model.pt``, or the model of ``RUN/checkpoint.pt``; a
    one-line :class:`ConfigError` naming ``option`` for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything that is not a torch.save file
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ConfigError(
            f"{option}={path!r} cannot be loaded ({why}); allowed: RUN/model.pt or RUN/checkpoint.pt"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint.pt
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ConfigError(
            f"{option}={path!r} is not a state dict with a classifier (fc.weight); "
            "allowed: RUN/model.pt or RUN/checkpoint.pt"
        )
    return state


def trained_model(cfg: ArchConfig, path: str, option: str = "--weights") -> torch.nn.Module:
    """``build_model(cfg)`` with the weights in ``path`` (:func:`load_weights`), in eval mode.

    Every key must match, exit heads included: weights of another config (other stages, exits
    elsewhere or none, another head) are refused with one line naming the first key that differs.
    """
    from dynas.kernels.model import build_model

    state = load_weights(path, option)
    model = build_model(cfg, num_classes=int(state["fc.weight"].shape[0]))
    own = model.state_dict()
    differ = [
        *(f"missing {k}" for k in own if k not in state),
        *(f"unexpected {k}" for k in state if k not in own),
        *(
            f"{k} has shape {tuple(v.shape)}, not {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and tuple(getattr(v, "shape", ())) != tuple(own[k].shape)
        ),
    ]
    if differ:
        raise ConfigError(
            f"{option}={path!r} does not fit {cfg.backbone} {cfg.short()} ({len(differ)} key(s) differ, first: "
            f"{differ[0]}); allowed: the model.pt of a run of this config"
        )
    model.load_state_dict(state)
    return model.eval()


def config_target(source: Any) -> str | None:
    """The hardware target an exported config names (its name, or its file where that exists), if any."""
    try:
        data = (
            source
            if isinstance(source, dict)
            else json.loads(source if str(source).lstrip().startswith("{") else Path(source).read_text())
        )
    except (OSError, ValueError, TypeError):
        return None
    target = data.get("target") if isinstance(data, dict) else None
    if isinstance(target, dict):
        path = target.get("path")
        target = path if isinstance(path, str) and Path(path).is_file() else target.get("name")
    return target if isinstance(target, str) else None


def summarise(
    cfg: ArchConfig,
    result: EvalResult,
    target: str,
    *,
    bench: bool = False,
    bench_batch_size: int = 1,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """The summary dict of the module docstring for ``cfg`` evaluated as ``result``."""
    from dynas.predictors.latency import predict

    realised = realised_config(cfg, result.rates)
    pred = predict(realised, target)
    rates: dict[str, dict[str, float]] = {}
    for s, r in result.rates.items():
        st = cfg.stages[s]
        rates[str(s)] = {"rate": r["rate"], "target": st.rate}
        if "channel_rate" in r and st.channel_rate is not None:
            rates[str(s)].update(channel_rate=r["channel_rate"], channel_target=st.channel_rate)
    out: dict[str, Any] = {
        "top1": result.top1,
        "top5": result.top5,
        "images": result.images,
        "realised_rates": rates,
        "target": pred.target,
        "batch_size": pred.batch_size,
        "latency_ms": pred.latency_ms,
        "static_latency_ms": pred.static_latency_ms,
        "config": cfg.short(),
        "realised_config": realised.short(),
    }
    if result.exit_top1 is not None:
        out["exits"] = [
            {"exit": e.exit, "after_stage": e.after_stage, "top1": top1, "latency_ms": e.latency_ms}
            for e, top1 in zip(pred.exits, result.exit_top1)
        ]
    if bench:
        from dynas.kernels.bench import bench as run_bench

        b = run_bench(realised, device=device, batch_size=bench_batch_size, threads=threads)
        out["measured"] = {
            "device": b.device,
            "batch_size": b.batch_size,
            "threads": b.threads,
            "latency_ms": b.dynamic_ms,
            "static_latency_ms": b.static_ms,
            "speedup": b.speedup,
            "gate_mode": b.gate_mode,
        }
    return out


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as text, one fact per line."""
    lines = [
        f"top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  on {summary['images']} held-out images "
        "(adaptive gates)"
    ]
    for s, r in summary["realised_rates"].items():
        extra = (
            f"; channel rate {r['channel_rate']:.3f} (target {r['channel_target']:.3f})" if "channel_rate" in r else ""
        )
        lines.append(f"stage {s}: realised rate {r['rate']:.3f} (target {r['target']:.3f}){extra}")
    for e in summary.get("exits", []):
        lines.append(
            f"exit {e['exit']} after stage {e['after_stage']}: top-1 {e['top1']:.2f}%, predicted {e['latency_ms']:.4g} ms "
            "straight to it"
        )
    speedup = summary["static_latency_ms"] / summary["latency_ms"] if summary["latency_ms"] > 0 else float("nan")
    lines.append(
        f"predicted on {summary['target']} at batch {summary['batch_size']}, at the realised rates: "
        f"{summary['latency_ms']:.4g} ms; static {summary['static_latency_ms']:.4g} ms; speed-up x{speedup:.2f}"
    )
    m = summary.get("measured")
    if m:
        lines.append(
            f"measured on {m['device']} ({m['threads']} threads) at batch {m['batch_size']}, budget gates at the "
            f"realised rates: {m['latency_ms']:.4g} ms; static {m['static_latency_ms']:.4g} ms; "
            f"speed-up x{m['speedup']:.2f}"
        )
    return lines
