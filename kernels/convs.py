"""Convolutions and matrix products of the dynamic blocks' fast path (:mod:`dynas.kernels.blocks`).

How each product is dispatched on CPU float32 so that it runs at the rate of the static
network's own convolutions: k x k convolutions go to oneDNN directly (:func:`conv2d`), large
products of pixel rows run as a folded 1x1 convolution (:func:`row_product`), the 3x3
convolution of 1x1 spatial patches as one matrix product (:func:`one_pixel_conv`), a
convolution that reads selected input channels as the equal transposed convolution
(:func:`conv_inputs`), a grouped convolution over the conv groups a channel selection touches
(:func:`gated_conv`).  The blocks' reference path (dense ``F.conv2d`` times the masks) is what
the tests compare them with.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynas.kernels.gather import (
    conv_cols,
    conv_matrix,
    conv_rows,
    derived_weight,
    flipped_in_matrix,
    is_channels_last,
    pixel_rows,
    zeros_in_layout,
)
from dynas.predictors.cpu_paths import FOLD_MIN_MACS, FOLD_MIN_ROWS  # the CPU work model follows the same rule

__all__ = [
    "conv2d",
    "onednn_ok",
    "ONEDNN",
    "TRANSPOSED_CONV",
    "FOLD_MIN_ROWS",
    "FOLD_MIN_MACS",
    "row_product",
    "conv_inputs",
    "is_one_pixel",
    "one_pixel_conv",
    "window_rows",
    "gated_conv",
]


def conv2d(x: torch.Tensor, w: torch.Tensor, stride: int = 1, pad: int = 0, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` without bias; a k x k (k > 1) convolution on CPU float32 always runs in oneDNN.

    PyTorch sends a batch-1, ungrouped convolution whose input has at most 20480 elements to
    its native im2col path (``ConvParams::use_mkldnn``): the 3x3 convolutions of channel-gated
    stages at batch 1 (e.g. 96 of 512 channels on 7x7).  oneDNN ran those 1.2-2x faster here,
    and it is what every static convolution of the same stage uses.
    """
    if w.shape[-1] > 1 and onednn_ok(x, w):
        return torch.ops.aten.mkldnn_convolution(x, w, None, [pad, pad], [stride, stride], [1, 1], groups)
    return F.conv2d(x, w, None, stride, pad, 1, groups)


def _onednn_ops() -> tuple[bool, Any]:
    """Whether :func:`conv2d` may call ``aten.mkldnn_convolution``, and oneDNN's transposed
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


ONEDNN, TRANSPOSED_CONV = _onednn_ops()


def onednn_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x`` and ``w`` go to ``aten.mkldnn_convolution`` directly: CPU float32 and no
    autograd through them (training keeps ``F.conv2d`` / ``F.linear``)."""
    return (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def row_product(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows [M, K] times a 1x1 weight [N, K(, 1, 1)] -> [M, N] (``F.linear`` without bias).

    On CPU float32 a large product runs as a oneDNN 1x1 convolution over the rows folded into a
    map [1, K, M / f, f] (f = 8 or 7 columns; the rows are zero-padded to a multiple of 8 when
    neither divides M).  A 1x1 convolution does not care where its pixels sit; which of the two
    runs faster depends on the host (``benchmarks/row_product.py`` times both): on one 2-core AMD
    EPYC VM the folded convolution ran 2x faster than this torch build's matrix product (MKL)
    from 64 rows, on another (AVX2, Dec 7) MKL ran 1.0-2x faster below ~1,600 rows and the two
    were even from ~6,000.  ``FOLD_MIN_ROWS`` and ``FOLD_MIN_MACS`` hold the current host's rule.
    """
    m, k = rows.shape
    w2 = w.reshape(w.shape[0], k)  # [N, K]
    if m < FOLD_MIN_ROWS or m * k * w2.shape[0] < FOLD_MIN_MACS or not onednn_ok(rows, w):
        return F.linear(rows, w2)
    f = 8 if m % 8 == 0 else 7 if m % 7 == 0 else 8
    padded = rows if m % f == 0 else F.pad(rows, (0, 0, 0, -m % f))  # [M', K], M' a multiple of f
    x = padded.contiguous().view(1, -1, f, k).permute(0, 3, 1, 2)  # [M', K] -> NHWC [1, M'/f, f, K] -> NCHW view
    # a [N, K] matrix seen as [N, K, 1, 1] is also channels-last: no copy, oneDNN re-lays it out
    y = torch.ops.aten.mkldnn_convolution(x, w2.contiguous().view(*w2.shape, 1, 1), None, [0, 0], [1, 1], [1, 1], 1)
    return y.permute(0, 2, 3, 1).reshape(-1, w2.shape[0])[:m]  # [1, N, M'/f, f] channels-last -> rows [M', N] -> [M, N]


def is_one_pixel(h: torch.Tensor, conv: nn.Conv2d, pad: int) -> bool:
    """Whether ``conv`` (ungrouped, k x k, k > 1) makes one output pixel of each image of ``h``:
    the 3x3 convolution of 1x1 spatial patches, whose windows are exactly the kernel's size."""
    kh, kw = conv.weight.shape[-2:]
    return conv.groups == 1 and pad == 0 and kh * kw > 1 and tuple(h.shape[-2:]) == (kh, kw)


def one_pixel_conv(
    h: torch.Tensor, conv: nn.Conv2d, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> torch.Tensor:
    """``conv`` on [P, C, kh, kw] windows -> [P, C_out', 1, 1] (C_out' = |rows| or C_out) as one
    matrix product, with input channels ``cols`` (the channels ``h`` holds) or all.

    A window of a channels-last ``h`` is one contiguous row of kh * kw * C values, in the order
    of the cached channels-last weight matrix, so [P, kh*kw*C] @ [kh*kw*C, C_out'] is the
    convolution.  oneDNN runs a convolution with one output column at about 1/4 of its rate
    (``benchmarks/conv_columns.py``); the product runs at the rate of the block's other
    products (1.6-2.2x faster here).
    """
    m = conv_matrix(conv, rows, cols)  # [C_out', kh*kw*C]
    p = h.shape[0]
    y = row_product(h.permute(0, 2, 3, 1).reshape(p, -1), m)  # [P, kh, kw, C] -> [P, kh*kw*C] -> [P, C_out']
    return y.view(p, 1, 1, -1).permute(0, 3, 1, 2)  # [P, C_out', 1, 1], channels-last strides


def window_rows(buf: torch.Tensor, top_left: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The kh x kw windows of a channels-last map as matrix rows (im2col of chosen output pixels).

    buf: [N, H, W, C] contiguous (a zero-padded map); top_left: [M] flat pixel index (over
    N * H * W) of each window's top-left pixel, every window inside its sample's map
    -> [M, kh * kw * C], each row in the order of :func:`~dynas.kernels.gather.conv_matrix`.
    A window is kh runs of kw * C contiguous values, so the map seen as [T, kh, kw * C] with
    strides (C, W * C, 1) (T = N * H * W - (kh - 1) * W - (kw - 1): the last top-left pixel
    whose window stays inside the buffer) is every window at once, and one row gather copies
    the chosen ones.  A convolution at M output pixels is then one matrix product of these rows.
    """
    buf = buf.contiguous()
    n, h, w, c = buf.shape
    t = n * h * w - (kh - 1) * w - (kw - 1)
    windows = buf.as_strided((t, kh, kw * c), (c, w * c, 1))  # [T, kh, kw * C] overlapping view of buf
    return windows.index_select(0, top_left).view(top_left.numel(), -1)  # [M, kh, kw * C] -> [M, kh * kw * C]


def gated_conv(h: torch.Tensor, conv: nn.Conv2d, sel: torch.Tensor | None, stride: int, pad: int) -> torch.Tensor:
    """``conv`` (width -> width, maybe grouped) on the selected channels only.

    h: [B, |sel|, h, w] holding channels ``sel`` (sorted) -> [B, |sel|, h', w'].
    """
    w = conv.weight
    if sel is None:
        return conv2d(h, w, stride, pad, conv.groups)
    if conv.groups == 1:
        return conv2d(h, w.index_select(0, sel).index_select(1, sel), stride, pad)
    gw = conv.out_channels // conv.groups  # channels per conv group (in == out for the 3x3 conv)
    touched = torch.unique(sel // gw)  # [q] conv groups with at least one selected channel, sorted
    full_idx = (touched[:, None] * gw + torch.arange(gw, device=sel.device)).flatten()  # [q * gw]
    if full_idx.numel() == sel.numel():
        # the selection is made of whole conv groups: sel == full_idx
        return conv2d(h, conv_rows(conv, sel), stride, pad, touched.numel())
    pos = torch.searchsorted(full_idx, sel)  # [|sel|] position of each selected channel in full_idx
    full = zeros_in_layout(h, h.shape[0], full_idx.numel(), h.shape[2], h.shape[3])  # [B, q * gw, h, w], h's layout
    full.index_copy_(1, pos, h)  # unselected members of touched groups stay zero (they are masked in the reference)
    y = conv2d(full, conv_rows(conv, full_idx), stride, pad, touched.numel())  # [B, q * gw, h', w']
    if not is_channels_last(y):
        return y.index_select(1, pos)  # [B, |sel|, h', w']
    b, _, ho, wo = y.shape
    # (index_select on dim 1 returns NCHW) pixel rows [B*h'*w', q * gw] -> [B*h'*w', |sel|]
    # -> [B, h', w', |sel|] -> channels-last [B, |sel|, h', w']
    return pixel_rows(y).index_select(1, pos).view(b, ho, wo, -1).permute(0, 3, 1, 2)


def conv_inputs(h: torch.Tensor, conv: nn.Conv2d, sel: torch.Tensor | None, pad: int) -> torch.Tensor:
    """``conv`` (stride 1, ungrouped) on ``h`` [B, |sel|, H, W], which holds input channels
    ``sel`` only -> [B, C_out, H', W'].

    Selecting input channels means a column gather of the weight matrix, and a column gather
    reads the whole matrix: 1.8 ms per call for 256 of ResNet-18's 512 channels at batch 1 in a
    network, twice its convolution.  On CPU float32 with channels-last maps the selection is a
    row gather instead: a convolution equals the transposed convolution with the kernel flipped
    and its in / out axes swapped, whose weight [C_in, C_out, kh, kw] is stored by input
    channel (``flipped_in_matrix``, cached on the conv), so only the selected rows are read.
    Reference: the column gather (``conv_cols``), used elsewhere and compared in the tests.
    """
    w = conv.weight
    cout, cin, kh, kw = w.shape
    if (
        sel is None
        or TRANSPOSED_CONV is None
        or not is_channels_last(h)
        or not onednn_ok(h, w)
        or conv.groups != 1
        or conv.stride != (1, 1)
        or kh != kw
    ):
        return conv2d(h, conv_cols(conv, sel), 1, pad)
    m = derived_weight(conv, "flipped_in", w, flipped_in_matrix)  # [C_in, kh*kw*C_out], cached on the conv
    v = (
        m.index_select(0, sel).view(-1, kh, kw, cout).permute(0, 3, 1, 2)
    )  # [|sel|, kh*kw*C_out] -> [|sel|, C_out, kh, kw] channels-last
    # padding p of the convolution = padding kh - 1 - p of the transposed one (same output size)
    return TRANSPOSED_CONV(h, v, None, [kh - 1 - pad] * 2, [0, 0], [1, 1], [1, 1], 1, "none", [], None)
