"""``dynas train`` and ``dynas evaluate``: parsers and handlers (registered by :mod:`dynas.cli`).

``dynas train CONFIG --data DIR --output-dir RUN`` trains the dynamic network of CONFIG with
the LAUDNet recipe (:mod:`dynas.kernels.fulltrain`), in one process or, launched by
``torchrun``, in many; re-running it on RUN resumes.  ``dynas evaluate CONFIG --weights
RUN/model.pt --data DIR`` reports accuracy, realised rates and latency
(:mod:`dynas.kernels.evaluate`); ``dynas train`` ends with the same report.

Under ``torchrun`` only rank 0 prints: the other processes stay silent, also on an error
(every process fails with the same message, :meth:`~dynas.kernels.distributed.DistEnv.together`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import warnings
from typing import Any

from dynas.cli.common import (
    add_command,
    check_output,
    echo,
    image_size,
    nonneg_int,
    number,
    positive_int,
    positive_number,
)
from dynas.errors import ConfigError, DynasError
from dynas.files import check_writable

__all__ = ["add_parsers"]


def _nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    v = number(text)
    if not v == v or v in (float("inf"), float("-inf")) or v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: a finite number >= 0")
    return v


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _quiet_other_ranks() -> None:
    """Processes other than rank 0 print nothing (torchrun gathers every process's output)."""
    if _rank() != 0:
        logging.getLogger("dynas").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")


def _summary_out(summary: dict[str, Any], as_json: bool) -> None:
    from dynas.kernels.evaluate import summary_lines

    if as_json:
        echo(json.dumps(summary, indent=2))
    else:
        for line in summary_lines(summary):
            echo(line)


def _recipe(args: argparse.Namespace) -> Any:
    from dynas.kernels.recipe import TrainingRecipe

    return TrainingRecipe(
        lambda_act=args.lambda_act,
        alpha_kd=args.alpha_kd,
        kd_temperature=args.kd_temperature,
        gumbel_start=args.gumbel_start,
        gumbel_end=args.gumbel_end,
        relax_fraction=args.relax_fraction,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from dynas.kernels.fulltrain import TrainOptions, run_training

    check_output("--output", args.output)
    if args.output and _rank() == 0:
        check_writable(args.output, ConfigError)
    _quiet_other_ranks()
    try:
        opts = TrainOptions(
            data=args.data,
            output_dir=args.output_dir,
            epochs=args.epochs,
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            recipe=_recipe(args),
            weights=args.weights,
            teacher=args.teacher,
            distill=not args.no_distill,
            input_size=args.input_size,
            workers=args.workers,
            device=args.device,
            amp=not args.no_amp,
            threads=args.threads,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            skip_bad_images=args.skip_bad_images,
            log_every=args.log_every,
            target=args.target,
        )
        result = run_training(args.config, opts)
    except DynasError:
        if _rank() != 0:
            return 2  # rank 0 reports the same error
        raise
    if result.summary is None:  # not rank 0
        return 0
    if args.output:
        import torch

        from dynas.files import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, buf)
        atomic_write_bytes(args.output, buf.getvalue(), ConfigError)
    if not args.json:
        echo()
    _summary_out(result.summary, args.json)
    if not args.json:
        where = [p for p in (result.run_dir, args.output) if p]
        if where:
            echo(f"written: {', '.join(where)}")
    return 0


def _evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    from dynas.kernels.data import check_datasets, load_datasets
    from dynas.kernels.distributed import init_distributed, shutdown
    from dynas.kernels.evaluate import (
        config_target,
        eval_loader,
        evaluate_model,
        precision,
        summarise,
        trained_model,
    )
    from dynas.spaces.config import load_config

    cfg = load_config(args.config)
    for option in ("weights", "data"):
        if getattr(args, option) is None:
            raise ConfigError(
                f"--{option} is missing; allowed: dynas evaluate CONFIG --weights RUN/model.pt --data DIR"
            )
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    try:
        with env.together():
            model = trained_model(cfg, args.weights)
            data = load_datasets(args.data, cfg.input_size, splits=("val",), check=False)
            if data.num_classes != model.fc.out_features:
                raise ConfigError(
                    f"--data={args.data!r} has {data.num_classes} classes; the weights have "
                    f"{model.fc.out_features}; allowed: the data the model was trained on"
                )
        data = check_datasets(
            data,
            skip_bad=args.skip_bad_images,
            threads=max(1, (os.cpu_count() or 1) // env.local_world),
            shard=(env.rank, env.world),
            gather=env.gather,
        )
        amp_dtype = precision(env, not args.no_amp)
        cuda = env.device.type == "cuda"
        model = model.to(env.device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
        result = evaluate_model(
            model,
            eval_loader(data.val, args.batch_size, args.workers if data.decodes else 0, env),
            env,
            amp_dtype,
            cuda,
        )
        if not env.is_main:
            return None
        target = args.target or config_target(args.config) or "v100"
        return summarise(
            cfg,
            result,
            target,
            bench=args.bench,
            bench_batch_size=args.bench_batch_size,
            device=env.device.type,
            threads=args.threads,
        )
    finally:
        torch.set_num_threads(threads)
        shutdown(env)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _quiet_other_ranks()
    try:
        summary = _evaluate(args)
    except DynasError:
        if _rank() != 0:
            return 2
        raise
    if summary is not None:
        _summary_out(summary, args.json)
    return 0


def _runtime_args(p: argparse.ArgumentParser, workers_help: str) -> None:
    from dynas.kernels.options import DEVICES

    p.add_argument("--workers", type=nonneg_int, default=4, metavar="N", help=workers_help)
    p.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: CUDA if available (GPU LOCAL_RANK under torchrun)"
    )
    p.add_argument(
        "--no-amp", action="store_true", help="float32 on CUDA too (default there: bf16 autocast, else fp16)"
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, metavar="N", help="CPU threads per process (default: torch's)"
    )
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave unreadable images out (counted) instead of stopping with the first one's name",
    )
    p.add_argument(
        "--target",
        default=None,
        metavar="T",
        help="hardware target of the predicted latency (default: the config's export target, else v100)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
    from dynas.kernels.options import TrainingRecipe, TrainOptions

    d, r = TrainOptions(), TrainingRecipe()  # their defaults are the options'
    p = add_command(
        sub,
        common,
        "train",
        _cmd_train,
        help="train a config on your images (LAUDNet recipe; torchrun for many GPUs)",
        description="Train the dynamic network of CONFIG with LAUDNet's recipe and per-stage sparsity targets: from\n"
        "static pretrained weights (--weights), distilling from the static network; SGD with Nesterov momentum,\n"
        "linear warm-up then cosine learning rate, Gumbel temperature annealed over the run.\n"
        "Under 'torchrun --nproc-per-node N -m dynas train ...' it runs data-parallel (DDP).  With\n"
        "--output-dir RUN, the same command resumes from RUN/checkpoint.pt.  Ends with the summary of\n"
        "'dynas evaluate'.  docs/training.md has the commands for one GPU, many GPUs and many machines.",
    )
    _train_io_args(p)
    g = p.add_argument_group("recipe (defaults: LAUDNet's)")
    _schedule_args(g, d)
    _loss_args(g, r)
    _start_args(g, d)
    _running_args(p.add_argument_group("running"), d)


def _train_io_args(p: argparse.ArgumentParser) -> None:
    """train's config, data and outputs."""
    p.add_argument("config", metavar="CONFIG", help="config or exported JSON file")
    p.add_argument(
        "--data",
        default="synthetic",
        metavar="DIR",
        help="image folder DIR/train/<class>/*, DIR/val/<class>/*; or synthetic[:N], or a torch.save file",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        metavar="RUN",
        help="run folder: checkpoint.pt, model.pt, metrics.jsonl, config.json (a run there is resumed)",
    )
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="also save the trained state dict here")


def _schedule_args(g: Any, d: Any) -> None:
    """The recipe's length, batch and optimiser (SGD, warm-up then cosine learning rate); defaults
    from ``d`` (a TrainOptions)."""
    from dynas.kernels.options import LR_BATCH

    g.add_argument("--epochs", type=positive_int, default=d.epochs, metavar="N", help="epochs")
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop after N optimisation steps; the schedules span them (default: all epochs)",
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        metavar="N",
        help="global batch, split evenly over the processes",
    )
    g.add_argument(
        "--lr",
        type=positive_number,
        default=d.lr,
        metavar="X",
        help=f"learning rate at a global batch of {LR_BATCH}; scaled linearly to --batch-size",
    )
    g.add_argument("--momentum", type=_nonneg_float, default=d.momentum, metavar="X", help="Nesterov momentum")
    g.add_argument("--weight-decay", type=_nonneg_float, default=d.weight_decay, metavar="X", help="weight decay")
    g.add_argument(
        "--warmup-epochs",
        type=_nonneg_float,
        default=d.warmup_epochs,
        metavar="X",
        help="linear learning-rate warm-up before the cosine decay",
    )


def _loss_args(g: Any, r: Any) -> None:
    """The recipe's losses (sparsity, distillation) and its Gumbel and sparsity-bound schedules;
    defaults from ``r`` (a TrainingRecipe)."""
    g.add_argument("--lambda-act", type=_nonneg_float, default=r.lambda_act, metavar="X", help="sparsity loss weight")
    g.add_argument("--alpha-kd", type=_nonneg_float, default=r.alpha_kd, metavar="X", help="distillation loss weight")
    g.add_argument(
        "--kd-temperature", type=positive_number, default=r.kd_temperature, metavar="X", help="distillation temperature"
    )
    g.add_argument(
        "--gumbel-start",
        type=positive_number,
        default=r.gumbel_start,
        metavar="X",
        help="Gumbel temperature at the first step",
    )
    g.add_argument(
        "--gumbel-end",
        type=positive_number,
        default=r.gumbel_end,
        metavar="X",
        help="Gumbel temperature at the last step",
    )
    g.add_argument(
        "--relax-fraction",
        type=positive_number,
        default=r.relax_fraction,
        metavar="X",
        help="share of the run over which the per-block sparsity bounds relax to [0, 1] (default: %(default).4g)",
    )


def _start_args(g: Any, d: Any) -> None:
    """Where training starts from: weights, teacher, input size, seed (default from ``d``)."""
    g.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="static pretrained weights (torchvision names); without: from scratch, no distillation",
    )
    g.add_argument("--teacher", default=None, metavar="FILE", help="static teacher weights (default: --weights)")
    g.add_argument("--no-distill", action="store_true", help="no distillation loss")
    g.add_argument(
        "--input-size", type=image_size, default=None, metavar="N", help="image side N or HxW (default: the config's)"
    )
    g.add_argument(
        "--seed", type=nonneg_int, default=d.seed, metavar="N", help="seed of initialisation, data order, gates"
    )


def _running_args(g: Any, d: Any) -> None:
    """Checkpoints, logging (defaults from ``d``) and the runtime options train shares with evaluate."""
    g.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        default=d.checkpoint_every,
        metavar="N",
        help="also checkpoint every N steps (0: at epoch ends only)",
    )
    g.add_argument(
        "--log-every",
        type=positive_int,
        default=d.log_every,
        metavar="N",
        help="log line every N steps (without a terminal; with one, a progress bar)",
    )
    _runtime_args(g, "loader worker processes decoding images, per training process (image folders)")


def _add_evaluate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub,
        common,
        "evaluate",
        _cmd_evaluate,
        help="accuracy, realised rates and latency of a trained model",
        description="Evaluate trained weights of CONFIG on DIR/val with adaptive gates: top-1 and top-5, the rate\n"
        "each dynamic stage realised, the latency predicted on --target at those rates, and with --bench\n"
        "the latency measured here with dynas's kernels next to the static network.  Under torchrun the\n"
        "held-out images are split over the processes.",
    )
    p.add_argument("config", metavar="CONFIG", help="config or exported JSON file (RUN/config.json after dynas train)")
    p.add_argument(
        "--weights", default=None, metavar="FILE", help="trained weights: RUN/model.pt (or RUN/checkpoint.pt)"
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="image folder with DIR/val/<class>/*; or synthetic[:N], a torch.save file",
    )
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="images per batch (per process)")
    p.add_argument("--bench", action="store_true", help="also measure the latency on this device (dynas bench)")
    p.add_argument("--bench-batch-size", type=positive_int, default=1, metavar="N", help="batch size of --bench")
    _runtime_args(p, "loader worker processes decoding images (image folders)")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``train`` and ``evaluate`` sub-commands to ``sub`` (``common``: the -q/-v parent)."""
    _add_train(sub, common)
    _add_evaluate(sub, common)
