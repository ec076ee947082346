"""Dynamic residual blocks that really skip work, plus a dense-masked reference path.

A dynamic block subclasses the static block of :mod:`dynas.spaces.torch_model` (same module
and parameter names, so a static/torchvision state dict loads) and adds maskers
(``spatial_masker``, ``channel_masker``, ``layer_masker``; see :mod:`dynas.kernels.maskers`).

Where the code is: this module holds the three block kinds (each kind's body, dense-masked and
on selected channels or gathered rows) and :func:`build_block`;
:mod:`dynas.kernels.dynamic` the mixin :class:`DynamicBlock` they share (decisions, paths,
FLOPs); :mod:`dynas.kernels.spatial` the spatial patches' geometry and gathers;
:mod:`dynas.kernels.convs` how each convolution and product runs; :mod:`dynas.kernels.gather`
the gathers and scatters of samples, pixel rows and selected channels.

Lifecycle of one forward pass (:meth:`DynamicBlock.forward`):

1. the maskers look at the block input and decide (training: hard straight-through Gumbel;
   eval: ``adaptive`` argmax or exact ``budget``);
2. the block computes its output along one of three paths:

   * **training** (``module.train()``): dense compute; the body's activations are multiplied
     by the hard masks, so gradients reach the maskers through the Gumbel relaxation;
   * **reference** (eval, ``path="reference"``): the same dense-masked computation with the
     eval decisions -- the oracle that the fast path must match;
   * **fast** (eval, ``path="fast"``, the default): only the selected work runs (below);
3. it records ``last_flops``: executed FLOPs per sample (Tensor[N], differentiable in
   training), dense FLOPs (float) and the realised activation rates.

Semantics shared by all paths (what "masked" means):

* channel mask ``cm`` ([N, width] from groups of G channels) multiplies the gated activations:
  conv1's output (after BN + ReLU) and, for bottleneck/RegNetY, the 3x3 conv's output;
* spatial mask ``sm`` ([N, 1, H_out, W_out], one value per SxS patch) multiplies the body's
  output; in RegNetY it also multiplies the 3x3 output *before* squeeze-excitation, so SE pools
  the masked map (inactive positions count as zero, divided by the full H_out * W_out);
* layer gate ``lm`` ([N]) multiplies the body's output;
* output = ReLU(shortcut(x) + body), shortcut = identity or the dense downsample conv + BN.

Fast path (every gather/scatter moves whole pixel rows when maps are channels-last, the layout
``dynas bench`` uses; any layout gives the same result):

* **spatial**, blocks whose conv1 is 1x1 (bottleneck, RegNetY): conv1 runs once per *needed*
  pixel -- the union of the active patches' windows of the 3x3 conv, halo included -- as a
  matrix product on gathered pixel rows scattered into a zeroed channels-last buffer (zero = the
  3x3 conv's padding), or, when that union is expected to be most of the map
  (``spatial.DENSE_HEAD_MIN_FRACTION``), on the whole map copied into the padded buffer.  Each
  active patch's window is one row of an overlapping strided view of the buffer, gathered in one
  copy (``convs.window_rows``); the 3x3 conv runs unpadded on the windows and returns exactly
  the SxS patches.  Patches of at most 2x2 (``spatial.ROWS_MAX_PATCH_PIXELS``) skip the windows:
  the bottleneck's 3x3 conv runs as one matrix product of the 3x3 windows of the active output
  pixels (im2col of those pixels only).  conv3 runs on the patch rows; shortcut + patch rows are
  added into the output in one ``index_add_`` and one ReLU covers the map.  Basic blocks (conv1
  is a 3x3 conv) gather regions of the *input* that carry the whole halo (``(S + 1) * s + 3``
  per side) and recompute conv1 on them.  A patch that covers the whole map (a 1x1 grid) is a
  per-sample gate: the body runs on the active samples only.
* **channel**: samples are grouped by identical selections; per group, conv1 computes only the
  selected output channels and conv3 reads only the selected inputs, both as products of pixel
  rows with gathered weights (a row gather of conv1's matrix, a row gather of conv3's cached transpose), the
  3x3 conv uses the k x k selected kernels (a row and a column gather of its cached
  channels-last matrix), BN uses the selected running statistics (one gather of a cached stack
  of the four).  Bottleneck samples that select different channels (k each) run in one batched
  pass instead of one pass per selection: conv1 and conv3 as batched products with each
  sample's own weight rows, the 3x3 conv as one convolution of n groups over the samples side
  by side; where a sample's gathered weights cost more than the work it skips
  (``GATHER_MACS_PER_WEIGHT``), the block runs its dense convolutions, masked (the reference
  path's computation), and so does a spatial+channel bottleneck batch with different
  selections.  A basic block's second 3x3 conv reads only the selected inputs: on CPU, as the
  equal transposed convolution, whose flipped kernels are cached by input channel so that the
  selection is a row gather (:func:`~dynas.kernels.convs.conv_inputs`).  Grouped 3x3 convs
  (RegNetY): a gate group need not align with the conv groups, so the conv runs over the
  *touched* conv groups only -- selected channels are scattered into a zero tensor holding
  every channel of the touched groups, the grouped conv runs with ``groups = number of touched
  groups`` and the selected outputs are picked back; when the selection is made of whole conv
  groups no copy happens.  SE reads/writes only the selected channels.
* **layer**: the body runs only on samples whose gate is on (gathered rows); the others output
  ReLU(shortcut(x)), which is the input itself for an identity shortcut of a non-negative input
  (``input_nonnegative``, set by ``DynamicNet``); when every sample runs, the static block's own
  ops run with no gather.
* combined paradigms compose: layer picks samples, channel groups them by selection, spatial
  gathers patches inside each group with the channel-sliced weights.
* the output of an identity-shortcut block is written into its input's memory when
  ``reuse_input`` is set and autograd is off (``DynamicNet`` sets it for its blocks, whose
  inputs are its own intermediates); a block used on its own never writes its input.

FLOPs (``last_flops``; 2 x multiply-accumulates of convolutions and linear layers, the
``torch.utils.flop_counter`` convention; BN, ReLU, pooling and the SE product are free).
Per sample, with ``a`` = fraction of active output positions (1 without spatial), ``d`` =
fraction of active gated channels (1 without channel), ``l`` = layer gate (1 without layer):

    executed = maskers + downsample
               + l * (conv1 * a * d + conv2 * a * d * d_in + conv3 * a * d + se * d)

where ``conv1``..``se`` are the dense per-sample FLOPs of those ops and ``d_in`` = ``d`` for a
bottleneck's plain 3x3 conv (input channels are gated too) and 1 for a basic block's second
conv (its input is gated: already counted by ``d``; its output is the block output) and for a
grouped conv (each selected output channel reads its whole conv group).  The halo that the
spatial kernel recomputes is not counted, nor the skipped work that a masked dense fallback
computes anyway (``executed`` is what the decisions skip, the FLOPs limit of a speed-up), so
``executed <= dense`` where ``dense`` (reported
as ``dense_flops``) is the same sum with every gate on: ``maskers + downsample + conv1 + conv2
+ conv3 + se``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynas.errors import ConfigError
from dynas.kernels.convs import (
    FOLD_MIN_MACS,
    FOLD_MIN_ROWS,
    conv2d,
    conv_inputs,
    gated_conv,
    is_one_pixel,
    one_pixel_conv,
    row_product,
    window_rows,
)
from dynas.kernels.dynamic import PATHS, DynamicBlock
from dynas.kernels.gather import (
    conv_cols,
    conv_matrix,
    conv_rows,
    conv_weight,
    derived_weight,
    eval_bn,
    pixel_rows,
    weight_rows,
)
from dynas.predictors.cpu_paths import GATHER_MACS_PER_WEIGHT, batching_pays
from dynas.spaces.backbones import BlockSpec
from dynas.spaces.config import StageConfig
from dynas.spaces.torch_model import BasicBlock, Bottleneck, RegNetYBlock

__all__ = [
    "PATHS",
    "DynamicBlock",
    "DynamicBasicBlock",
    "DynamicBottleneck",
    "DynamicRegNetYBlock",
    "build_block",
    "FOLD_MIN_ROWS",
    "FOLD_MIN_MACS",
]


class DynamicBasicBlock(DynamicBlock, BasicBlock):
    """ResNet-18/34 block: 3x3 (stride, gated output) -> 3x3 (gated input)."""

    _conv2_input_gated = False  # conv2's input gating is the ``d`` already applied; its output is the block's

    def __init__(self, spec: BlockSpec, cfg: StageConfig):
        BasicBlock.__init__(self, spec)
        self._init_dynamic(spec, cfg)

    def _shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)

    def _chain(self):
        return ((3, self.spec.stride, 1), (3, 1, 1))

    def _last_bn(self):
        return self.bn2

    def _dense_terms(self):
        b = self.spec
        ho, wo = b.out_hw
        return {
            "conv1": 2.0 * b.in_channels * b.width * 9 * ho * wo,
            "conv2": 2.0 * b.width * b.out_channels * 9 * ho * wo,
            "conv3": 0.0,
            "se": 0.0,
            "downsample": 2.0 * b.in_channels * b.out_channels * ho * wo if b.has_downsample else 0.0,
        }

    def _masked_body(self, x, cm, sm):
        h = F.relu(self.bn1(self.conv1(x)))  # [N, width, H_out, W_out]
        if cm is not None:
            h = h * cm
        return self.bn2(self.conv2(h))  # [N, C_out, H_out, W_out]

    def _sparse_body(self, x, sel, geom):
        h = F.relu(
            eval_bn(conv2d(x, conv_rows(self.conv1, sel), self.spec.stride, geom.pad), self.bn1, sel), inplace=True
        )
        if geom.valid is not None:
            h = h.mul_(geom.valid)  # [P, |sel|, S+2, S+2]: zero where conv2 sees padding
        if is_one_pixel(h, self.conv2, geom.pad):  # 1x1 patches: [P, |sel|, 3, 3] -> [P, C_out, 1, 1]
            return eval_bn(one_pixel_conv(h, self.conv2, None, sel), self.bn2, None)
        return eval_bn(conv_inputs(h, self.conv2, sel, geom.pad), self.bn2, None)


def _pointwise_3x3_pointwise_terms(b: BlockSpec, se_flops: float) -> dict[str, float]:
    """Dense per-sample FLOPs of a 1x1 -> 3x3 (stride, groups) -> 1x1 body (bottleneck, RegNetY)."""
    (hi, wi), (ho, wo) = b.in_hw, b.out_hw
    return {
        "conv1": 2.0 * b.in_channels * b.width * hi * wi,
        "conv2": 2.0 * (b.width // b.groups) * b.width * 9 * ho * wo,
        "conv3": 2.0 * b.width * b.out_channels * ho * wo,
        "se": se_flops,
        "downsample": 2.0 * b.in_channels * b.out_channels * ho * wo if b.has_downsample else 0.0,
    }


def _transposed(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight [C_out, C_in, 1, 1] as its transpose [C_in, C_out], contiguous."""
    return w.flatten(1).t().contiguous()


class DynamicBottleneck(DynamicBlock, Bottleneck):
    """ResNet-50/101/152 block: 1x1 -> 3x3 (stride) -> 1x1; gated width = bottleneck width."""

    def __init__(self, spec: BlockSpec, cfg: StageConfig):
        Bottleneck.__init__(self, spec)
        self._init_dynamic(spec, cfg)
        self._conv2_input_gated = self.conv2.groups == 1

    def _shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)

    def _chain(self):
        return ((1, 1, 0), (3, self.spec.stride, 1))

    def _last_bn(self):
        return self.bn3

    def _dense_terms(self):
        return _pointwise_3x3_pointwise_terms(self.spec, se_flops=0.0)

    def _masked_body(self, x, cm, sm):
        h = F.relu(self.bn1(self.conv1(x)))  # [N, width, H_in, W_in]
        if cm is not None:
            h = h * cm
        h = F.relu(self.bn2(self.conv2(h)))  # [N, width, H_out, W_out]
        if cm is not None:
            h = h * cm
        return self.bn3(self.conv3(h))  # [N, C_out, H_out, W_out]

    def _head_rows(self, rows, sel):
        w = self.conv1.weight.flatten(1)  # [width, C_in, 1, 1] -> [width, C_in]
        return F.relu(
            eval_bn(row_product(rows, weight_rows(w, sel)), self.bn1, sel), inplace=True
        )  # [M, C_in] -> [M, |sel|]

    def _head_map(self, x, sel):
        if sel is None:  # the static block's own op
            return F.relu(eval_bn(F.conv2d(x, self.conv1.weight), self.bn1, None), inplace=True)
        # 1x1 conv on the selected outputs as a product of pixel rows (no weight reformatting)
        b, _, hi, wi = x.shape
        h = self._head_rows(pixel_rows(x), sel)  # [B * H * W, |sel|]
        return h.view(b, hi, wi, -1).permute(0, 3, 1, 2)  # -> [B, |sel|, H, W], channels-last strides

    def _sparse_body(self, x, sel, geom):
        return self._tail(self._head_map(x, sel), sel, geom)

    def _tail(self, h, sel, geom):
        if sel is None and geom.pad == 1:  # whole maps, every channel: the static block's own ops
            h = F.relu(
                eval_bn(F.conv2d(h, self.conv2.weight, None, self.spec.stride, geom.pad), self.bn2, None), inplace=True
            )
            return eval_bn(F.conv2d(h, self.conv3.weight), self.bn3, None)
        if is_one_pixel(h, self.conv2, geom.pad):  # 1x1 patches: [P, k, 3, 3] windows -> [P, k, 1, 1]
            h2 = one_pixel_conv(h, self.conv2, sel, sel)
        else:
            # the k x k selected kernels, channels-last, in one row and one column gather
            h2 = conv2d(h, conv_weight(self.conv2, sel, sel), self.spec.stride, geom.pad)
        h2 = F.relu(eval_bn(h2, self.bn2, sel), inplace=True)  # [B, |sel|, H', W']
        b, _, ho, wo = h2.shape
        y = self._conv3_rows(pixel_rows(h2), sel)  # [B * H' * W', C_out]
        return y.view(b, ho, wo, -1).permute(0, 3, 1, 2)  # [B, C_out, H', W'], channels-last strides

    def _batched_body(self, x, sels):
        # samples with different selections of k channels each: x [n, C_in, H, W], sels [n, k]
        n, k = sels.shape
        conv2 = self.conv2
        if conv2.groups != 1 or not self._batching_pays(k):
            # a gathered weight set per sample costs more than the work it skips (small maps):
            # the dense convolutions, masked (the reference path's computation)
            cm = x.new_zeros(n, self.spec.width).scatter_(1, sels, 1.0)[:, :, None, None]  # [n, width, 1, 1]
            return self._masked_body(x, cm, None)
        flat = sels.flatten()  # [n * k] channel of each (sample, selected channel)
        hi, wi = x.shape[-2:]
        # conv1: per sample a product with its own rows of the weight, [n, H*W, C_in] @ [n, C_in, k]
        w1 = weight_rows(self.conv1.weight.flatten(1), flat).view(n, k, -1)  # [n, k, C_in]
        h = torch.bmm(pixel_rows(x).view(n, hi * wi, -1), w1.transpose(1, 2))  # [n, H*W, k]
        # the samples side by side as n * k channels of one channels-last map: [H*W, n, k] =
        # [1, n * k, H, W]; the 3x3 conv runs on it as a convolution of n groups
        h = h.transpose(0, 1).contiguous().view(1, hi, wi, n * k).permute(0, 3, 1, 2)
        h = F.relu(eval_bn(h, self.bn1, flat), inplace=True)
        kh, kw = conv2.weight.shape[-2:]
        # each sample's k x k kernels: rows [n * k, kh*kw*width] -> [n, k, kh*kw, width] -> its columns
        m = conv_matrix(conv2, flat, None).view(n, k, kh * kw, -1)
        w2 = torch.gather(m, 3, sels[:, None, None, :].expand(n, k, kh * kw, k))  # [n, k, kh*kw, k]
        w2 = w2.view(n * k, kh, kw, k).permute(0, 3, 1, 2)  # [n * k, k, kh, kw], channels-last
        h2 = F.relu(eval_bn(conv2d(h, w2, self.spec.stride, 1, n), self.bn2, flat), inplace=True)  # [1, n * k, H', W']
        ho, wo = h2.shape[-2:]
        # conv3 reads each sample's selected inputs: [n, H'*W', k] @ [n, k, C_out] (rows of the cached transpose)
        w3t = derived_weight(self, "w3_t", self.conv3.weight, _transposed)  # [width, C_out]
        h2 = pixel_rows(h2).view(ho * wo, n, k).transpose(0, 1)  # [H'*W', n * k] -> [n, H'*W', k] view
        y = torch.bmm(h2, weight_rows(w3t, flat).view(n, k, -1))  # [n, H'*W', C_out]
        return eval_bn(y.view(n, ho, wo, -1).permute(0, 3, 1, 2), self.bn3, None)  # [n, C_out, H', W'], channels-last

    def _batching_pays(self, k):
        """Whether the multiply-accumulates one sample skips with ``k`` selected channels pay for
        gathering its own weights (:data:`GATHER_MACS_PER_WEIGHT` each; the rule the CPU work
        model follows, :func:`~dynas.predictors.cpu_paths.batching_pays`)."""
        taps = self.conv2.weight.shape[-1] * self.conv2.weight.shape[-2]
        return batching_pays(self.spec, k, GATHER_MACS_PER_WEIGHT, taps)

    def _tail_cols(self, buf, top_left, sel):
        # the 3x3 conv at M output pixels as one product of their windows' rows, then conv3:
        # buf [n, H_p, W_p, k] -> windows [M, 9k] -> [M, k] -> [M, C_out]
        kh, kw = self.conv2.weight.shape[-2:]
        h2 = row_product(window_rows(buf, top_left, kh, kw), conv_matrix(self.conv2, sel, sel))
        return self._conv3_rows(F.relu(eval_bn(h2, self.bn2, sel), inplace=True), sel)

    def _conv3_rows(self, h2, sel):
        if sel is None:
            return eval_bn(row_product(h2, self.conv3.weight.flatten(1)), self.bn3, None)  # [M, width] -> [M, C_out]
        # conv3 reads the selected inputs: a row gather of its cached transpose, the product's
        # right-hand operand as it is (a column gather of [C_out, width] cost 2-4x a row gather)
        w3t = derived_weight(self, "w3_t", self.conv3.weight, _transposed)  # [width, C_out]
        return eval_bn(torch.mm(h2, w3t.index_select(0, sel)), self.bn3, None)  # [M, |sel|] @ [|sel|, C_out]


class DynamicRegNetYBlock(DynamicBlock, RegNetYBlock):
    """RegNetY block: 1x1 -> grouped 3x3 (stride) -> SE -> 1x1; gated width = block width."""

    _conv2_input_gated = False  # grouped conv: each selected output reads its whole conv group

    def __init__(self, spec: BlockSpec, cfg: StageConfig):
        RegNetYBlock.__init__(self, spec)
        self._init_dynamic(spec, cfg)

    def _shortcut(self, x):
        return x if self.proj is None else self.proj(x)

    def _chain(self):
        return ((1, 1, 0), (3, self.spec.stride, 1))

    def _last_bn(self):
        return self.f.c[1]

    def _dense_terms(self):
        return _pointwise_3x3_pointwise_terms(self.spec, se_flops=2.0 * 2 * self.spec.width * self.spec.se_channels)

    def _masked_body(self, x, cm, sm):
        h = self.f.a(x)  # [N, width, H_in, W_in]
        if cm is not None:
            h = h * cm
        h = self.f.b(h)  # [N, width, H_out, W_out]
        if cm is not None:
            h = h * cm
        if sm is not None:
            h = h * sm  # SE squeezes the masked map
        if "se" in self.f._modules:
            h = self.f.se(h)
        return self.f.c(h)  # [N, C_out, H_out, W_out]

    def _head_rows(self, rows, sel):
        a = self.f.a
        w = a[0].weight.flatten(1)  # [width, C_in, 1, 1] -> [width, C_in]
        return F.relu(
            eval_bn(row_product(rows, weight_rows(w, sel)), a[1], sel), inplace=True
        )  # [M, C_in] -> [M, |sel|]

    def _head_map(self, x, sel):
        a = self.f.a
        return F.relu(eval_bn(F.conv2d(x, conv_rows(a[0], sel)), a[1], sel), inplace=True)

    def _sparse_body(self, x, sel, geom):
        return self._tail(self._head_map(x, sel), sel, geom)

    def _tail(self, h, sel, geom):
        b, c = self.f.b, self.f.c
        h = F.relu(
            eval_bn(gated_conv(h, b[0], sel, self.spec.stride, geom.pad), b[1], sel), inplace=True
        )  # [B, |sel|, h, w]
        if "se" in self.f._modules:
            se = self.f.se
            w1 = se.fc1.weight[:, :, 0, 0]  # [se, width]
            w2 = se.fc2.weight[:, :, 0, 0]  # [width, se]
            b2 = se.fc2.bias
            if sel is not None:
                w1, w2, b2 = w1.index_select(1, sel), w2.index_select(0, sel), b2.index_select(0, sel)
            z = F.relu(F.linear(geom.pool(h), w1, se.fc1.bias))  # [n, |sel|] -> [n, se]
            scale = torch.sigmoid(F.linear(z, w2, b2))  # [n, |sel|]
            h = h.mul_(geom.expand(scale)[:, :, None, None])  # [B, |sel|, 1, 1] broadcast over h, w
        return eval_bn(F.conv2d(h, conv_cols(c[0], sel)), c[1], None)


_KINDS = {"basic": DynamicBasicBlock, "bottleneck": DynamicBottleneck, "regnety": DynamicRegNetYBlock}


def build_block(spec: BlockSpec, cfg: StageConfig) -> DynamicBlock:
    """The dynamic block for ``spec`` under stage choice ``cfg`` (freshly initialised)."""
    if spec.kind not in _KINDS:
        raise ConfigError(f"block kind={spec.kind!r} is unknown; allowed: {', '.join(_KINDS)}")
    return _KINDS[spec.kind](spec, cfg)
