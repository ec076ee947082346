"""Dynamic DenseNet layers that really skip work: layer skipping, channel skipping in the
bottleneck, and both (DDI's multi-grained learning to skip, MGL2S; Wang et al., IEEE JSTSP 2020).

A dense layer (:class:`~dynas.spaces.densenet.DenseLayer`) reads every feature of its dense
block so far and adds ``k`` new ones.  Gates, per sample:

* **layer** (:class:`~dynas.kernels.maskers.LayerMasker`): a skipped layer adds *no* new
  features: its ``k`` output channels are zeros for that sample;
* **channel** (:class:`~dynas.kernels.maskers.ChannelMasker`): groups of the ``width``
  (``4k``) bottleneck channels: conv1 computes only the selected ones and conv2 reads only them.

Semantics (the training and reference paths, :meth:`DynamicDenseBlock._masked`): the dense
computation with the layer's new features multiplied by the layer gate and the bottleneck (after
BN + ReLU) by the channel mask.  A zero feature channel is *not* free for the layers after it:
their BN + ReLU turns it into the constant ``a_c = relu(beta_c - gamma_c mu_c / sigma_c)``,
which their 1x1 conv weighs like any other input.

Fast path (:meth:`DynamicDenseBlock._fast`, eval): one buffer holds the block's features
([N, C_in + L k, H, W], zeros where a layer was skipped, in the input's layout).  Each layer runs
only the samples whose gate is on, split by channel selection; a part reads only the channels of
the layers that *some* of its samples ran (the block input and those layers' features, gathered
as pixel rows), and the channels that none of them ran enter conv1 as the exact bias
``W1[:, dead] @ a[dead]`` instead of being read.  So the layers after a skipped layer do not pay
for its channels whenever the samples they run together all skipped it: always at batch 1; at
batch n, a channel is read when any of the samples that run the layer ran the layer that made
it (reading the union keeps one product per part; a sample that skipped a channel the union
reads holds zeros there, which the BN turns into the same ``a_c``).  The transition after the
block (:class:`DynamicTransition`) reads only the channels some sample of the batch produced,
the same way.  Spatial skipping is not offered on DenseNet (see the spec's ``paradigm_note``).

FLOPs (``last_flops``, per sample): maskers + l * (conv1 * d * live / C_in + conv2 * d), plus,
on a block's last layer, the transition * live_out / C_out, where ``live`` counts the input
channels the sample's own earlier layers produced (the block input included) and ``live_out``
those of the block's output; ``configured_flops`` takes every earlier layer as run with
probability ``l``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynas.errors import ConfigError
from dynas.kernels.convs import conv2d, conv_inputs, row_product
from dynas.kernels.dynamic import DynamicBlock
from dynas.kernels.gather import eval_bn, is_channels_last, pixel_rows, zeros_in_layout
from dynas.spaces.backbones import BlockSpec, transition_of
from dynas.spaces.config import StageConfig, uses_spatial
from dynas.spaces.densenet import DenseBlock, DenseLayer, Transition

__all__ = ["DynamicDenseLayer", "DynamicDenseBlock", "DynamicTransition", "make_dense_dynamic", "bn_zero_response"]


def bn_zero_response(bn: nn.BatchNorm2d) -> torch.Tensor:
    """[C] relu(BN(0)) per channel in eval mode: what a zero feature channel becomes after BN + ReLU."""
    return F.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))


def _bn_relu_rows(rows: torch.Tensor, bn: nn.BatchNorm2d, ch: torch.Tensor | None) -> torch.Tensor:
    """Eval BN (channels ``ch`` of ``bn``, None: all) + ReLU of pixel rows [M, C] -> [M, C]."""
    return F.relu(eval_bn(rows, bn, ch), inplace=True)


def _live_channels(ran: torch.Tensor, c0: int, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input channels of layer ``i = ran.numel()`` that some sample of a part produced, and the
    others: ``ran`` [i] bool (layer j ran for some sample).  (None, None) when every one did."""
    if bool(ran.all()):
        return None, None
    offsets = torch.arange(k, device=ran.device)
    live_layers = ran.nonzero().flatten()  # [a]
    dead_layers = (~ran).nonzero().flatten()  # [i - a]
    live = torch.cat([torch.arange(c0, device=ran.device), (c0 + live_layers[:, None] * k + offsets).flatten()])
    return live, (c0 + dead_layers[:, None] * k + offsets).flatten()  # [c0 + a k], [(i - a) k]


class DynamicDenseLayer(DynamicBlock, DenseLayer):
    """A dense layer with a layer gate and / or channel gates on its bottleneck; run by its
    :class:`DynamicDenseBlock`, which decides in layer order and keeps the features."""

    def __init__(self, spec: BlockSpec, cfg: StageConfig):
        DenseLayer.__init__(self, spec)
        if isinstance(cfg, StageConfig) and uses_spatial(cfg.paradigm):
            raise ConfigError(
                f"paradigm={cfg.paradigm!r} is not offered on DenseNet layers; allowed: static, channel, "
                "layer, layer+channel"
            )
        self._init_dynamic(spec, cfg)

    def forward(self, features: "torch.Tensor | list[torch.Tensor]") -> torch.Tensor:
        """On its own (not inside a :class:`DynamicDenseBlock`): the reference computation."""
        x = torch.cat(features, 1) if isinstance(features, (list, tuple)) else features
        if self.paradigm == "static":
            return DenseLayer.forward(self, x)
        return self.masked_new(x, self.decide(x))

    def masked_new(self, x: torch.Tensor, dec: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dense new features of ``x`` [N, C_in, H, W] with the masks applied -> [N, k, H, W]."""
        h = F.relu(self.norm2(self.conv1(F.relu(self.norm1(x)))))  # [N, width, H, W]
        if "channel" in dec:
            h = h * dec["channel"].repeat_interleave(self.channel_group, dim=1)[:, :, None, None]  # [N, width, 1, 1]
        new = self.conv2(h)  # [N, k, H, W]
        if "layer" in dec:
            new = new * dec["layer"][:, None, None, None]
        return new

    def fast_new(
        self,
        rows: torch.Tensor,
        shape: tuple[int, int, int],
        live: torch.Tensor | None,
        dead: torch.Tensor | None,
        sel: torch.Tensor | None,
    ) -> torch.Tensor:
        """New features of one part: ``rows`` [n * H * W, |live|] its pixel rows of the live input
        channels ``live`` (None: all), ``dead`` the others (folded into a bias), ``sel`` its
        bottleneck channels (None: all); ``shape`` = (n, H, W) -> [n, k, H, W], channels-last."""
        n, hh, ww = shape
        h = _bn_relu_rows(rows, self.norm1, live)  # [M, |live|]
        w1 = self.conv1.weight.flatten(1)  # [width, C_in]
        if sel is not None:
            w1 = w1.index_select(0, sel)  # [|sel|, C_in]
        h = row_product(h, w1 if live is None else w1.index_select(1, live))  # [M, |sel|]
        if dead is not None:
            a = bn_zero_response(self.norm1).index_select(0, dead)  # [|dead|]
            h = h.add_(w1.index_select(1, dead) @ a)  # the dead channels' constant, exactly
        h = _bn_relu_rows(h, self.norm2, sel)
        h = h.view(n, hh, ww, -1).permute(0, 3, 1, 2)  # [n, |sel|, H, W], channels-last strides
        if sel is None:
            return conv2d(h, self.conv2.weight, 1, 1)  # [n, k, H, W]
        return conv_inputs(h, self.conv2, sel, 1)  # reads the selected bottleneck channels only

    def _flops(self, n: int, dec: dict[str, torch.Tensor]) -> dict[str, Any]:
        b = self.spec
        hw = b.out_hw[0] * b.out_hw[1]
        conv1, conv2 = 2.0 * b.in_channels * b.width * hw, 2.0 * b.width * b.out_channels * 9 * hw
        trans = 0.0
        if b.has_downsample:
            c_in, c_out, out_hw = transition_of(b)
            trans = 2.0 * c_in * c_out * b.out_hw[0] * b.out_hw[1]
        masker = float(sum(m.flops() for m in self.maskers()))
        ref = dec["layer"] if "layer" in dec else dec["channel"]
        ones = torch.ones(n, dtype=ref.dtype, device=ref.device)
        d = dec["channel"].mean(dim=1) if "channel" in dec else ones  # [N]
        lg = dec["layer"] if "layer" in dec else ones  # [N]
        c0 = b.in_channels - b.index * b.out_channels
        live = dec["live"] if "live" in dec else c0 + b.index * b.out_channels * lg  # [N] input channels produced
        executed = masker + lg * d * (conv1 * live / b.in_channels + conv2)
        if b.has_downsample:
            executed = executed + trans * (live + b.out_channels * lg) / (b.in_channels + b.out_channels)
        rates = {"channel": d} if "channel" in dec else {}
        if "layer" in dec:
            rates["layer"] = lg
        rates["primary"] = rates["layer" if "layer" in rates else "channel"]
        primary = "layer" if "layer" in dec else "channel"
        if "adaptive_" + primary in dec:
            rates["primary_adaptive"] = dec["adaptive_" + primary].reshape(n, -1).mean(dim=1)  # [N]
        return {
            "executed_flops": executed,
            "dense_flops": masker + conv1 + conv2 + trans,
            "masker_flops": masker,
            "rates": rates,
        }


class DynamicDenseBlock(DenseBlock):
    """A dense block of :class:`DynamicDenseLayer` s (same names as torchvision's ``_DenseBlock``)."""

    def __init__(self, layers: "list[DynamicDenseLayer]"):
        nn.ModuleDict.__init__(self, {f"denselayer{layer.spec.index + 1}": layer for layer in layers})
        #: (output, channels no sample produced) of the last fast pass, for the transition after it
        self.handoff: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers: list[DynamicDenseLayer] = list(self.values())  # type: ignore[arg-type]
        self.handoff = None
        if layers[0].paradigm == "static":  # a stage shares one choice
            return DenseBlock.forward(self, x)
        if self.training or layers[0].path == "reference":
            return self._masked(x, layers)
        return self._fast(x, layers)

    def _masked(self, x: torch.Tensor, layers: "list[DynamicDenseLayer]") -> torch.Tensor:
        features, pooled = [x], [x.mean(dim=(2, 3))]  # [N, C, H, W] each, [N, C] each
        live = torch.full((x.shape[0],), float(x.shape[1]), dtype=x.dtype, device=x.device)  # [N]
        for layer in layers:
            # the maskers see the global pool of the features so far, one pooled vector per feature
            dec = layer.decide(torch.cat(pooled, 1)[:, :, None, None])  # [N, C_in, 1, 1]
            new = layer.masked_new(torch.cat(features, 1), dec)  # [N, k, H, W]
            layer._last, layer._last_flops = (x.shape[0], {**dec, "live": live}), None
            features.append(new)
            pooled.append(new.mean(dim=(2, 3)))
            live = live + new.shape[1] * (dec["layer"] if "layer" in dec else 1.0)
        return torch.cat(features, 1)  # [N, C_in + L k, H, W]

    def _fast(self, x: torch.Tensor, layers: "list[DynamicDenseLayer]") -> torch.Tensor:
        n, c0, hh, ww = x.shape
        k = layers[0].spec.out_channels
        buf = zeros_in_layout(x, n, c0 + len(layers) * k, hh, ww)  # [N, C, H, W], zeros = skipped features
        buf[:, :c0].copy_(x)
        pooled = x.new_zeros(n, buf.shape[1])  # [N, C] global pool of each feature so far
        pooled[:, :c0] = x.mean(dim=(2, 3))
        ran = torch.zeros(n, len(layers), dtype=torch.bool, device=x.device)  # [N, L] layer j ran for sample
        for i, layer in enumerate(layers):
            ci = c0 + i * k
            rows_all = pixel_rows(buf)  # [N * H * W, C]: a view when buf is channels-last, else a copy of now
            dec = layer.decide(pooled[:, :ci, None, None])  # [N, ci, 1, 1] -> decisions
            samples = torch.arange(n, device=x.device)
            if "layer" in dec:
                samples = (dec["layer"] > 0.5).nonzero().flatten()  # [n_on]
            live_count = (c0 + k * ran[:, :i].sum(dim=1)).to(x.dtype)  # [N] channels each sample's layers made
            layer._last, layer._last_flops = (n, {**dec, "live": live_count}), None
            for idx, sel in layer._channel_parts(samples, dec):
                whole = idx.numel() == n
                live, dead = _live_channels(ran[idx, :i].any(dim=0), c0, k)
                if whole:
                    src = rows_all[:, :ci]  # [N * H * W, ci] view
                else:
                    # the part's samples, first ci channels only: [N, H*W, C] -> [n_u, H*W, ci] -> rows
                    src = rows_all.view(n, hh * ww, -1)[:, :, :ci].index_select(0, idx).view(-1, ci)
                rows = src if live is None else src.index_select(1, live)  # [n_u * H * W, |live|]
                if sel is not None and sel.numel() == 0:  # no bottleneck channel: conv2 of zeros
                    y = zeros_in_layout(x, idx.numel(), k, hh, ww)
                else:
                    y = layer.fast_new(rows, (idx.numel(), hh, ww), live, dead, sel)  # [n_u, k, H, W]
                if whole:
                    buf[:, ci : ci + k].copy_(y)
                else:
                    buf[idx, ci : ci + k] = y
                pooled[idx, ci : ci + k] = y.mean(dim=(2, 3))
            ran[samples, i] = True
        produced = ran.any(dim=0)  # [L]
        if not bool(produced.all()):
            _, dead = _live_channels(produced, c0, k)
            self.handoff = (buf, dead)
        return buf  # [N, C_in + L k, H, W]


class DynamicTransition(Transition):
    """The transition after a :class:`DynamicDenseBlock`: on the fast path it reads only the
    channels some sample of the batch produced (the others enter its conv as an exact bias)."""

    def __init__(self, c_in: int, c_out: int, source: DynamicDenseBlock):
        super().__init__(c_in, c_out)
        self.__dict__["_source"] = source  # a reference, not a submodule (no second copy of its weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handoff = self._source.handoff
        self._source.handoff = None
        if handoff is None or handoff[0] is not x or self.training or not is_channels_last(x):
            return super().forward(x)
        dead = handoff[1]
        keep = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        keep[dead] = False
        live = keep.nonzero().flatten()  # [|live|]
        n, _, hh, ww = x.shape
        w = self.conv.weight.flatten(1)  # [C_out, C_in]
        h = _bn_relu_rows(pixel_rows(x).index_select(1, live), self.norm, live)  # [N*H*W, |live|]
        h = row_product(h, w.index_select(1, live))  # [N*H*W, C_out]
        h = h.add_(w.index_select(1, dead) @ bn_zero_response(self.norm).index_select(0, dead))
        return self.pool(h.view(n, hh, ww, -1).permute(0, 3, 1, 2))  # [N, C_out, H/2, W/2]


def make_dense_dynamic(net: nn.Module) -> None:
    """Put :class:`DynamicDenseBlock` s (holding the dynamic layers already in place) and
    :class:`DynamicTransition` s into a DenseNet whose layers are :class:`DynamicDenseLayer` s."""
    features = net.features
    spec = net.spec
    for s in range(spec.num_stages):
        old = getattr(features, f"denseblock{s + 1}")
        block = DynamicDenseBlock(list(old.values()))
        setattr(features, f"denseblock{s + 1}", block)
        last = spec.stage_blocks(s)[-1]
        if last.has_downsample:
            c_in, c_out, _ = transition_of(last)
            old_t = getattr(features, f"transition{s + 1}")
            trans = DynamicTransition(c_in, c_out, block)
            trans.load_state_dict(old_t.state_dict())
            setattr(features, f"transition{s + 1}", trans)
