"""Whole dynamic networks built from an :class:`~dynas.spaces.config.ArchConfig`.

:func:`build_model` returns a :class:`DynamicNet`: the static backbone of
:mod:`dynas.spaces.torch_model` (torchvision module names: ``conv1``/``bn1``/``layer1.0.conv2``
for ResNet, ``stem``/``trunk_output.block2.block2-0.f.b`` for RegNetY,
``features.denseblock2.denselayer3.conv1`` for DenseNet) whose residual blocks are replaced by
the dynamic blocks of :mod:`dynas.kernels.blocks` (dense layers, blocks and transitions by
those of :mod:`dynas.kernels.dense`).  Masker parameters live
under each block (``layer2.0.spatial_masker.conv.weight``), so a static or torchvision state
dict loads with exactly the masker parameters missing.

Usage::

    model = build_model("export.json").eval()
    model.load_pretrained("resnet50.pth")      # -> LoadResult(missing, unexpected, masker_keys)
    model.set_gate_mode("budget")              # or "adaptive"
    model.set_path("fast")                     # or "reference" (dense compute, then mask)
    logits = model(images)
    model.set_exit_policy("budget", budget_ms=5.0, target="cpu.toml")  # configs with exits only
    readout = model.flops_readout()            # per dynamic block: executed / dense FLOPs, rates

In training (``model.train()``) the maskers sample straight-through hard Gumbel decisions at
the temperature given by :meth:`DynamicNet.set_temperature`.

A config with ``exits`` adds ``exit_heads`` (one :class:`~dynas.kernels.exits.ExitHead` per
exit): in training the model returns a list of every exit's logits (own head last), in eval
what its exit policy gives (:meth:`DynamicNet.set_exit_policy`, :mod:`dynas.kernels.exits`).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from dynas.checks import check_choice
from dynas.errors import ConfigError
from dynas.kernels.blocks import PATHS, DynamicBlock, build_block
from dynas.kernels.dense import DynamicDenseLayer, make_dense_dynamic
from dynas.kernels.exits import ExitHead, ExitPolicy, FinalPolicy, forward_exits, make_policy
from dynas.kernels.maskers import GATE_MODES, Masker, StageQuota
from dynas.predictors.exits import exit_inputs
from dynas.spaces.config import ArchConfig, load_config, stage_runs
from dynas.spaces.torch_model import block_module_name, build_static_model, replace_classifier

__all__ = ["DynamicNet", "LoadResult", "build_model"]

_log = logging.getLogger(__name__)

#: prefixes that wrappers add to state-dict keys (DataParallel / DDP, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadResult:
    """Outcome of :meth:`DynamicNet.load_pretrained`; unpacks as ``missing, unexpected``.

    ``missing_keys`` are the model's non-masker parameters/buffers that the state dict lacked,
    ``unexpected_keys`` the state dict's keys the model has no place for, ``masker_keys`` the
    masker parameters (always freshly initialised: a static checkpoint has none), ``head_keys``
    the classifier keys left at their initialisation by ``new_head=True``, ``exit_keys`` the
    exit heads' keys the state dict lacked (a static checkpoint has none).
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    masker_keys: list[str] = field(default_factory=list)
    head_keys: list[str] = field(default_factory=list)
    exit_keys: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[list[str]]:
        return iter((self.missing_keys, self.unexpected_keys))


class DynamicNet(nn.Module):
    """A backbone whose residual blocks are :class:`~dynas.kernels.blocks.DynamicBlock` s."""

    def __init__(self, config: ArchConfig):
        super().__init__()
        self.config = config
        spec = config.spec
        self.spec = spec
        static = build_static_model(spec)
        # The static class's forward runs on this module (same children, same names), so the
        # forward pass is written once, in spaces/torch_model.py.
        self._static_cls = type(static)
        for name, child in static.named_children():
            self.add_module(name, child)
        self.block_names: list[str] = []
        for b in spec.blocks:
            path = block_module_name(b)
            parent_path, _, leaf = path.rpartition(".")
            parent = self.get_submodule(parent_path)
            dyn = (DynamicDenseLayer if b.kind == "dense" else build_block)(b, config.stages[b.stage])
            old = getattr(parent, leaf)
            dyn.load_state_dict(old.state_dict(), strict=False)  # keep the static init of shared weights
            dyn.reuse_input = True  # block inputs are this network's intermediates (fast path only)
            dyn.input_nonnegative = True  # ... and ReLU outputs (the stem's, or the previous block's)
            setattr(parent, leaf, dyn)
            self.block_names.append(path)
        if spec.family == "densenet":
            make_dense_dynamic(self)  # dense blocks run their layers; transitions skip unproduced channels
        # Budget mode: the per-sample gates of one stage (layer gates, and spatial gates whose one
        # patch is the whole map) share a per-sample quota of blocks to run, rounded with the
        # remainder carried to the next such stage (spaces.config.stage_runs).
        for stage, runs in enumerate(stage_runs(config)):
            if runs is None:
                continue
            gates = [
                m
                for blk in self.blocks()
                if blk.spec.stage == stage
                for m in (blk.layer_masker, blk.spatial_masker)
                if m is not None and not m.per_sample_budget
            ]
            quota = StageQuota(runs)
            for j, m in enumerate(gates):
                m.slot, m.quota = (j, len(gates)), quota
        # Exit heads last, so that a config without exits draws the same initial weights as before.
        self.exit_heads = nn.ModuleList(
            ExitHead(exit_inputs(spec, s)[0], spec.num_classes, config.exit_head, config.exit_width)
            for s in config.exits
        )
        self.exit_policy: ExitPolicy = FinalPolicy()
        self.last_exit: torch.Tensor | None = None  # [N] exit each sample answered from (policies)
        self.last_trace: list[tuple[str, float, float, float]] | None = None  # deadline policy

    # -- forward ---------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> last stage map [N, C_last, h, w]."""
        return self._static_cls.forward_features(self, x)

    def forward(self, x: torch.Tensor) -> "torch.Tensor | list[torch.Tensor]":
        """[N, 3, H, W] -> [N, num_classes]; with exits, a list per exit in training (module doc)."""
        if not self.config.exits:
            return self.forward_without_exits(x)
        if self.training:
            return forward_exits(self, x)
        return self.exit_policy.run(self, x)

    def forward_without_exits(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone to its own head, exit heads unused: [N, 3, H, W] -> [N, num_classes]."""
        return self._static_cls.forward(self, x)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> the first stage's input."""
        if self.spec.family == "regnety":
            return self.stem(x)
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stage_modules(self, stage: int) -> list[DynamicBlock]:
        """The blocks of ``stage``, in order."""
        return [blk for blk in self.blocks() if blk.spec.stage == stage]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The own head: last stage map [N, C, h, w] -> [N, num_classes]."""
        return self.fc(torch.flatten(self.avgpool(x), 1))  # [N, C, 1, 1] -> [N, C] -> [N, num_classes]

    # -- control ---------------------------------------------------------------------------

    def blocks(self) -> list[DynamicBlock]:
        return [self.get_submodule(p) for p in self.block_names]  # type: ignore[misc]

    def maskers(self) -> list[Masker]:
        return [m for m in self.modules() if isinstance(m, Masker)]

    def set_gate_mode(self, mode: str) -> "DynamicNet":
        """Inference decisions: ``"adaptive"`` (argmax per input), ``"budget"`` (exact rates) or
        ``"random"`` (exact rates, uniformly random choice per sample; see :mod:`dynas.kernels.maskers`)."""
        check_choice("gate mode", mode, GATE_MODES)
        for m in self.maskers():
            m.set_gate_mode(mode)
        return self

    def set_path(self, path: str) -> "DynamicNet":
        """Eval compute path: ``"fast"`` (skips work) or ``"reference"`` (dense, then masked)."""
        check_choice("path", path, PATHS)
        for b in self.blocks():
            b.set_path(path)
        return self

    def set_temperature(self, temperature: float) -> "DynamicNet":
        """Gumbel-softmax temperature of every masker (training only)."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"temperature={temperature!r} is out of range; allowed: a number > 0")
        for m in self.maskers():
            m.temperature = float(temperature)
        return self

    def set_force(self, force: str | None) -> "DynamicNet":
        """Override every decision: ``"on"``, ``"off"`` or ``None`` (normal gating)."""
        for m in self.maskers():
            m.set_force(force)
        return self

    def set_exit_policy(self, policy: "str | ExitPolicy", **options: Any) -> "DynamicNet":
        """How eval forward passes use the exits: ``"final"`` (default), ``"all"``, ``"budget"``
        (``budget_ms`` or ``budget_mj``, ``target``), ``"deadline"`` (``deadline_ms``, ``target``, ``clock``) or
        ``"confidence"`` (``thresholds``, default the config's); see :mod:`dynas.kernels.exits`."""
        self.exit_policy = policy if isinstance(policy, ExitPolicy) else make_policy(self.config, policy, **options)
        return self

    def set_num_classes(self, classes: int) -> "DynamicNet":
        """Fresh classifiers for ``classes`` classes: the own head's ``fc`` and every exit head's."""
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ConfigError(f"classes={classes!r} is out of range; allowed: an integer >= 2")
        replace_classifier(self, classes)  # fc, or DenseNet's classifier
        for head in self.exit_heads:
            head.fc = nn.Linear(head.fc.in_features, classes)
        return self

    def flops_readout(self) -> list[dict[str, Any]]:
        """One dict per dynamic block from the last forward pass.

        Keys: ``stage``, ``block``, ``name`` (module path), ``executed_flops`` (Tensor[N], masker
        and downsample included; differentiable in training), ``dense_flops`` (float, every gate
        on), ``masker_flops`` (float), ``rates`` (dict of Tensor[N]: ``spatial`` / ``channel`` /
        ``layer`` where used, and ``primary`` = the stage's configured ``rate``'s decision).
        Static blocks are left out.  Raises :class:`ConfigError` before any forward pass.
        """
        out = []
        for spec_b, path in zip(self.spec.blocks, self.block_names):
            blk = self.get_submodule(path)
            if blk.paradigm == "static":
                continue
            if blk.last_flops is None:
                raise ConfigError(f"flops_readout() before a forward pass; block {path} has no record yet")
            out.append({"stage": spec_b.stage, "block": spec_b.index, "name": path, **blk.last_flops})
        return out

    # -- weights ---------------------------------------------------------------------------

    def load_pretrained(
        self,
        source: "str | os.PathLike[str] | Mapping[str, torch.Tensor]",
        strict: bool = False,
        new_head: bool = False,
    ) -> LoadResult:
        """Load a static (torchvision-named) state dict; return what did not match.

        ``source`` is a state dict or a ``torch.save`` file of one (a ``{"state_dict": ...}`` or
        ``{"model": ...}`` wrapper and ``module.`` / ``_orig_mod.`` key prefixes are accepted).
        Masker parameters are expected to be missing and are reported in ``masker_keys``; any
        other missing or unexpected key is warned about, or raises :class:`ConfigError` when
        ``strict``.  Shape mismatches raise :class:`ConfigError`, except, with ``new_head``, a
        classifier (``fc.*``, DenseNet's ``classifier.*``) of another width: it keeps its initialisation and is reported in
        ``head_keys`` (a backbone pretrained for other classes).
        """
        if isinstance(source, (str, os.PathLike)):
            try:
                state = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a file that is not a checkpoint makes torch.load raise anything
                raise ConfigError(
                    f"pretrained={str(source)!r} cannot be loaded ({type(exc).__name__}: {exc}); "
                    "allowed: a torch.save file of a state dict".splitlines()[0]
                ) from None
        else:
            state = source
        if isinstance(state, Mapping):
            for wrapper in ("state_dict", "model"):
                if wrapper in state and isinstance(state[wrapper], Mapping):
                    state = state[wrapper]
                    break
        if not isinstance(state, Mapping):
            raise ConfigError(
                f"pretrained={type(state).__name__} is not a state dict; allowed: a mapping of names to tensors"
            )
        clean: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k = k[len(p) :]
            clean[k] = v
        own = self.state_dict()
        head = [
            k
            for k, v in clean.items()
            if new_head
            and k.startswith(("fc.", "classifier."))
            and k in own
            and isinstance(v, torch.Tensor)
            and tuple(v.shape) != tuple(own[k].shape)
        ]
        for k in head:
            del clean[k]
        for k, v in clean.items():
            if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape):
                raise ConfigError(
                    f"pretrained key {k!r} has shape {tuple(v.shape)}; allowed: {tuple(own[k].shape)} for {self.config.backbone}"
                )
        res = self.load_state_dict(clean, strict=False)
        masker = [k for k in res.missing_keys if "_masker." in k]
        exit_keys = [k for k in res.missing_keys if k.startswith("exit_heads.")]
        missing = [k for k in res.missing_keys if "_masker." not in k and k not in head and k not in exit_keys]
        result = LoadResult(missing, list(res.unexpected_keys), masker, head, exit_keys)
        if missing or result.unexpected_keys:
            msg = (
                f"pretrained weights: {len(missing)} missing key(s) (first: {missing[:1]}), "
                f"{len(result.unexpected_keys)} unexpected key(s) (first: {result.unexpected_keys[:1]})"
            )
            if strict:
                raise ConfigError(msg + "; allowed: only masker parameters missing")
            warnings.warn(msg, stacklevel=2)
        _log.info("pretrained weights loaded; %d masker parameter(s) keep their initialisation", len(masker))
        return result


def build_model(
    config: "ArchConfig | Mapping[str, Any] | str | os.PathLike[str]", num_classes: int | None = None
) -> DynamicNet:
    """The dynamic network of ``config`` (ArchConfig, dict, JSON string or path, exports included).

    ``num_classes``: the classifier's width; by default the ``trained.num_classes`` that
    ``dynas train`` writes into ``RUN/config.json`` (so ``build_model("RUN/config.json")`` takes
    ``RUN/model.pt``), else the backbone's (1000).  Freshly initialised, in training mode like
    any ``nn.Module``; call ``.eval()`` for the inference paths (fast path and adaptive gates
    by default).
    """
    cfg = load_config(config)
    if num_classes is None:
        num_classes = _trained_classes(config)
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ConfigError(f"num_classes={num_classes!r} is out of range; allowed: an integer >= 1")
    model = DynamicNet(cfg)
    head = model.classifier if cfg.spec.family == "densenet" else model.fc
    if num_classes is not None and num_classes != head.out_features:
        model.set_num_classes(num_classes)
    return model


def _trained_classes(source: Any) -> Any:
    """``trained.num_classes`` of a config written by ``dynas train`` (dict, JSON text or file), else None."""
    data = source
    if isinstance(source, (str, os.PathLike)):
        try:
            text = str(source) if str(source).lstrip().startswith("{") else Path(source).read_text()
            data = json.loads(text)
        except (OSError, ValueError):
            return None  # load_config has read it already, so this does not happen
    trained = data.get("trained") if isinstance(data, Mapping) else None
    return trained.get("num_classes") if isinstance(trained, Mapping) else None
