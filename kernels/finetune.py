"""The ``finetune`` accuracy proxy: each candidate is scored by a short, real fine-tune.

What it is
    A *measurement* on the user's data (or the built-in synthetic set): held-out top-1 (%) of
    the candidate after ``steps`` steps of LAUDNet's recipe (:mod:`dynas.kernels.recipe`),
    starting from the static backbone's weights, with adaptive gates at evaluation.

What it is not
    The accuracy after a full training run.  A short fine-tune ranks candidates (the README
    reports how well, as Spearman against a longer fine-tune); it does not say what 100 epochs
    reach.

It lives in ``kernels`` because it runs configs for real; ``dynas search --proxy finetune``
finds it through :data:`dynas.predictors.proxy.PLUGINS`.

Lifecycle (see :mod:`dynas.predictors.proxy`)::

    proxy = FinetuneProxy(data="synthetic", steps=40)
    proxy.static_top1("resnet18")      # first call per process: load the data, prepare the
                                       # static backbone (weights, then pretrain_steps on the data)
    proxy.evaluate(config, reporter)   # per trial: build, load static weights, fine-tune with
                                       # checkpoints reported to the search, evaluate

Preparing the static backbone ("the teacher"): ``weights`` (a static, torchvision-named state
dict; a classifier of another width is dropped) or a fresh initialisation, then
``pretrain_steps`` steps of plain training on the data.  Its held-out top-1 is
:meth:`FinetuneProxy.static_top1`, and it is the starting point of every candidate and, with
``distill``, its teacher.  The prepared weights travel with the proxy when it is pickled to
worker processes, so workers do not redo it.

Per candidate: :func:`dynas.kernels.model.build_model`, the prepared weights loaded (maskers
keep their initialisation), ``steps`` steps of :func:`dynas.kernels.trainer.finetune` (per-stage
FLOPs and rate targets, Gumbel temperature 5 -> 0.1 over the ``steps``, distillation), top-1 on
the held-out split at ``checkpoints`` evenly spaced points (each reported; the search may stop
the trial there), and the per-stage rates the adaptive gates realise on the held-out split.
A config with exits also records each exit's held-out top-1 (``attrs["exit_top1"]``: one
``{"after_stage", "top1"}`` per exit, own head last).

Realised rates: the gates are trained towards the configured rates but need not reach them.
:meth:`evaluate` returns the config with each dynamic stage's ``rate`` (and ``channel_rate``)
replaced by the realised mean, clipped to [0.01, 1] and rounded to 3 decimals; the search
predicts the latency objective from that config.

Every candidate starts from the same weights, data order and seed, so two candidates differ
only by their config: the score is deterministic for a config on one machine (CPU kernels may
differ in the last bits across machines).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from dynas.checks import check_int, check_positive
from dynas.errors import ConfigError
from dynas.kernels.data import DataSplits, check_data_spec, load_data
from dynas.kernels.exits import exit_accuracies
from dynas.kernels.model import DynamicNet, build_model
from dynas.kernels.trainer import evaluate, finetune
from dynas.predictors.proxy import AccuracyProxy, ProxyResult, Reporter
from dynas.spaces.config import ArchConfig, load_config
from dynas.spaces.torch_model import replace_classifier

__all__ = ["FinetuneProxy", "MIN_REALISED_RATE", "realised_config"]

_log = logging.getLogger("dynas.search.study")  # the search's logger: its progress lines

#: the lowest rate a realised rate is clipped to (a stage whose gates all close is kept at this)
MIN_REALISED_RATE = 0.01


class FinetuneProxy(AccuracyProxy):
    """MEASURED accuracy proxy: top-1 after a short fine-tune of each candidate (see module doc)."""

    name = "finetune"
    description = (
        "MEASURED on the given data, not ImageNet: held-out top-1 after a short LAUDNet-recipe fine-tune "
        "from the static backbone, adaptive gates"
    )
    scores_exits = True  # attrs["exit_top1"]: each exit's held-out top-1

    def __init__(
        self,
        *,
        data: str = "synthetic",
        steps: int = 40,
        batch_size: int = 32,
        lr: float = 0.05,
        checkpoints: int = 3,
        weights: str | None = None,
        pretrain_steps: int = 200,
        distill: bool = True,
        seed: int = 0,
    ) -> None:
        self.data = check_data_spec(data)
        self.steps = check_int("finetune steps", steps, 1)
        self.batch_size = check_int("finetune batch_size", batch_size, 1)
        self.checkpoints = check_int("finetune checkpoints", checkpoints, 1)
        if self.checkpoints > self.steps:
            raise ConfigError(f"finetune checkpoints={checkpoints!r} exceeds steps={steps}; allowed: 1..steps")
        self.pretrain_steps = check_int("finetune pretrain_steps", pretrain_steps, 0)
        self.seed = check_int("finetune seed", seed, 0)
        self.lr = float(check_positive("finetune lr", lr))
        if not isinstance(distill, bool):
            raise ConfigError(f"finetune distill={distill!r} is not a bool; allowed: true or false")
        self.distill = distill
        if weights is not None:
            if not isinstance(weights, (str, os.PathLike)) or not os.path.isfile(weights):
                raise ConfigError(
                    f"finetune weights={weights!r} is not a file; allowed: a torch.save state dict of the static backbone"
                )
            weights = os.path.abspath(weights)
        self.weights = weights
        # Per (backbone, input size): static state dict, static top-1 (%), number of classes.
        self._prepared: dict[tuple[str, tuple[int, int]], dict[str, Any]] = {}
        self._data: dict[tuple[int, int], Any] = {}  # input size -> DataSplits; not pickled

    # -- pickling: the prepared weights travel, the loaders are rebuilt ------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = {}
        return state

    def options(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "checkpoints": self.checkpoints,
            "weights": self.weights,
            "pretrain_steps": self.pretrain_steps,
            "distill": self.distill,
            "seed": self.seed,
        }

    def checkpoint_steps(self) -> list[int]:
        """Step counts after which top-1 is reported: ``checkpoints`` evenly spaced, the last = ``steps``."""
        return sorted({max(1, round(self.steps * (k + 1) / self.checkpoints)) for k in range(self.checkpoints)})

    # -- preparation -------------------------------------------------------------------------

    def _splits(self, input_size: tuple[int, int]) -> DataSplits:
        if input_size not in self._data:
            self._data[input_size] = load_data(self.data, input_size, self.batch_size, self.seed)
        return self._data[input_size]

    def _static_model(self, backbone: str, input_size: tuple[int, int], num_classes: int) -> DynamicNet:
        torch.manual_seed(self.seed)
        model = build_model(ArchConfig.static(backbone, input_size))
        replace_classifier(model, num_classes)
        return model

    def prepare(self, backbone: str, input_size: tuple[int, int]) -> dict[str, Any]:
        """The prepared static backbone for ``backbone`` at ``input_size`` (see module doc); cached."""
        key = (backbone, tuple(input_size))
        if key in self._prepared:
            return self._prepared[key]
        splits = self._splits(tuple(input_size))
        model = self._static_model(backbone, tuple(input_size), splits.num_classes)
        if self.weights is not None:
            try:
                result = model.load_pretrained(self.weights, new_head=True)  # warns about other missing keys
            except ConfigError as exc:
                raise ConfigError(f"finetune weights: {exc}") from None
            if result.head_keys:
                _log.info(
                    "finetune proxy: the classifier in %s does not fit the %d classes of the data; it starts fresh",
                    self.weights,
                    splits.num_classes,
                )
        if self.pretrain_steps:
            _log.info(
                "finetune proxy: training the static %s on %s for %d steps (once per search)",
                backbone,
                self.data,
                self.pretrain_steps,
            )
            finetune(model, splits.train_batches(), self.pretrain_steps, lr=self.lr)
        accuracy, _ = evaluate(model, splits.val)
        _log.info("finetune proxy: static %s top-1 %.2f%% on the held-out split", backbone, 100 * accuracy)
        prepared = {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "top1": 100.0 * accuracy,
            "num_classes": splits.num_classes,
        }
        self._prepared[key] = prepared
        return prepared

    # -- the proxy interface -----------------------------------------------------------------

    def static_top1(self, backbone: str) -> float:
        """Held-out top-1 (%) of the prepared static ``backbone`` (prepared at 224x224 unless
        :meth:`static_score` or :meth:`prepare` prepared it at one other input size)."""
        sizes = [k[1] for k in self._prepared if k[0] == backbone]
        return float(self.prepare(backbone, sizes[0] if len(sizes) == 1 else (224, 224))["top1"])

    def static_score(self, config: ArchConfig) -> float:
        return float(self.prepare(config.backbone, tuple(config.input_size))["top1"])

    def reference_top1(self, config: ArchConfig) -> float:
        """Chance level, 100 / classes: on a small task a short fine-tune can lose far more than 5 points."""
        return 100.0 / self.prepare(config.backbone, tuple(config.input_size))["num_classes"]

    def chance_top1(self, config: ArchConfig) -> float:
        """100 / the data's classes (what a budget no exit fits scores)."""
        return self.reference_top1(config)

    def score(self, config: ArchConfig) -> float:
        return self.evaluate(config).top1

    def evaluate(self, config: ArchConfig, reporter: Reporter | None = None) -> ProxyResult:
        cfg = load_config(config)
        prepared = self.prepare(cfg.backbone, tuple(cfg.input_size))
        splits = self._splits(tuple(cfg.input_size))
        torch.manual_seed(self.seed)
        model = build_model(cfg).set_num_classes(prepared["num_classes"])
        model.load_state_dict(prepared["state"], strict=False)  # masker and exit heads keep their initialisation
        teacher = None
        if self.distill:
            teacher = self._static_model(cfg.backbone, tuple(cfg.input_size), prepared["num_classes"])
            teacher.load_state_dict(prepared["state"])
            teacher.eval()
        curve: dict[int, float] = {}
        rates: dict[int, dict[str, float]] = {}
        exit_top1: list[dict[str, float]] = []

        def checkpoint(step: int) -> None:
            accuracy, realised_rates = evaluate(model, splits.val)
            curve[step] = 100.0 * accuracy
            if step == self.steps:
                rates.update(realised_rates)
                if cfg.exits:  # each exit's top-1, every sample answered there
                    stages = list(cfg.exits) + [cfg.spec.num_stages - 1]
                    exit_top1.extend(
                        {"after_stage": s, "top1": 100.0 * a}
                        for s, a in zip(stages, exit_accuracies(model, splits.val))
                    )
            if reporter is not None:
                reporter.report(step, curve[step], final=step == self.steps)  # may raise StopTrial

        torch.manual_seed(self.seed + 1)
        finetune(
            model,
            splits.train_batches(),
            self.steps,
            lr=self.lr,
            teacher=teacher,
            checkpoints=self.checkpoint_steps(),
            on_checkpoint=checkpoint,
        )
        top1 = curve[self.steps]
        realised = realised_config(cfg, rates)
        attrs = {
            "realised_rates": {str(s): r for s, r in rates.items()},
            "top1_by_step": {str(k): v for k, v in curve.items()},
        }
        if exit_top1:
            attrs["exit_top1"] = exit_top1
        return ProxyResult(top1, None if realised == cfg else realised, attrs)


def realised_config(cfg: ArchConfig, rates: dict[int, dict[str, float]]) -> ArchConfig:
    """``cfg`` with each dynamic stage's ``rate`` / ``channel_rate`` replaced by the realised one
    (``{stage: {"rate": r, "channel_rate": c}}``), clipped to [MIN_REALISED_RATE, 1], 3 decimals."""
    stages = []
    for s, st in enumerate(cfg.stages):
        d = st.to_dict()
        for key in ("rate", "channel_rate"):
            if key in d and s in rates and key in rates[s]:
                d[key] = round(min(1.0, max(MIN_REALISED_RATE, rates[s][key])), 3)
        stages.append(d)
    return load_config({**cfg.to_dict(), "stages": stages})
