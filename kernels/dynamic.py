"""The mixin that makes a static residual block dynamic (:class:`DynamicBlock`; the design is in
:mod:`dynas.kernels.blocks`): its maskers and their decisions, the training / reference path
(dense compute times the masks), the fast path's split of a batch by layer gate and channel
selection (the spatial part is :class:`~dynas.kernels.spatial.SpatialPatches`), and the FLOPs
record of a pass.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dynas.errors import ConfigError
from dynas.kernels.gather import eval_bn, take_samples, zeros_in_layout
from dynas.kernels.maskers import ChannelMasker, LayerMasker, Masker, SpatialMasker
from dynas.kernels.spatial import DENSE_POOL, Geom, SpatialPatches
from dynas.spaces.backbones import BlockSpec
from dynas.spaces.config import PARADIGMS, StageConfig, uses_channel, uses_layer, uses_spatial

__all__ = ["PATHS", "DynamicBlock"]

#: inference paths
PATHS: tuple[str, ...] = ("fast", "reference")


class DynamicBlock(SpatialPatches):
    """Mixin that turns a static block of :mod:`dynas.spaces.torch_model` into a dynamic one.

    Subclasses (``DynamicBottleneck`` = ``DynamicBlock`` + ``Bottleneck`` etc.) implement
    ``_shortcut``, ``_masked_body``, ``_sparse_body``, ``_last_bn``, ``_chain``,
    ``_dense_terms`` and ``_conv2_input_gated``.  ``paradigm == "static"`` runs the static
    block's own forward and records nothing.
    """

    spec: BlockSpec
    stage_config: StageConfig
    path: str

    def _init_dynamic(self, spec: BlockSpec, cfg: StageConfig) -> None:
        if not isinstance(cfg, StageConfig) or cfg.paradigm not in PARADIGMS:
            raise ConfigError(f"stage config={cfg!r} is not a StageConfig; allowed paradigms: {', '.join(PARADIGMS)}")
        self.spec = spec
        self.stage_config = cfg
        self.paradigm = cfg.paradigm
        self.path = "fast"
        self.reuse_input = False  # see _writable_shortcut
        self.input_nonnegative = False  # see _relu_shortcut
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # batch size, decisions
        self._last_flops: dict[str, Any] | None = None
        self.spatial_masker: SpatialMasker | None = None
        self.channel_masker: ChannelMasker | None = None
        self.layer_masker: LayerMasker | None = None
        if uses_spatial(cfg.paradigm):
            self._init_spatial(spec, cfg.spatial_granularity, cfg.spatial_rate)
        if uses_channel(cfg.paradigm):
            g = cfg.channel_granularity
            if not isinstance(g, int) or g < 1 or spec.width % g or spec.width // g < 2:
                raise ConfigError(
                    f"channel_granularity={g!r} must divide block {spec.name}'s gated width {spec.width} into >= 2 groups"
                )
            self.channel_group = g
            # [n_groups, G]: the channels of each group (a selection of groups indexes its rows)
            self.register_buffer("_channel_ids", torch.arange(spec.width).view(-1, g), persistent=False)
            self.channel_masker = ChannelMasker(spec.in_channels, spec.width // g, cfg.channel_density)
        if uses_layer(cfg.paradigm):
            self.layer_masker = LayerMasker(spec.in_channels, cfg.layer_rate)

    # -- subclass hooks ---------------------------------------------------------------

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _masked_body(self, x: torch.Tensor, cm: torch.Tensor | None, sm: torch.Tensor | None) -> torch.Tensor:
        """Dense body with masks applied inside (module BN: batch stats in training)."""
        raise NotImplementedError

    def _sparse_body(self, x: torch.Tensor, sel: torch.Tensor | None, geom: Geom) -> torch.Tensor:
        """Body on a whole map or on gathered regions, channels ``sel`` only (eval BN)."""
        raise NotImplementedError

    def _last_bn(self) -> nn.BatchNorm2d:
        raise NotImplementedError

    def _chain(self) -> tuple[tuple[int, int, int], ...]:
        raise NotImplementedError

    def _dense_terms(self) -> dict[str, float]:
        raise NotImplementedError

    _conv2_input_gated = True

    # -- public -------------------------------------------------------------------------

    def maskers(self) -> list[Masker]:
        return [m for m in (self.spatial_masker, self.channel_masker, self.layer_masker) if m is not None]

    def set_path(self, path: str) -> None:
        if path not in PATHS:
            raise ConfigError(f"path={path!r} is unknown; allowed: {', '.join(PATHS)}")
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.paradigm == "static":
            return super().forward(x)  # type: ignore[misc]
        dec = self.decide(x)
        if self.training or self.path == "reference":
            out = self._masked_forward(x, dec)
        else:
            out = self._fast_forward(x, dec)
        self._last, self._last_flops = (x.shape[0], dec), None
        return out

    def configured_flops(self) -> dict[str, Any]:
        """FLOPs record (as ``last_flops``, batch of one) at exactly the configured rates."""
        cfg, ref = self.stage_config, next(self.parameters())
        dec: dict[str, torch.Tensor] = {}
        if self.spatial_masker is not None:
            dec["spatial"] = ref.new_full((1, *self.grid_hw), cfg.spatial_rate)
        if self.channel_masker is not None:
            dec["channel"] = ref.new_full((1, self.channel_masker.n_decisions), cfg.channel_density)
        if self.layer_masker is not None:
            dec["layer"] = ref.new_full((1,), cfg.layer_rate)
        with torch.no_grad():
            return self._flops(1, dec)

    @property
    def last_flops(self) -> dict[str, Any] | None:
        """FLOPs record of the last forward pass (None before one); computed on first access."""
        if self._last_flops is None and self._last is not None:
            self._last_flops = self._flops(*self._last)
        return self._last_flops

    def decide(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masks of this input: ``spatial`` [N, gh, gw], ``channel`` [N, n_groups], ``layer`` [N]."""
        dec: dict[str, torch.Tensor] = {}
        if self.spatial_masker is not None:
            dec["spatial"] = self.spatial_masker(x)
        if self.channel_masker is not None:
            dec["channel"] = self.channel_masker(x)
        if self.layer_masker is not None:
            dec["layer"] = self.layer_masker(x)
        if self.training:
            # what each gate would decide at inference (adaptive mode), for the rate read-out
            for key, m in (
                ("spatial", self.spatial_masker),
                ("channel", self.channel_masker),
                ("layer", self.layer_masker),
            ):
                if m is not None and m.force is None and m.last_adaptive is not None:
                    dec["adaptive_" + key] = m.last_adaptive
        return dec

    # -- training / reference ---------------------------------------------------------------

    def _masked_forward(self, x: torch.Tensor, dec: dict[str, torch.Tensor]) -> torch.Tensor:
        cm = sm = None
        if "channel" in dec:
            cm = dec["channel"].repeat_interleave(self.channel_group, dim=1)[:, :, None, None]  # [N, width, 1, 1]
        if "spatial" in dec:
            s = self.granularity
            # [N, gh, gw] -> [N, gh*S, gw*S] = [N, H_out, W_out] -> [N, 1, H_out, W_out]
            sm = dec["spatial"].repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)[:, None]
        h = self._masked_body(x, cm, sm)  # [N, C_out, H_out, W_out]
        if sm is not None:
            h = h * sm
        if "layer" in dec:
            h = h * dec["layer"][:, None, None, None]  # [N] -> [N, 1, 1, 1]
        return F.relu(self._shortcut(x) + h)

    # -- fast path ------------------------------------------------------------------------

    def _channel_parts(
        self, samples: torch.Tensor, dec: dict[str, torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Split ``samples`` ([n] batch indices) into groups sharing one channel selection."""
        if samples.numel() == 0:
            return []
        if "channel" not in dec:
            return [(samples, None)]
        chan = dec["channel"]
        on = (chan if samples.numel() == chan.shape[0] else chan.index_select(0, samples)) > 0.5  # [n, n_groups] bool
        ids = self._channel_ids  # [n_groups, G] channel indices of each group
        if on.shape[0] == 1:
            return [(samples, ids[on[0]].flatten())]  # [k * G] selected channels, sorted
        uniq, inverse = torch.unique(on, dim=0, return_inverse=True)  # [u, n_groups], [n]
        if uniq.shape[0] == 1:
            return [(samples, ids[uniq[0]].flatten())]
        return [(samples[inverse == u], ids[uniq[u]].flatten()) for u in range(uniq.shape[0])]

    def _distinct_selections(self, samples: torch.Tensor, dec: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[n, k]: the selected channels of each of ``samples`` ([n] batch indices), each row
        sorted, when they select different channels, as many each (budget and random gates
        always select as many).  None without channel gates, for one sample, when the samples
        share one selection (one part then serves them all) or when selection sizes differ."""
        if "channel" not in dec or samples.numel() < 2:
            return None
        chan = dec["channel"]
        on = (chan if samples.numel() == chan.shape[0] else chan.index_select(0, samples)) > 0.5  # [n, n_groups] bool
        counts = on.sum(dim=1)  # [n]
        if bool((on == on[:1]).all()) or not bool((counts == counts[:1]).all()) or int(counts[0]) == 0:
            return None
        n = samples.numel()
        # [n, n_groups, G] channel ids, the selected groups of each sample -> [n, k]
        return self._channel_ids.expand(n, *self._channel_ids.shape)[on].view(n, -1)

    #: (x [n, C_in, H, W], sels [n, k] each sample's selected channels) -> body outputs
    #: [n, C_out, H_out, W_out] before the shortcut; None where the block kind has no batched pass
    _batched_body: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def _empty(self, rows: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """Body output when no gated channel is selected: the last BN applied to zeros."""
        c_out = self.spec.out_channels
        return eval_bn(zeros_in_layout(like, rows, c_out, h, w), self._last_bn(), None)  # [rows, C_out, h, w]

    def _fast_forward(self, x: torch.Tensor, dec: dict[str, torch.Tensor]) -> torch.Tensor:
        # Compute every body first and write the output last: the output may reuse the shortcut's
        # memory, and every gather reads the unchanged input.
        n = x.shape[0]
        samples = torch.arange(n, device=x.device)
        if "layer" in dec:
            samples = (dec["layer"] > 0.5).nonzero().flatten()  # [n_on] samples whose body runs
        spatial = "spatial" in dec
        if spatial and self.grid_hw == (1, 1):
            # one patch covers the whole map: the spatial decision is a per-sample gate
            samples = samples[dec["spatial"][:, 0, 0].index_select(0, samples) > 0.5]
            spatial = False
        sels = self._distinct_selections(samples, dec)  # [n, k] when the samples' selections differ
        if sels is not None and spatial and self._batched_body is not None:
            # patches of samples that each need their own gathered weights (one pass per sample
            # ran at 1.06 of the static network's time at batch 8): the dense convolutions, masked
            return self._masked_forward(x, dec)
        batched = None
        if sels is not None and self._batched_body is not None:
            batched = self._batched_body(x if samples.numel() == n else take_samples(x, samples), sels)
        parts = [] if batched is not None else self._channel_parts(samples, dec)
        base = self._shortcut(x)  # [N, C_out, H_out, W_out]
        if spatial:
            return self._spatial_forward(x, dec, parts, base)
        if batched is not None:
            ys = [(samples, batched)]
        else:
            # per channel selection, its samples' bodies [n_u, C_out, H_out, W_out]; every sample
            # with one selection: no gather
            ys = [(idx, self._part_body(x if idx.numel() == n else take_samples(x, idx), sel)) for idx, sel in parts]
        if len(ys) == 1 and ys[0][0].numel() == n:
            return ys[0][1].add_(base).relu_()  # every sample ran: no scatter
        ys = [(idx, y.add_(take_samples(base, idx)).relu_()) for idx, y in ys]
        out = self._relu_shortcut(base, x)  # samples whose body does not run: ReLU(shortcut)
        for idx, y in ys:
            out.index_copy_(0, idx, y)
        return out

    def _part_body(self, x: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
        """Body output [n, C_out, H_out, W_out] of samples ``x`` that share selection ``sel``."""
        if sel is not None and sel.numel() == 0:
            return self._empty(x.shape[0], *self.spec.out_hw, x)
        return self._sparse_body(x, sel, DENSE_POOL)

    def _writable_shortcut(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The shortcut as a tensor this block may write.

        The downsample output itself; for an identity shortcut, the input when ``reuse_input``
        is set and autograd is off (``DynamicNet`` sets it: its block inputs are intermediates
        nobody else reads), else a copy in the same layout.
        """
        if base is not x:
            return base
        if self.reuse_input and not torch.is_grad_enabled():
            return x
        return x.clone()

    def _relu_shortcut(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ReLU(shortcut) as a tensor this block may write (see :meth:`_writable_shortcut`).

        An identity shortcut whose input is known to be non-negative (``input_nonnegative``,
        set by ``DynamicNet``: every block input there is a ReLU's output) is its own ReLU.
        """
        if base is x and self.input_nonnegative and self.reuse_input and not torch.is_grad_enabled():
            return x
        if base is not x or (self.reuse_input and not torch.is_grad_enabled()):
            return self._writable_shortcut(base, x).relu_()
        return F.relu(x)

    # -- FLOPs -------------------------------------------------------------------------------

    def _flops(self, n: int, dec: dict[str, torch.Tensor]) -> dict[str, Any]:
        t = self._dense_terms()
        masker = float(sum(m.flops() for m in self.maskers()))
        fixed = masker + t["downsample"]
        dense = fixed + t["conv1"] + t["conv2"] + t["conv3"] + t["se"]
        ref = next(iter(dec.values()))
        ones = torch.ones(n, dtype=ref.dtype, device=ref.device)
        a = dec["spatial"].mean(dim=(1, 2)) if "spatial" in dec else ones  # [N]
        d = dec["channel"].mean(dim=1) if "channel" in dec else ones  # [N]
        lg = dec["layer"] if "layer" in dec else ones  # [N]
        d_in = d if self._conv2_input_gated else ones
        body = t["conv1"] * a * d + t["conv2"] * a * d * d_in + t["conv3"] * a * d + t["se"] * d
        executed = fixed + lg * body  # [N]
        rates: dict[str, torch.Tensor] = {}
        if "spatial" in dec:
            rates["spatial"] = a
        if "channel" in dec:
            rates["channel"] = d
        if "layer" in dec:
            rates["layer"] = lg
        primary = "spatial" if "spatial" in rates else "layer" if "layer" in rates else "channel"
        rates["primary"] = rates[primary]
        if "adaptive_" + primary in dec:  # training: the rate the adaptive gates would realise
            adaptive = dec["adaptive_" + primary]
            rates["primary_adaptive"] = adaptive.reshape(n, -1).mean(dim=1)  # [N]
        return {"executed_flops": executed, "dense_flops": dense, "masker_flops": masker, "rates": rates}
