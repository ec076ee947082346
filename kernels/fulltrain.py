"""Full training of a dynamic network from a config: ``dynas train`` and :func:`run_training`.

The recipe is LAUDNet's (Han et al., "Latency-aware Unified Dynamic Networks", T-PAMI 2024,
section "Training"), with a sparsity target per stage instead of one global target; every
constant is a field of :class:`TrainOptions` with the recipe's value as default:

* start from static pretrained weights (``weights``, a torchvision-named state dict; a
  classifier of another width is replaced) and distil from the static network (``teacher``,
  by default the same file); without weights, train from scratch without distillation;
* SGD, Nesterov momentum 0.9, weight decay 5e-5, learning rate 0.08 per 1024 images of global
  batch (scaled linearly to ``batch_size``), linear warm-up then cosine decay per step;
* loss = CE + 10 x sparsity (per-stage FLOPs and rate targets, bounds relaxing over the first
  third) + 0.5 x KD (T = 4), Gumbel temperature 5 -> 0.1 over the whole run
  (:mod:`dynas.kernels.recipe`);
* a config with ``exits`` trains its exit heads jointly with the rest: the cross-entropy term
  becomes :func:`~dynas.kernels.recipe.exit_loss` (every exit's cross-entropy plus the early
  exits' distillation from the teacher, else from the final exit), and each epoch's line in
  ``metrics.jsonl`` gains ``exit_top1`` (``[{"after_stage": s, "top1": %}, ...]``, own head last);
* on CUDA: bf16 autocast where supported, else fp16 with a gradient scaler, channels-last;
  on CPU: float32.

One process, or many under ``torchrun`` (DDP; :mod:`dynas.kernels.distributed`): the global
batch is split evenly, the data order is a seeded permutation per epoch, metrics are summed
over processes, and only rank 0 writes files and logs.

Resuming (:mod:`dynas.kernels.checkpoint`): a checkpoint at every epoch end and every
``checkpoint_every`` steps holds the whole state; the same command resumes after the last one,
skipping the batches of the current epoch already trained on.  Random numbers (the Gumbel
noise) come from torch's generator re-seeded at every step from (seed, rank, step), and each
image's augmentation from (seed, epoch, image), so a run killed at any moment and resumed ends
with the same weights as one never interrupted (on CPU, bit for bit in practice).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynas.errors import ConfigError
from dynas.kernels import checkpoint as ck
from dynas.kernels.data import DataSets, check_datasets, load_datasets
from dynas.kernels.distributed import DistEnv, EpochSampler, init_distributed, shutdown
from dynas.kernels.evaluate import (
    EvalResult,
    autocast,
    config_target,
    eval_loader,
    evaluate_model,
    precision,
    summarise,
)
from dynas.kernels.imagefolder import normalise
from dynas.kernels.model import DynamicNet, build_model
from dynas.kernels.options import LR_BATCH, TrainOptions
from dynas.kernels.progress import Progress
from dynas.kernels.recipe import gumbel_temperature, recipe_loss, warmup_cosine
from dynas.kernels.trainer import rate_sums, rates_from_sums, stage_targets
from dynas.spaces.config import ArchConfig, load_config

__all__ = ["TrainOptions", "TrainResult", "run_training", "LR_BATCH"]

_log = logging.getLogger("dynas.train")


@dataclass
class TrainResult:
    model: DynamicNet  # trained, in eval mode with adaptive gates
    summary: dict[str, Any] | None  # the dynas evaluate summary (rank 0; None elsewhere)
    history: list[dict[str, Any]]  # metrics.jsonl lines
    run_dir: str | None


@dataclass
class _State:
    """Where the run is; saved in the checkpoint."""

    epoch: int = 0  # 0-based epoch in progress
    step_in_epoch: int = 0  # optimisation steps of that epoch done
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: torch.Tensor | None = None  # this epoch's loss and rate sums (see _Run.new_sums)
    time_s: float = 0.0  # training time of this epoch so far (rank 0's clock)


@dataclass
class _Run:
    env: DistEnv
    cfg: ArchConfig
    opts: TrainOptions
    data: DataSets
    net: DynamicNet
    model: torch.nn.Module  # net, or DDP around it
    teacher: DynamicNet | None
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    sampler: EpochSampler
    loader: Any
    val_loader: Any
    steps_per_epoch: int
    total_steps: int
    amp_dtype: torch.dtype | None
    channels_last: bool
    identity: dict[str, Any]
    targets: tuple[list[float], list[float]]  # per stage: FLOPs-ratio target, rate target
    gated: bool  # the config has a dynamic stage

    @property
    def num_stages(self) -> int:
        return len(self.cfg.stages)

    def new_sums(self) -> torch.Tensor:
        # loss, ce, sparsity, kd (sums of per-step means), images, then rate_sums [S, 4] flattened
        return torch.zeros(5 + 4 * self.num_stages, dtype=torch.float64, device=self.env.device)


def _config_and_raw(config: Any, input_size: Any) -> tuple[ArchConfig, dict[str, Any]]:
    """The config (input size overridden if given) and the input as a dict, for RUN/config.json."""
    cfg = load_config(config)
    if input_size is not None:
        cfg = load_config({**cfg.to_dict(), "input_size": input_size})
    if isinstance(config, ArchConfig):
        raw: dict[str, Any] = config.to_dict()
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        text = str(config) if str(config).lstrip().startswith("{") else Path(config).read_text()
        raw = json.loads(text)
    raw.update(cfg.to_dict())
    raw.pop("trained", None)
    return cfg, raw


def _build_models(
    cfg: ArchConfig, num_classes: int, opts: TrainOptions, env: DistEnv
) -> tuple[DynamicNet, DynamicNet | None]:
    """The student (pretrained weights loaded) and the static teacher (or None), on the CPU."""
    torch.manual_seed(opts.seed)
    net = build_model(cfg, num_classes=num_classes)
    if opts.weights:
        res = net.load_pretrained(opts.weights, new_head=True)
        if res.head_keys and env.is_main:
            _log.info(
                "the classifier in %s has another class count; a new one is trained for the %d classes of the data",
                opts.weights,
                num_classes,
            )
    elif env.is_main:
        _log.warning(
            "no --weights: training from scratch, without distillation; the LAUDNet recipe assumes static "
            "pretrained weights"
        )
    source = (opts.teacher or opts.weights) if opts.distill else None
    if source is None or opts.recipe.alpha_kd == 0:
        return net, None
    teacher = build_model(ArchConfig.static(cfg.backbone, cfg.input_size), num_classes=num_classes)
    if teacher.load_pretrained(source, new_head=True).head_keys:
        if env.is_main:
            _log.warning(
                "the teacher %s has no classifier for the %d classes of the data: no distillation "
                "(give --teacher FILE, a static network trained on these classes)",
                source,
                num_classes,
            )
        return net, None
    for p in teacher.parameters():
        p.requires_grad_(False)
    return net, teacher.eval()


def _prepare(
    config: Any, opts: TrainOptions, env: DistEnv
) -> tuple[ArchConfig, dict[str, Any], DataSets, dict | None, dict[str, Any]]:
    """Everything that may refuse the run, before anything is written: config, data, RUN folder
    and its checkpoint (read by rank 0), then every image decoded once."""
    ckpt = None
    with env.together():
        cfg, raw = _config_and_raw(config, opts.input_size)
        data = load_datasets(opts.data, cfg.input_size, opts.seed, check=False)
        _batches(len(data.train), opts.batch_size, env)
        identity = _identity(cfg, data)
        if opts.output_dir and env.is_main and ck.check_run_dir(opts.output_dir):  # RUN is rank 0's alone
            ckpt = ck.load_checkpoint(os.path.join(opts.output_dir, ck.CHECKPOINT))
            ck.check_resume(ckpt, identity, opts.fingerprint(), opts.output_dir)
    images = len(data.val) + len(data.train)
    if images > 20_000 and env.is_main:  # a noticeable wait: say what it is
        _log.info("decoding each of the %d images of %s once", images, data.source)
    data = check_datasets(
        data,
        skip_bad=opts.skip_bad_images,
        threads=max(1, (os.cpu_count() or 1) // env.local_world),
        shard=(env.rank, env.world),
        gather=env.gather,
    )
    if data.skipped and env.is_main:
        _log.warning("%d unreadable image(s) left out (first: %s)", len(data.skipped), data.skipped[0])
    return cfg, raw, data, ckpt, identity


def _identity(cfg: ArchConfig, data: DataSets) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (``train_images``: before bad ones are left out)."""
    return {
        "backbone": cfg.backbone,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "num_classes": data.num_classes,
        "classes": data.classes,
        "train_images": len(data.train),
    }


def _batches(n_train: int, batch_size: int, env: DistEnv) -> tuple[int, int]:
    """(per-process batch, steps per epoch); refuses a batch that does not split or does not fit."""
    if batch_size % env.world:
        raise ConfigError(
            f"--batch-size={batch_size} does not split over {env.world} processes; allowed: a multiple of {env.world}"
        )
    local = batch_size // env.world
    steps = (n_train // env.world) // local
    if steps < 1:
        raise ConfigError(
            f"--batch-size={batch_size} is more than the {n_train} training images; allowed: at most {n_train}"
        )
    return local, steps


def _setup(cfg: ArchConfig, opts: TrainOptions, data: DataSets, env: DistEnv, identity: dict[str, Any]) -> _Run:
    """Models on the device, DDP, optimizer, schedule, loaders."""
    net, teacher = _build_models(cfg, data.num_classes, opts, env)
    cuda = env.device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    net = net.to(env.device, memory_format=fmt)
    if teacher is not None:
        teacher = teacher.to(env.device, memory_format=fmt)
    model: torch.nn.Module = net
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[env.device.index] if cuda else None)
    local, steps_per_epoch = _batches(len(data.train), opts.batch_size, env)
    total = (
        steps_per_epoch * opts.epochs if opts.max_steps is None else min(steps_per_epoch * opts.epochs, opts.max_steps)
    )
    lr = opts.lr * opts.batch_size / LR_BATCH
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=opts.momentum, nesterov=opts.momentum > 0, weight_decay=opts.weight_decay
    )
    warmup = min(total, round(opts.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
    amp_dtype = precision(env, opts.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    sampler = EpochSampler(data.train, env, opts.seed)
    n_workers = opts.workers if data.decodes else 0  # tensors in memory need no worker process
    loader = torch.utils.data.DataLoader(
        data.train,
        batch_size=local,
        sampler=sampler,
        drop_last=True,
        num_workers=n_workers,
        pin_memory=cuda,
        persistent_workers=n_workers > 0,
    )
    val_loader = eval_loader(data.val, max(2 * local, 32), n_workers, env)  # no gradients: twice the batch fits
    return _Run(
        env,
        cfg,
        opts,
        data,
        net,
        model,
        teacher,
        opt,
        sched,
        scaler,
        sampler,
        loader,
        val_loader,
        steps_per_epoch,
        total,
        amp_dtype,
        cuda,
        identity,
        stage_targets(net),
        any(b.paradigm != "static" for b in net.blocks()),
    )


def _step_seed(seed: int, rank: int, step: int) -> int:
    return ((seed * 1_000_003 + rank) * 10_000_019 + step) % (2**63)


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, step: int, sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimisation step on this process's batch; adds its loss parts and rates to ``sums``."""
    torch.manual_seed(_step_seed(run.opts.seed, run.env.rank, step))
    temperature = gumbel_temperature(step, run.total_steps, run.opts.recipe)
    run.net.set_temperature(temperature)
    x = normalise(x.to(run.env.device, non_blocking=True))  # [B, 3, H, W] float
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = y.to(run.env.device, non_blocking=True)  # [B]
    flops_targets, rate_targets = run.targets
    with autocast(run.env.device, run.amp_dtype):
        logits = run.model(x)  # [B, classes]; with exits a list of them, own head last (recipe_loss takes both)
        readout = run.net.flops_readout() if run.gated else []
        t_logits = None
        if run.teacher is not None:
            with torch.no_grad():
                t_logits = run.teacher(x)  # [B, classes]
    loss, parts = recipe_loss(
        logits, y, readout, step, run.total_steps, flops_targets, rate_targets, run.opts.recipe, t_logits
    )
    run.opt.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        loss.backward()
        run.opt.step()
    run.sched.step()
    parts["loss"] = loss.detach()
    sums[:4] += torch.stack([parts[k] for k in ("loss", "ce", "sparsity", "kd")]).double()
    sums[4] += len(y)
    if readout:
        sums[5:] += rate_sums(readout, len(y), run.num_stages).to(sums.device).flatten()
    return {**parts, "temperature": torch.tensor(temperature), "lr": torch.tensor(run.sched.get_last_lr()[0])}


def _save(run: _Run, state: _State, done: bool = False) -> None:
    """Checkpoint (rank 0 writes; every process joins the sum of the epoch's running metrics)."""
    state.sums = run.env.all_reduce_sum(state.sums)
    ckpt = None
    if run.env.is_main:
        ckpt = {
            "format": ck.FORMAT,
            "identity": run.identity,
            "options": run.opts.fingerprint(),
            "model": run.net.state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "total_steps": run.total_steps,
            "temperature": gumbel_temperature(state.global_step, run.total_steps, run.opts.recipe),
            "history": state.history,
            "sums": state.sums.cpu(),
            "time_s": state.time_s,
            "done": done,
        }
        ck.save_torch(ckpt, os.path.join(run.opts.output_dir, ck.CHECKPOINT))
        ck.write_metrics(state.history, os.path.join(run.opts.output_dir, ck.METRICS))
    else:
        state.sums.zero_()  # rank 0 holds the sum over processes from here on


def _restore(run: _Run, state: _State, ckpt: dict[str, Any]) -> None:
    run.net.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step_in_epoch, state.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
    state.history, state.time_s = list(ckpt["history"]), float(ckpt["time_s"])
    if run.env.is_main:
        state.sums = ckpt["sums"].to(run.env.device)


def _epoch_line(run: _Run, state: _State, result: EvalResult, steps: int) -> dict[str, Any]:
    s = state.sums.cpu().tolist()
    n = max(1, steps * run.env.world)  # per-step means summed over steps and processes
    train_rates = rates_from_sums(state.sums[5:].view(run.num_stages, 4))
    return {
        "epoch": state.epoch + 1,
        "steps": state.global_step,
        "steps_in_epoch": steps,
        "loss": s[0] / n,
        "ce": s[1] / n,
        "sparsity": s[2] / n,
        "kd": s[3] / n,
        "lr": run.sched.get_last_lr()[0],
        "temperature": gumbel_temperature(state.global_step, run.total_steps, run.opts.recipe),
        "top1": result.top1,
        "top5": result.top5,
        "val_images": result.images,
        **({} if result.exit_top1 is None else {"exit_top1": _exit_top1(run.cfg, result.exit_top1)}),
        "realised_rates": {str(k): v for k, v in result.rates.items()},
        "train_rates": {str(k): v for k, v in train_rates.items()},
        "images_per_s": s[4] / state.time_s if state.time_s > 0 else None,
        "time_s": state.time_s,
    }


def _exit_top1(cfg: ArchConfig, top1: list[float]) -> list[dict[str, Any]]:
    """Per exit, own head last: ``{"after_stage": s, "top1": %}`` (the finetune proxy's ``exit_top1``)."""
    stages = [*cfg.exits, len(cfg.stages) - 1]
    return [{"after_stage": s, "top1": t} for s, t in zip(stages, top1)]


def _run_epoch(run: _Run, state: _State, progress: Progress) -> None:
    """The rest of epoch ``state.epoch``: its remaining steps, then evaluation, metrics, checkpoint."""
    run.sampler.set_epoch(state.epoch)
    run.sampler.set_start(state.step_in_epoch * run.loader.batch_size)
    steps = min(run.steps_per_epoch, run.total_steps - (state.global_step - state.step_in_epoch))
    progress.start(state.epoch, steps, state.step_in_epoch)
    t0 = time.perf_counter()
    every = run.opts.checkpoint_every
    for x, y in run.loader:
        if state.step_in_epoch >= steps:
            break
        parts = _train_step(run, x, y, state.global_step, state.sums)
        state.global_step += 1
        state.step_in_epoch += 1
        progress.step(lambda: {k: float(v) for k, v in parts.items()})
        if run.opts.output_dir and every and state.global_step % every == 0 and state.step_in_epoch < steps:
            state.time_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            _save(run, state)
            progress.info(
                "checkpoint at step %d (epoch %d, step %d)", state.global_step, state.epoch + 1, state.step_in_epoch
            )
    state.time_s += time.perf_counter() - t0
    progress.close()
    result = evaluate_model(run.model, run.val_loader, run.env, run.amp_dtype, run.channels_last)
    state.sums = run.env.all_reduce_sum(state.sums)
    line = _epoch_line(run, state, result, steps)
    state.history.append(line)
    if run.env.is_main:
        rates = " ".join(f"s{k}={v['rate']:.2f}" for k, v in line["realised_rates"].items())
        progress.info(
            "epoch %d: loss %.4f, val top-1 %.2f%%, top-5 %.2f%%, rates %s, %.0f img/s",
            line["epoch"],
            line["loss"],
            line["top1"],
            line["top5"],
            rates or "-",
            line["images_per_s"] or 0,
        )
        if "exit_top1" in line:
            progress.info(
                "epoch %d: val top-1 per exit %s",
                line["epoch"],
                ", ".join(f"after stage {e['after_stage']} {e['top1']:.2f}%" for e in line["exit_top1"]),
            )
    state.epoch, state.step_in_epoch, state.time_s = state.epoch + 1, 0, 0.0
    state.sums = run.new_sums()
    if run.opts.output_dir:
        _save(run, state, done=state.global_step >= run.total_steps)
        progress.info("checkpoint at the end of epoch %d", line["epoch"])


def _write_outputs(run: _Run, raw: dict[str, Any], summary: dict[str, Any]) -> None:
    """RUN/model.pt, then RUN/config.json (rank 0)."""
    opts, data, env = run.opts, run.data, run.env
    ck.save_torch(
        {k: v.detach().cpu() for k, v in run.net.state_dict().items()}, os.path.join(opts.output_dir, ck.MODEL)
    )
    recipe = {
        **opts.fingerprint(),
        "lr_effective": opts.lr * opts.batch_size / LR_BATCH,
        "lr_batch": LR_BATCH,
        "weights": os.path.abspath(opts.weights) if opts.weights else None,
        "teacher_used": run.teacher is not None,
        "input_size": list(run.cfg.input_size),
    }
    trained = {
        "data": os.path.abspath(opts.data) if os.path.exists(opts.data) else opts.data,
        "source": data.source,
        "classes": data.classes,
        "num_classes": data.num_classes,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "skipped_images": len(data.skipped),
        "steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "processes": env.world,
        "device": env.device.type,
        "precision": str(run.amp_dtype or torch.float32).replace("torch.", ""),
        "recipe": recipe,
        "final": summary,
        "torch_version": torch.__version__,
    }
    ck.write_json({**raw, "trained": trained}, os.path.join(opts.output_dir, ck.CONFIG))


def _start(run: _Run, state: _State, ckpt: dict[str, Any] | None) -> None:
    """Restore ``ckpt``, or create the RUN folder; log what the run is."""
    opts, env = run.opts, run.env
    if ckpt is not None:
        _restore(run, state, ckpt)
    elif opts.output_dir and env.is_main:
        os.makedirs(opts.output_dir, exist_ok=True)
    if opts.output_dir and env.is_main:
        for name in os.listdir(opts.output_dir):
            if ck.is_temporary(name):  # left by a run killed while writing
                os.unlink(os.path.join(opts.output_dir, name))
        if ckpt is not None:  # a kill between checkpoint.pt and metrics.jsonl left the latter behind
            ck.write_metrics(state.history, os.path.join(opts.output_dir, ck.METRICS))
    if not env.is_main:
        return
    numbers = f"{str(run.amp_dtype).replace('torch.', '')} autocast" if run.amp_dtype else "float32"
    _log.info(
        "training %s %s on %s: %d step(s) of %d images (%d per process x %d), lr %.4g, %s, %s%s",
        run.cfg.backbone,
        run.cfg.short(),
        run.data.source,
        run.total_steps,
        opts.batch_size,
        run.loader.batch_size,
        env.world,
        opts.lr * opts.batch_size / LR_BATCH,
        env.device,
        numbers,
        "" if run.teacher is not None else ", no distillation",
    )
    if ckpt is not None:
        _log.info(
            "resuming %s at step %d (epoch %d, step %d)",
            opts.output_dir,
            state.global_step,
            state.epoch + 1,
            state.step_in_epoch,
        )


def run_training(config: Any, opts: TrainOptions = TrainOptions()) -> TrainResult:
    """Train ``config`` (ArchConfig, dict, JSON text or file; exports included) as ``opts`` says.

    One process, or one of many under ``torchrun``.  Raises a one-line
    :class:`~dynas.errors.DynasError` before anything is written when the config, the data,
    the options or the RUN folder cannot be used.  Returns the trained model and, on rank 0,
    the summary :func:`~dynas.kernels.evaluate.summarise` gives.  torch's thread count and CPU
    random state are as before afterwards (the run re-seeds torch at every step).
    """
    env = init_distributed(opts.device)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        cfg, raw, data, ckpt, identity = _prepare(config, opts, env)
        run = _setup(cfg, opts, data, env, identity)
        state = _State(sums=run.new_sums())
        _start(run, state, env.broadcast(ckpt))
        if run.channels_last:
            torch.backends.cudnn.benchmark = True
        progress = Progress(
            env.is_main, math.ceil(run.total_steps / run.steps_per_epoch), opts.batch_size, opts.log_every
        )
        while state.global_step < run.total_steps:
            _run_epoch(run, state, progress)
        last = state.history[-1]
        result = EvalResult(
            last["top1"],
            last["top5"],
            last["val_images"],
            {int(k): v for k, v in last["realised_rates"].items()},
            [e["top1"] for e in last["exit_top1"]] if "exit_top1" in last else None,
        )
        summary = None
        if env.is_main:
            summary = summarise(cfg, result, opts.target or config_target(config) or "v100")
            if opts.output_dir:
                _write_outputs(run, raw, summary)
        run.net.eval().set_gate_mode("adaptive")
        return TrainResult(run.net, summary, state.history, opts.output_dir)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        shutdown(env)
