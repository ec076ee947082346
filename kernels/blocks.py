"""Dynamic residual blocks that really skip work, plus a dense-masked reference path.

A dynamic block subclasses the static block of :mod:`dynas.spaces.torch_model` (same module
and parameter names, so a static/torchvision state dict loads) and adds maskers
(``spatial_masker``, ``channel_masker``, ``layer_masker``; see :mod:`dynas.kernels.maskers`).

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
  matrix product on gathered pixel rows; its output is scattered into a zeroed channels-last
  buffer (zero = the 3x3 conv's padding); each active patch's window is a strided view of that
  buffer; the 3x3 conv runs unpadded on the windows and returns exactly the SxS patches; conv3
  runs on the patches; shortcut + patch is written back as pixel rows before the final ReLU.
  Basic blocks (conv1 is a 3x3 conv) gather regions of the *input* that carry the whole halo
  (``(S + 1) * s + 3`` per side) and recompute conv1 on them.  A patch that covers the whole
  map (a 1x1 grid) is a per-sample gate: the body runs on the active samples only.
* **channel**: samples are grouped by identical selections (``torch.unique`` over the mask
  rows); per group, conv1 computes only the selected output channels and conv3 reads only the
  selected inputs, both as products of pixel rows with row-gathered weights (conv3's transpose
  is cached until the weight changes), the 3x3 conv uses the k x k selected kernels in one
  gather, BN uses the selected running statistics.  A basic block's second 3x3 conv reads only
  the selected inputs: on CPU, as the equal transposed convolution, whose flipped kernels are
  cached by input channel so that the selection is a row gather (``_conv_inputs``).  Grouped
  3x3 convs (RegNetY): a gate group need not align with the conv groups, so the conv runs over
  the *touched* conv groups only -- selected channels are scattered into a zero tensor holding
  every channel of the touched groups, the grouped conv runs with ``groups = number of touched
  groups`` and the selected outputs are picked back; when the selection is made of whole conv
  groups no copy happens.
  SE reads/writes only the selected channels.
* **layer**: the body runs only on samples whose gate is on (gathered rows); the others output
  ReLU(shortcut(x)); when every sample runs, the static block's own ops run with no gather.
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
spatial kernel recomputes is not counted, so ``executed <= dense`` where ``dense`` (reported
as ``dense_flops``) is the same sum with every gate on: ``maskers + downsample + conv1 + conv2
+ conv3 + se``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dynas.errors import ConfigError
from dynas.kernels.maskers import ChannelMasker, LayerMasker, Masker, SpatialMasker
from dynas.spaces.backbones import BlockSpec, conv_out
from dynas.spaces.config import PARADIGMS, StageConfig, uses_channel, uses_layer, uses_spatial
from dynas.spaces.torch_model import BasicBlock, Bottleneck, RegNetYBlock

__all__ = [
    "PATHS",
    "DynamicBlock",
    "DynamicBasicBlock",
    "DynamicBottleneck",
    "DynamicRegNetYBlock",
    "build_block",
    "take_samples",
]

#: inference paths
PATHS: tuple[str, ...] = ("fast", "reference")


# ----------------------------------------------------------------------------- helpers


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d, sel: torch.Tensor | None) -> torch.Tensor:
    """Eval-mode BN with running statistics, restricted to channels ``sel`` (None: all)."""
    if sel is None:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.batch_norm(x, bn.running_mean[sel], bn.running_var[sel], bn.weight[sel], bn.bias[sel], False, 0.0, bn.eps)


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def take_samples(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Samples ``idx`` of ``x`` [N, C, H, W] -> [n, C, H, W], keeping a channels-last layout."""
    if _channels_last(x) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)  # gather whole NHWC samples
    return x.index_select(0, idx)


def _zeros(like: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """Zeros [n, c, h, w] in ``like``'s layout: channels-last when ``like`` is (a 4-D ``new_zeros``
    is NCHW, and every op after it would follow)."""
    if _channels_last(like):
        return like.new_zeros(n, h, w, c).permute(0, 3, 1, 2)  # [n, h, w, c] -> channels-last [n, c, h, w]
    return like.new_zeros(n, c, h, w)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N * H * W, C] pixel rows (a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _pixels_put(out: torch.Tensor, pix: torch.Tensor, rows: torch.Tensor) -> None:
    """Write pixel rows ``rows`` [M, C] at flat pixel indices ``pix`` [M] of ``out`` [N, C, H, W]."""
    if _channels_last(out):
        _pixels(out).index_copy_(0, pix, rows)  # _pixels(out) is a view of out
    else:
        n, c, h, w = out.shape
        # [N, C, H, W] -> [N, C, H*W] view; advanced indices around a slice address [M, C]
        out.view(n, c, h * w)[pix // (h * w), :, pix % (h * w)] = rows


def _derived(owner: nn.Module, name: str, w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(w)`` cached on ``owner`` until ``w`` changes (storage, version, device or dtype).

    Used for weight layouts that make a channel selection a cheap row gather; computed outside
    autograd and inference mode so that the cached tensor is usable in any later mode.
    """
    cache = owner.__dict__.setdefault("_derived_cache", {})
    key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            hit = (key, fn(w.detach()))
        cache[name] = hit
    return hit[1]


def _rows(w: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """Weight [C_out, C_in, k, k] restricted to output channels ``sel``."""
    return w if sel is None else w.index_select(0, sel)


def _cl_matrix(w: torch.Tensor) -> torch.Tensor:
    """[C_out, kh * kw * C_in]: each output channel's weights in channels-last order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()  # [C_out, C_in, kh, kw] -> [C_out, kh, kw, C_in] -> 2-D


def _conv_rows(conv: nn.Conv2d, sel: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s weight [C_out, C_in, kh, kw] restricted to output channels ``sel``, channels-last.

    A row gather of the cached channels-last matrix: the convolution then gets the layout of its
    input and copies nothing (``index_select`` on the channels-last weight itself returned a plain
    layout that the convolution converted on every call).
    """
    w = conv.weight
    if sel is None:
        return w
    _, cin, kh, kw = w.shape
    m = _derived(conv, "cl_matrix", w, _cl_matrix)  # [C_out, kh * kw * C_in], cached on the conv
    return m.index_select(0, sel).view(-1, kh, kw, cin).permute(0, 3, 1, 2)  # [|sel|, kh*kw*C_in] -> [|sel|, C_in, kh, kw]


def _conv_cols(conv: nn.Conv2d, sel: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s weight [C_out, C_in, kh, kw] restricted to input channels ``sel``, channels-last.

    A column gather of the cached channels-last matrix seen as [C_out * kh * kw, C_in] (``index_select``
    along dim 1 of the 4-D channels-last weight first copied all of it to a plain layout).
    """
    w = conv.weight
    if sel is None:
        return w
    cout, cin, kh, kw = w.shape
    m = _derived(conv, "cl_matrix", w, _cl_matrix).view(cout * kh * kw, cin)  # cached on the conv
    return m.index_select(1, sel).view(cout, kh, kw, -1).permute(0, 3, 1, 2)  # [C_out*kh*kw, |sel|] -> [C_out, |sel|, kh, kw]


def _flipped_in_matrix(w: torch.Tensor) -> torch.Tensor:
    """[C_in, kh * kw * C_out]: per input channel, the kernel flipped in both spatial axes, its
    outputs innermost: the weight of the transposed convolution equal to ``w``'s, channels-last."""
    return w.flip(2, 3).permute(1, 2, 3, 0).reshape(w.shape[1], -1).contiguous()  # [C_out, C_in, kh, kw] -> [C_in, kh, kw, C_out] -> 2-D


def _conv_inputs(h: torch.Tensor, conv: nn.Conv2d, sel: torch.Tensor | None, pad: int) -> torch.Tensor:
    """``conv`` (stride 1, ungrouped) on ``h`` [B, |sel|, H, W], which holds input channels
    ``sel`` only -> [B, C_out, H', W'].

    Selecting input channels means a column gather of the weight matrix, and a column gather
    reads the whole matrix: 1.8 ms per call for 256 of ResNet-18's 512 channels at batch 1 in a
    network, twice its convolution.  On CPU float32 with channels-last maps the selection is a
    row gather instead: a convolution equals the transposed convolution with the kernel flipped
    and its in / out axes swapped, whose weight [C_in, C_out, kh, kw] is stored by input
    channel (``_flipped_in_matrix``, cached on the conv), so only the selected rows are read.
    Reference: the column gather (``_conv_cols``), used elsewhere and compared in the tests.
    """
    w = conv.weight
    cout, cin, kh, kw = w.shape
    if (sel is None or _TRANSPOSED is None or not _channels_last(h) or not _onednn_ok(h, w) or conv.groups != 1
            or conv.stride != (1, 1) or kh != kw):
        return _conv(h, _conv_cols(conv, sel), 1, pad)
    m = _derived(conv, "flipped_in", w, _flipped_in_matrix)  # [C_in, kh*kw*C_out], cached on the conv
    v = m.index_select(0, sel).view(-1, kh, kw, cout).permute(0, 3, 1, 2)  # [|sel|, kh*kw*C_out] -> [|sel|, C_out, kh, kw] channels-last
    # padding p of the convolution = padding kh - 1 - p of the transposed one (same output size)
    return _TRANSPOSED(h, v, None, [kh - 1 - pad] * 2, [0, 0], [1, 1], [1, 1], 1, "none", [], None)


def _conv(x: torch.Tensor, w: torch.Tensor, stride: int = 1, pad: int = 0, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` without bias; a k x k (k > 1) convolution on CPU float32 always runs in oneDNN.

    PyTorch sends a batch-1, ungrouped convolution whose input has at most 20480 elements to
    its native im2col path (``ConvParams::use_mkldnn``): the 3x3 convolutions of channel-gated
    stages at batch 1 (e.g. 96 of 512 channels on 7x7).  oneDNN ran those 1.2-2x faster here,
    and it is what every static convolution of the same stage uses.
    """
    if w.shape[-1] > 1 and _onednn_ok(x, w):
        return torch.ops.aten.mkldnn_convolution(x, w, None, [pad, pad], [stride, stride], [1, 1], groups)
    return F.conv2d(x, w, None, stride, pad, 1, groups)


def _onednn_ops() -> tuple[bool, Any]:
    """Whether :func:`_conv` may call ``aten.mkldnn_convolution``, and oneDNN's transposed
    convolution (``mkldnn::_convolution_transpose_pointwise``, the op TorchInductor lowers to on
    CPU; None where this build lacks it).

    Both are registered with ``torch.utils.flop_counter`` (it has no formula for them), counted
    as the convolution they compute: for the transposed one, as used here (stride 1), every
    output position reads kh x kw x C_in inputs, where flop_counter's transposed rule would count
    the uncropped output.  Without flop_counter, the kernels keep to ``F.conv2d``.
    """
    if not torch.backends.mkldnn.is_available():
        return False, None
    try:
        from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula
    except ImportError:
        return False, None
    try:
        transposed = torch.ops.mkldnn._convolution_transpose_pointwise
    except (AttributeError, RuntimeError):
        transposed = None
    for op in (torch.ops.aten.mkldnn_convolution, transposed):
        if op is not None and op not in flop_registry:
            @register_flop_formula(op)
            def _flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
                return conv_flop_count(x_shape, w_shape, out_shape)
    return True, None if transposed is None else transposed.default


_ONEDNN, _TRANSPOSED = _onednn_ops()


def _onednn_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x`` and ``w`` go to ``aten.mkldnn_convolution`` directly: CPU float32 and no
    autograd through them (training keeps ``F.conv2d`` / ``F.linear``)."""
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


#: a row product runs as a folded oneDNN convolution (:func:`_row_product`) from this many rows
#: and this many multiply-accumulates; ``dynas.predictors.cpu`` counts work by the same rule
FOLD_MIN_ROWS, FOLD_MIN_MACS = 64, 8_000_000


def _row_product(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows [M, K] times a 1x1 weight [N, K(, 1, 1)] -> [M, N] (``F.linear`` without bias).

    On CPU float32 a large product runs as a oneDNN 1x1 convolution over the rows folded into a
    map [1, K, M / f, f] (f = 8 or 7 columns; the rows are zero-padded to a multiple of 8 when
    neither divides M).  A 1x1 convolution does not care where its pixels sit, and this torch
    build's matrix product (MKL) ran at 100-110 GMAC/s on the 2-core AMD EPYC host against
    210-240 for the folded convolution (``benchmarks/row_product.py``).  Small products keep
    the matrix product: the convolution's fixed cost and its per-call weight re-layout cost more
    than they save there (``FOLD_MIN_ROWS``, ``FOLD_MIN_MACS``, measured with that script).
    """
    m, k = rows.shape
    w2 = w.reshape(w.shape[0], k)  # [N, K]
    if m < FOLD_MIN_ROWS or m * k * w2.shape[0] < FOLD_MIN_MACS or not _onednn_ok(rows, w):
        return F.linear(rows, w2)
    f = 8 if m % 8 == 0 else 7 if m % 7 == 0 else 8
    padded = rows if m % f == 0 else F.pad(rows, (0, 0, 0, -m % f))  # [M', K], M' a multiple of f
    x = padded.contiguous().view(1, -1, f, k).permute(0, 3, 1, 2)  # [M', K] -> NHWC [1, M'/f, f, K] -> NCHW view
    # a [N, K] matrix seen as [N, K, 1, 1] is also channels-last: no copy, oneDNN re-lays it out
    y = torch.ops.aten.mkldnn_convolution(x, w2.contiguous().view(*w2.shape, 1, 1), None, [0, 0], [1, 1], [1, 1], 1)
    return y.permute(0, 2, 3, 1).reshape(-1, w2.shape[0])[:m]  # [1, N, M'/f, f] channels-last -> rows [M', N] -> [M, N]


def _one_pixel(h: torch.Tensor, conv: nn.Conv2d, pad: int) -> bool:
    """Whether ``conv`` (ungrouped, k x k, k > 1) makes one output pixel of each image of ``h``:
    the 3x3 convolution of 1x1 spatial patches, whose windows are exactly the kernel's size."""
    kh, kw = conv.weight.shape[-2:]
    return conv.groups == 1 and pad == 0 and kh * kw > 1 and tuple(h.shape[-2:]) == (kh, kw)


def _one_pixel_conv(h: torch.Tensor, conv: nn.Conv2d, rows: torch.Tensor | None,
                    cols: torch.Tensor | None) -> torch.Tensor:
    """``conv`` on [P, C, kh, kw] windows -> [P, C_out', 1, 1] (C_out' = |rows| or C_out) as one
    matrix product, with input channels ``cols`` (the channels ``h`` holds) or all.

    A window of a channels-last ``h`` is one contiguous row of kh * kw * C values, in the order
    of the cached channels-last weight matrix, so [P, kh*kw*C] @ [kh*kw*C, C_out'] is the
    convolution.  oneDNN runs a convolution with one output column at about 1/4 of its rate
    (``benchmarks/conv_columns.py``); the product runs at the rate of the block's other
    products (1.6-2.2x faster here).
    """
    cin = conv.weight.shape[1]
    m = _derived(conv, "cl_matrix", conv.weight, _cl_matrix)  # [C_out, kh*kw*C_in], cached on the conv
    if rows is not None:
        m = m.index_select(0, rows)  # [|rows|, kh*kw*C_in]
    if cols is not None:
        # [C_out' * kh * kw, C_in] -> selected inputs [C_out' * kh * kw, |cols|] -> [C_out', kh*kw*|cols|]
        m = m.reshape(-1, cin).index_select(1, cols).view(m.shape[0], -1)
    p = h.shape[0]
    y = _row_product(h.permute(0, 2, 3, 1).reshape(p, -1), m)  # [P, kh, kw, C] -> [P, kh*kw*C] -> [P, C_out']
    return y.view(p, 1, 1, -1).permute(0, 3, 1, 2)  # [P, C_out', 1, 1], channels-last strides


def _gated_conv(h: torch.Tensor, conv: nn.Conv2d, sel: torch.Tensor | None, stride: int, pad: int) -> torch.Tensor:
    """``conv`` (width -> width, maybe grouped) on the selected channels only.

    h: [B, |sel|, h, w] holding channels ``sel`` (sorted) -> [B, |sel|, h', w'].
    """
    w = conv.weight
    if sel is None:
        return _conv(h, w, stride, pad, conv.groups)
    if conv.groups == 1:
        return _conv(h, w.index_select(0, sel).index_select(1, sel), stride, pad)
    gw = conv.out_channels // conv.groups  # channels per conv group (in == out for the 3x3 conv)
    touched = torch.unique(sel // gw)  # [q] conv groups with at least one selected channel, sorted
    full_idx = (touched[:, None] * gw + torch.arange(gw, device=sel.device)).flatten()  # [q * gw]
    if full_idx.numel() == sel.numel():
        # the selection is made of whole conv groups: sel == full_idx
        return _conv(h, _conv_rows(conv, sel), stride, pad, touched.numel())
    pos = torch.searchsorted(full_idx, sel)  # [|sel|] position of each selected channel in full_idx
    full = _zeros(h, h.shape[0], full_idx.numel(), h.shape[2], h.shape[3])  # [B, q * gw, h, w], h's layout
    full.index_copy_(1, pos, h)  # unselected members of touched groups stay zero (they are masked in the reference)
    y = _conv(full, _conv_rows(conv, full_idx), stride, pad, touched.numel())  # [B, q * gw, h', w']
    if not _channels_last(y):
        return y.index_select(1, pos)  # [B, |sel|, h', w']
    b, _, ho, wo = y.shape
    # (index_select on dim 1 returns NCHW) pixel rows [B*h'*w', q * gw] -> [B*h'*w', |sel|]
    # -> [B, h', w', |sel|] -> channels-last [B, |sel|, h', w']
    return _pixels(y).index_select(1, pos).view(b, ho, wo, -1).permute(0, 3, 1, 2)


def _window_table(ax_h: "_Axis", ax_w: "_Axis", gh: int, gw: int) -> torch.Tensor:
    """[gh * gw, L_h * L_w] flat intermediate-map pixel of each window position of each patch;
    positions in the zero padding map to H_m * W_m (a dump slot)."""
    hm, wm = ax_h.mid_size, ax_w.mid_size
    r = torch.arange(gh)[:, None] * ax_h.mid_step - ax_h.mid_off + torch.arange(ax_h.mid_len)  # [gh, L_h]
    c = torch.arange(gw)[:, None] * ax_w.mid_step - ax_w.mid_off + torch.arange(ax_w.mid_len)  # [gw, L_w]
    rr = r[:, None, :, None].expand(gh, gw, ax_h.mid_len, ax_w.mid_len)  # [gh, gw, L_h, L_w]
    cc = c[None, :, None, :].expand(gh, gw, ax_h.mid_len, ax_w.mid_len)
    inside = (rr >= 0) & (rr < hm) & (cc >= 0) & (cc < wm)
    return torch.where(inside, rr * wm + cc, hm * wm).reshape(gh * gw, -1)


@dataclass
class _Geom:
    """How a sparse body sees its input.

    ``pad``: padding of the 3x3 convs (1 on whole maps, 0 on gathered regions that carry their
    halo); ``valid``: [P, 1, h_mid, w_mid] 0/1 mask of region positions inside the intermediate
    map (None on whole maps); ``pool``: [B, C, h, w] -> [n, C] SE squeeze per sample;
    ``expand``: [n, C] -> [B, C] SE scale per row of the batch.
    """

    pad: int
    valid: torch.Tensor | None
    pool: Callable[[torch.Tensor], torch.Tensor]
    expand: Callable[[torch.Tensor], torch.Tensor]


_DENSE_POOL = _Geom(1, None, lambda t: t.mean(dim=(2, 3)), lambda s: s)


@dataclass(frozen=True)
class _Axis:
    """Gather geometry along one axis for patches of side S (see ``_axis``)."""

    step: int  # region start of patch i in the padded input = i * step
    region: int  # region length in the input
    pad_lo: int
    pad_hi: int
    mid_step: int  # intermediate (after conv1) start of patch i = i * mid_step - mid_off
    mid_off: int
    mid_len: int
    mid_size: int  # size of the intermediate map along this axis

    def grid_len(self, grid: int) -> int:
        """Length of the zero-padded intermediate map that holds every patch's window."""
        return max(self.mid_off + self.mid_size, (grid - 1) * self.mid_step + self.mid_len)


def _axis(size_in: int, patch: int, grid: int, chain: tuple[tuple[int, int, int], ...]) -> _Axis:
    """Region of the input that patch ``i`` (outputs ``[i*S, i*S+S)``) needs through ``chain``.

    ``chain`` = ((k1, s1, p1), (k2, s2, p2)): conv1 then the conv that yields the block output.
    Through a conv (k, s, p), outputs [a, a + L) need inputs [a*s - p, a*s - p + (L-1)*s + k).
    """
    (k1, s1, p1), (k2, s2, p2) = chain
    mid_len = (patch - 1) * s2 + k2
    region = (mid_len - 1) * s1 + k1
    pad_lo = p2 * s1 + p1  # input start of patch 0 is -pad_lo
    step = patch * s2 * s1
    end = (grid - 1) * step + region  # in padded coordinates
    pad_hi = max(0, end - (size_in + pad_lo))
    mid_size = conv_out(size_in, k1, s1, p1)
    return _Axis(step, region, pad_lo, pad_hi, patch * s2, p2, mid_len, mid_size)


# ----------------------------------------------------------------------------- the mixin


class DynamicBlock:
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
        self.reuse_input = False  # see _relu_shortcut
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # batch size, decisions
        self._last_flops: dict[str, Any] | None = None
        ho, wo = spec.out_hw
        self.spatial_masker: SpatialMasker | None = None
        self.channel_masker: ChannelMasker | None = None
        self.layer_masker: LayerMasker | None = None
        if uses_spatial(cfg.paradigm):
            s = cfg.spatial_granularity
            if not isinstance(s, int) or s < 1 or ho % s or wo % s:
                raise ConfigError(f"spatial_granularity={s!r} does not divide block {spec.name}'s {ho}x{wo} output map")
            self.granularity = s
            self.grid_hw = (ho // s, wo // s)
            self.spatial_masker = SpatialMasker(spec.in_channels, self.grid_hw, cfg.spatial_rate)
            chain = self._chain()
            self._axes = (_axis(spec.in_hw[0], s, self.grid_hw[0], chain), _axis(spec.in_hw[1], s, self.grid_hw[1], chain))
            ho_, wo_ = spec.out_hw
            # flat output pixel offsets of one SxS patch, [S*S] (row-major inside the patch)
            self.register_buffer("_patch_pix", (torch.arange(s)[:, None] * wo_ + torch.arange(s)).flatten(), persistent=False)
            self.register_buffer("_window_pix", _window_table(*self._axes, *self.grid_hw), persistent=False)
        if uses_channel(cfg.paradigm):
            g = cfg.channel_granularity
            if not isinstance(g, int) or g < 1 or spec.width % g or spec.width // g < 2:
                raise ConfigError(f"channel_granularity={g!r} must divide block {spec.name}'s gated width {spec.width} into >= 2 groups")
            self.channel_group = g
            self.channel_masker = ChannelMasker(spec.in_channels, spec.width // g, cfg.channel_density)
        if uses_layer(cfg.paradigm):
            self.layer_masker = LayerMasker(spec.in_channels, cfg.layer_rate)

    # -- subclass hooks ---------------------------------------------------------------

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _masked_body(self, x: torch.Tensor, cm: torch.Tensor | None, sm: torch.Tensor | None) -> torch.Tensor:
        """Dense body with masks applied inside (module BN: batch stats in training)."""
        raise NotImplementedError

    def _sparse_body(self, x: torch.Tensor, sel: torch.Tensor | None, geom: _Geom) -> torch.Tensor:
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
            for key, m in (("spatial", self.spatial_masker), ("channel", self.channel_masker), ("layer", self.layer_masker)):
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

    def _channel_parts(self, samples: torch.Tensor, dec: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Split ``samples`` ([n] batch indices) into groups sharing one channel selection."""
        if samples.numel() == 0:
            return []
        if "channel" not in dec:
            return [(samples, None)]
        on = dec["channel"].index_select(0, samples) > 0.5  # [n, n_groups] bool
        uniq, inverse = torch.unique(on, dim=0, return_inverse=True)  # [u, n_groups], [n]
        g = self.channel_group
        offsets = torch.arange(g, device=samples.device)
        parts = []
        for u in range(uniq.shape[0]):
            idx = samples[inverse == u]  # [n_u] batch indices with this selection
            groups = uniq[u].nonzero().flatten()  # [k] selected groups, sorted
            sel = (groups[:, None] * g + offsets).flatten()  # [k * G] selected channels, sorted
            parts.append((idx, sel))
        return parts

    def _empty(self, rows: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """Body output when no gated channel is selected: the last BN applied to zeros."""
        c_out = self.spec.out_channels
        return _bn(_zeros(like, rows, c_out, h, w), self._last_bn(), None)  # [rows, C_out, h, w]

    def _fast_forward(self, x: torch.Tensor, dec: dict[str, torch.Tensor]) -> torch.Tensor:
        # Compute every body first and write the output last: the output may reuse the shortcut's
        # memory, and every gather reads the unchanged input.
        n = x.shape[0]
        ho, wo = self.spec.out_hw
        samples = torch.arange(n, device=x.device)
        if "layer" in dec:
            samples = (dec["layer"] > 0.5).nonzero().flatten()  # [n_on] samples whose body runs
        spatial = "spatial" in dec
        if spatial and self.grid_hw == (1, 1):
            # one patch covers the whole map: the spatial decision is a per-sample gate
            samples = samples[dec["spatial"][:, 0, 0].index_select(0, samples) > 0.5]
            spatial = False
        parts = self._channel_parts(samples, dec)
        base = self._shortcut(x)  # [N, C_out, H_out, W_out]
        if not spatial:
            if len(parts) == 1 and parts[0][0].numel() == n:
                # every sample runs with one selection: no gather, no scatter
                sel = parts[0][1]
                y = self._empty(n, ho, wo, x) if sel is not None and sel.numel() == 0 else self._sparse_body(x, sel, _DENSE_POOL)
                return y.add_(base).relu_()
            ys = []
            for idx, sel in parts:
                if sel is not None and sel.numel() == 0:
                    y = self._empty(idx.numel(), ho, wo, x)
                else:
                    y = self._sparse_body(take_samples(x, idx), sel, _DENSE_POOL)  # [n_u, C_out, H_out, W_out]
                ys.append((idx, y.add_(take_samples(base, idx)).relu_()))
            out = self._relu_shortcut(base, x)  # samples whose body does not run: ReLU(shortcut)
            for idx, y in ys:
                out.index_copy_(0, idx, y)
            return out
        s = self.granularity
        gh, gw = self.grid_hw
        ys = []
        padded = None  # the zero-padded input that region reads use, made once for all parts
        for idx, sel in parts:
            active = dec["spatial"].index_select(0, idx) > 0.5  # [n_u, gh, gw]
            pn, pi, pj = active.nonzero(as_tuple=True)  # [P] each: local sample, grid row, grid col
            if pn.numel() == 0:
                continue
            if sel is not None and sel.numel() == 0:
                y = self._empty(pn.numel(), s, s, x)  # [P, C_out, S, S]
            elif self._chain()[0] == (1, 1, 0):
                y = self._spatial_mid(x, idx, active, pn, pi, pj, sel)
            else:
                if padded is None:
                    padded = self._padded_input(x)
                y = self._spatial_regions(padded, idx, pn, pi, pj, sel)
            ys.append((idx[pn], pi, pj, y))
        base_pix = _pixels(base)  # [N * H_out * W_out, C_out]; a view when channels-last
        offsets = self._patch_pix  # [S*S]
        writes = []
        for nb, pi, pj, y in ys:
            # pixel rows of the active patches: [P, 1] + [S*S] -> [P * S * S], in y's (p, a, b) order
            pix = (((nb * ho + pi * s) * wo + pj * s)[:, None] + offsets).flatten()
            y_pix = _pixels(y)  # [P, C_out, S, S] -> [P * S * S, C_out]
            writes.append((pix, y_pix.add_(base_pix.index_select(0, pix)).relu_()))
        out = self._relu_shortcut(base, x)  # positions whose body does not run: ReLU(shortcut)
        for pix, y_pix in writes:
            _pixels_put(out, pix, y_pix)  # patches are disjoint: a plain copy
        return out

    def _relu_shortcut(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ReLU(shortcut) as a tensor this block may write.

        In place on the downsample output; for an identity shortcut, in place on the input when
        ``reuse_input`` is set and autograd is off (``DynamicNet`` sets it: its block inputs are
        intermediates nobody else reads), else into new memory of the same layout.
        """
        if base is not x:
            return base.relu_()
        if self.reuse_input and not torch.is_grad_enabled():
            return x.relu_()
        return F.relu(x)

    def _se_geom(self, pn: torch.Tensor, n_u: int, valid: torch.Tensor | None = None) -> _Geom:
        """SE squeeze/expand over the P gathered patches of ``n_u`` samples (``pn``: [P] local sample)."""
        inv_area = 1.0 / (self.spec.out_hw[0] * self.spec.out_hw[1])

        def pool(t: torch.Tensor) -> torch.Tensor:
            # [P, C, S, S] -> [P, C] -> per sample [n_u, C]: mean over the whole masked map
            return t.new_zeros(n_u, t.shape[1]).index_add_(0, pn, t.sum(dim=(2, 3))) * inv_area

        return _Geom(0, valid, pool, lambda sc: sc.index_select(0, pn))  # expand: [n_u, C] -> [P, C]

    def _padded_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` zero-padded for region reads: [N, C_in, H_in + lo + hi, W_in + lo + hi]."""
        ax_h, ax_w = self._axes
        return F.pad(x, (ax_w.pad_lo, ax_w.pad_hi, ax_h.pad_lo, ax_h.pad_hi))

    def _spatial_regions(self, xp: torch.Tensor, idx: torch.Tensor, pn: torch.Tensor, pi: torch.Tensor,
                         pj: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
        """Active patches [P, C_out, S, S] from regions of the *input* that carry the whole halo.

        Used when conv1 is not a 1x1 stride-1 conv (basic blocks): conv1 runs on each region,
        halo included, so overlapping halos are computed once per patch.  ``xp``: the whole
        batch's input, zero-padded once per block (:meth:`_padded_input`) for every channel part.
        """
        ax_h, ax_w = self._axes
        nb = idx[pn]  # [P] batch index of each patch
        rows = (pi * ax_h.step)[:, None] + torch.arange(ax_h.region, device=xp.device)  # [P, R_h]
        cols = (pj * ax_w.step)[:, None] + torch.arange(ax_w.region, device=xp.device)  # [P, R_w]
        # advanced indices around a slice go first: [P, R_h, R_w, C_in] -> [P, C_in, R_h, R_w]
        regions = xp[nb[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        mrow = (pi * ax_h.mid_step - ax_h.mid_off)[:, None] + torch.arange(ax_h.mid_len, device=xp.device)  # [P, M_h]
        mcol = (pj * ax_w.mid_step - ax_w.mid_off)[:, None] + torch.arange(ax_w.mid_len, device=xp.device)  # [P, M_w]
        vr = (mrow >= 0) & (mrow < ax_h.mid_size)
        vc = (mcol >= 0) & (mcol < ax_w.mid_size)
        valid = (vr[:, :, None] & vc[:, None, :])[:, None].to(xp.dtype)  # [P, 1, M_h, M_w]
        return self._sparse_body(regions, sel, self._se_geom(pn, idx.numel(), valid))  # [P, C_out, S, S]

    def _spatial_mid(self, x: torch.Tensor, idx: torch.Tensor, active: torch.Tensor, pn: torch.Tensor,
                     pi: torch.Tensor, pj: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
        """Active patches [P, C_out, S, S] for blocks whose conv1 is 1x1, stride 1.

        conv1 runs once per needed pixel (the union of the active patches' windows of the 3x3
        conv's input, halo included) as a matrix product on gathered pixel rows; its output is
        scattered into a zeroed channels-last buffer (zero = the 3x3 conv's padding), and each
        active patch's window is read from that buffer as a strided view.
        """
        ax_h, ax_w = self._axes
        n_u = idx.numel()
        hm, wm = ax_h.mid_size, ax_w.mid_size  # conv1 output = block input size
        # needed[n, r, c]: some active window covers mid pixel (r, c); windows start at i*step - off
        gw = self.grid_hw[1]
        # mark the mid pixels of every active window: slot H_m*W_m of each sample is the dump
        # for window positions in the padding
        need = torch.zeros(n_u, hm * wm + 1, dtype=torch.bool, device=x.device)
        hits = (pn[:, None] * (hm * wm + 1) + self._window_pix.index_select(0, pi * gw + pj)).flatten()  # [P * L_h * L_w]
        need.view(-1).index_fill_(0, hits, True)
        mn, mflat = need[:, :-1].nonzero(as_tuple=True)  # [M] each: local sample, flat mid pixel
        mr, mc = mflat // wm, mflat % wm
        rows = _pixels(x).index_select(0, idx[mn] * (hm * wm) + mflat)  # [M, C_in]
        h = self._head_rows(rows, sel)  # [M, k], k = |sel|
        k = h.shape[1]
        hp, wp = ax_h.grid_len(self.grid_hw[0]), ax_w.grid_len(self.grid_hw[1])
        # zero-padded channels-last intermediate map [n_u, H_p, W_p, k] as rows [n_u * H_p * W_p, k]
        buf = x.new_zeros(n_u * hp * wp, k)
        buf.index_copy_(0, (mn * hp + mr + ax_h.mid_off) * wp + mc + ax_w.mid_off, h)
        # window (i, j) of sample n starts at row i * step_h, col j * step_w of the padded map:
        # strided view [n_u, gh, gw, L_h, L_w, k]; the active ones -> [P, L_h, L_w, k]
        # -> [P, k, L_h, L_w] with channels-last strides
        gh, gw = self.grid_hw
        win = buf.as_strided((n_u, gh, gw, ax_h.mid_len, ax_w.mid_len, k),
                             (hp * wp * k, ax_h.mid_step * wp * k, ax_w.mid_step * k, wp * k, k, 1))
        regions = win[pn, pi, pj].permute(0, 3, 1, 2)
        return self._tail(regions, sel, self._se_geom(pn, n_u))  # [P, C_out, S, S]

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


# ----------------------------------------------------------------------------- block kinds


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
        h = F.relu(_bn(_conv(x, _conv_rows(self.conv1, sel), self.spec.stride, geom.pad), self.bn1, sel), inplace=True)
        if geom.valid is not None:
            h = h.mul_(geom.valid)  # [P, |sel|, S+2, S+2]: zero where conv2 sees padding
        if _one_pixel(h, self.conv2, geom.pad):  # 1x1 patches: [P, |sel|, 3, 3] -> [P, C_out, 1, 1]
            return _bn(_one_pixel_conv(h, self.conv2, None, sel), self.bn2, None)
        return _bn(_conv_inputs(h, self.conv2, sel, geom.pad), self.bn2, None)


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
        return F.relu(_bn(_row_product(rows, _rows(w, sel)), self.bn1, sel), inplace=True)  # [M, C_in] -> [M, |sel|]

    def _sparse_body(self, x, sel, geom):
        if sel is None:
            h = F.relu(_bn(F.conv2d(x, self.conv1.weight), self.bn1, None), inplace=True)
        else:
            # 1x1 conv on the selected outputs as a product of pixel rows (no weight reformatting)
            b, _, hi, wi = x.shape
            h = self._head_rows(_pixels(x), sel)  # [B * H * W, |sel|]
            h = h.view(b, hi, wi, -1).permute(0, 3, 1, 2)  # -> [B, |sel|, H, W], channels-last strides
        return self._tail(h, sel, geom)

    def _tail(self, h, sel, geom):
        if sel is None and geom.pad == 1:  # whole maps, every channel: the static block's own ops
            h = F.relu(_bn(F.conv2d(h, self.conv2.weight, None, self.spec.stride, geom.pad), self.bn2, None), inplace=True)
            return _bn(F.conv2d(h, self.conv3.weight), self.bn3, None)
        if _one_pixel(h, self.conv2, geom.pad):  # 1x1 patches: [P, k, 3, 3] windows -> [P, k, 1, 1]
            h2 = _one_pixel_conv(h, self.conv2, sel, sel)
        elif sel is None:
            h2 = _conv(h, self.conv2.weight, self.spec.stride, geom.pad)
        elif self.conv2.groups == 1:
            w2 = _derived(self, "w2_flat", self.conv2.weight, lambda w: w.reshape(w.shape[0] * w.shape[1], -1).contiguous())
            k, width = sel.numel(), self.conv2.weight.shape[0]
            # one gather of the k x k selected kernels: rows (o * width + i) of [width * width, kh * kw]
            w2 = w2.index_select(0, (sel[:, None] * width + sel).flatten()).view(k, k, *self.conv2.weight.shape[2:])
            h2 = _conv(h, w2.contiguous(memory_format=torch.channels_last) if _channels_last(h) else w2,
                       self.spec.stride, geom.pad)
        else:
            h2 = _gated_conv(h, self.conv2, sel, self.spec.stride, geom.pad)
        h2 = F.relu(_bn(h2, self.bn2, sel), inplace=True)  # [B, |sel|, H', W']
        b, _, ho, wo = h2.shape
        # conv3 reads the selected inputs: rows of the cached [width, C_out] transpose (copied back
        # to [C_out, |sel|] when the product is folded into a convolution)
        w3 = self.conv3.weight
        if sel is not None:
            w3t = _derived(self, "w3_t", w3, lambda w: w.flatten(1).t().contiguous())  # [width, C_out]
            w3 = _rows(w3t, sel).t()  # [|sel|, C_out] -> [C_out, |sel|] view
        y = _bn(_row_product(_pixels(h2), w3), self.bn3, None)  # [B * H' * W', C_out]
        return y.view(b, ho, wo, -1).permute(0, 3, 1, 2)  # [B, C_out, H', W'], channels-last strides


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
        return F.relu(_bn(_row_product(rows, _rows(w, sel)), a[1], sel), inplace=True)  # [M, C_in] -> [M, |sel|]

    def _sparse_body(self, x, sel, geom):
        a = self.f.a
        h = F.relu(_bn(F.conv2d(x, _conv_rows(a[0], sel)), a[1], sel), inplace=True)
        return self._tail(h, sel, geom)

    def _tail(self, h, sel, geom):
        b, c = self.f.b, self.f.c
        h = F.relu(_bn(_gated_conv(h, b[0], sel, self.spec.stride, geom.pad), b[1], sel), inplace=True)  # [B, |sel|, h, w]
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
        return _bn(F.conv2d(h, _conv_cols(c[0], sel)), c[1], None)


_KINDS = {"basic": DynamicBasicBlock, "bottleneck": DynamicBottleneck, "regnety": DynamicRegNetYBlock}


def build_block(spec: BlockSpec, cfg: StageConfig) -> DynamicBlock:
    """The dynamic block for ``spec`` under stage choice ``cfg`` (freshly initialised)."""
    if spec.kind not in _KINDS:
        raise ConfigError(f"block kind={spec.kind!r} is unknown; allowed: {', '.join(_KINDS)}")
    return _KINDS[spec.kind](spec, cfg)
