"""Gathers and scatters the dynamic blocks' fast path is built of (:mod:`dynas.kernels.blocks`).

Samples of a batch, pixel rows of a map, and the selected channels of weights and of BN
statistics, each moved in whichever layout the maps have: when maps are channels-last (the
layout ``dynas bench`` uses) a pixel is one contiguous row of channels, so every gather and
scatter here moves whole rows.  Weight layouts that turn a channel selection into a row gather
are computed once and cached on their module (:func:`derived_weight`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["eval_bn", "is_channels_last", "take_samples", "zeros_in_layout", "pixel_rows", "put_pixel_rows",
           "derived_weight", "weight_rows", "cl_matrix", "conv_rows", "conv_cols", "flipped_in_matrix"]


def eval_bn(x: torch.Tensor, bn: nn.BatchNorm2d, sel: torch.Tensor | None) -> torch.Tensor:
    """Eval-mode BN with running statistics, restricted to channels ``sel`` (None: all)."""
    if sel is None:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.batch_norm(x, bn.running_mean[sel], bn.running_var[sel], bn.weight[sel], bn.bias[sel], False, 0.0, bn.eps)


def is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def take_samples(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Samples ``idx`` of ``x`` [N, C, H, W] -> [n, C, H, W], keeping a channels-last layout."""
    if is_channels_last(x) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)  # gather whole NHWC samples
    return x.index_select(0, idx)


def zeros_in_layout(like: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """Zeros [n, c, h, w] in ``like``'s layout: channels-last when ``like`` is (a 4-D ``new_zeros``
    is NCHW, and every op after it would follow)."""
    if is_channels_last(like):
        return like.new_zeros(n, h, w, c).permute(0, 3, 1, 2)  # [n, h, w, c] -> channels-last [n, c, h, w]
    return like.new_zeros(n, c, h, w)


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N * H * W, C] pixel rows (a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def put_pixel_rows(out: torch.Tensor, pix: torch.Tensor, rows: torch.Tensor) -> None:
    """Write pixel rows ``rows`` [M, C] at flat pixel indices ``pix`` [M] of ``out`` [N, C, H, W]."""
    if is_channels_last(out):
        pixel_rows(out).index_copy_(0, pix, rows)  # pixel_rows(out) is a view of out
    else:
        n, c, h, w = out.shape
        # [N, C, H, W] -> [N, C, H*W] view; advanced indices around a slice address [M, C]
        out.view(n, c, h * w)[pix // (h * w), :, pix % (h * w)] = rows


def derived_weight(owner: nn.Module, name: str, w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
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


def weight_rows(w: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """Weight [C_out, C_in, k, k] restricted to output channels ``sel``."""
    return w if sel is None else w.index_select(0, sel)


def cl_matrix(w: torch.Tensor) -> torch.Tensor:
    """[C_out, kh * kw * C_in]: each output channel's weights in channels-last order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()  # [C_out, C_in, kh, kw] -> [C_out, kh, kw, C_in] -> 2-D


def conv_rows(conv: nn.Conv2d, sel: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s weight [C_out, C_in, kh, kw] restricted to output channels ``sel``, channels-last.

    A row gather of the cached channels-last matrix: the convolution then gets the layout of its
    input and copies nothing (``index_select`` on the channels-last weight itself returned a plain
    layout that the convolution converted on every call).
    """
    w = conv.weight
    if sel is None:
        return w
    _, cin, kh, kw = w.shape
    m = derived_weight(conv, "cl_matrix", w, cl_matrix)  # [C_out, kh * kw * C_in], cached on the conv
    return m.index_select(0, sel).view(-1, kh, kw, cin).permute(0, 3, 1, 2)  # [|sel|, kh*kw*C_in] -> [|sel|, C_in, kh, kw]


def conv_cols(conv: nn.Conv2d, sel: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s weight [C_out, C_in, kh, kw] restricted to input channels ``sel``, channels-last.

    A column gather of the cached channels-last matrix seen as [C_out * kh * kw, C_in] (``index_select``
    along dim 1 of the 4-D channels-last weight first copied all of it to a plain layout).
    """
    w = conv.weight
    if sel is None:
        return w
    cout, cin, kh, kw = w.shape
    m = derived_weight(conv, "cl_matrix", w, cl_matrix).view(cout * kh * kw, cin)  # cached on the conv
    return m.index_select(1, sel).view(cout, kh, kw, -1).permute(0, 3, 1, 2)  # [C_out*kh*kw, |sel|] -> [C_out, |sel|, kh, kw]


def flipped_in_matrix(w: torch.Tensor) -> torch.Tensor:
    """[C_in, kh * kw * C_out]: per input channel, the kernel flipped in both spatial axes, its
    outputs innermost: the weight of the transposed convolution equal to ``w``'s, channels-last."""
    return w.flip(2, 3).permute(1, 2, 3, 0).reshape(w.shape[1], -1).contiguous()  # [C_out, C_in, kh, kw] -> [C_in, kh, kw, C_out] -> 2-D

