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

__all__ = [
    "eval_bn",
    "is_channels_last",
    "take_samples",
    "zeros_in_layout",
    "pixel_rows",
    "put_pixel_rows",
    "add_pixel_rows",
    "derived_weight",
    "weight_rows",
    "cl_matrix",
    "conv_matrix",
    "conv_weight",
    "conv_rows",
    "conv_cols",
    "flipped_in_matrix",
]


def _stacked_stats(bn: nn.BatchNorm2d) -> torch.Tensor:
    """[4, C]: running mean, running variance, weight, bias of ``bn``, cached on it until one changes."""
    parts = (bn.running_mean, bn.running_var, bn.weight, bn.bias)  # affine BN with running statistics
    cache = bn.__dict__.setdefault("_derived_cache", {})
    key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in parts)
    hit = cache.get("stats")
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            hit = (key, torch.stack([t.detach() for t in parts]))
        cache["stats"] = hit
    return hit[1]


def eval_bn(x: torch.Tensor, bn: nn.BatchNorm2d, sel: torch.Tensor | None) -> torch.Tensor:
    """Eval-mode BN with running statistics, restricted to channels ``sel`` (None: all).

    A selection gathers the four statistics in one row gather of a cached [4, C] stack (four
    separate gathers were four operator calls per BN)."""
    if sel is None:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if bn.weight is None or bn.running_mean is None:
        return F.batch_norm(
            x,
            None if bn.running_mean is None else bn.running_mean[sel],
            None if bn.running_var is None else bn.running_var[sel],
            None if bn.weight is None else bn.weight[sel],
            None if bn.bias is None else bn.bias[sel],
            bn.running_mean is None,
            0.0,
            bn.eps,
        )
    st = _stacked_stats(bn).index_select(1, sel)  # [4, C] -> [4, |sel|]
    return F.batch_norm(x, st[0], st[1], st[2], st[3], False, 0.0, bn.eps)


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


def add_pixel_rows(out: torch.Tensor, pix: torch.Tensor, rows: torch.Tensor) -> None:
    """Add pixel rows ``rows`` [M, C] at distinct flat pixel indices ``pix`` [M] of ``out`` [N, C, H, W]."""
    if is_channels_last(out):
        pixel_rows(out).index_add_(0, pix, rows)  # pixel_rows(out) is a view of out
    else:
        n, c, h, w = out.shape
        # [N, C, H, W] -> [N, C, H*W] view; advanced indices around a slice address [M, C]
        flat = out.view(n, c, h * w)
        flat[pix // (h * w), :, pix % (h * w)] += rows


def derived_weight(
    owner: nn.Module, name: str, w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
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
    return (
        w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()
    )  # [C_out, C_in, kh, kw] -> [C_out, kh, kw, C_in] -> 2-D


def conv_matrix(conv: nn.Conv2d, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """[|rows|, kh * kw * |cols|]: ``conv``'s weight restricted to output channels ``rows`` and
    input channels ``cols`` (None: all), each output's weights in channels-last order.

    A row gather and a column gather of the cached channels-last matrix; viewed as
    [|rows|, kh, kw, |cols|] and permuted it is the channels-last weight (:func:`conv_rows`).
    The column gather of a [C_out, C_in] matrix ran twice as fast here as a row gather of its
    cached transpose followed by the copy back to [C_out, C_in] a convolution needs.
    """
    w = conv.weight
    m = derived_weight(conv, "cl_matrix", w, cl_matrix)  # [C_out, kh * kw * C_in], cached on the conv
    if rows is not None:
        m = m.index_select(0, rows)  # [|rows|, kh * kw * C_in]
    if cols is not None:
        # [|rows| * kh * kw, C_in] -> [|rows| * kh * kw, |cols|] -> [|rows|, kh * kw * |cols|]
        m = m.reshape(-1, w.shape[1]).index_select(1, cols).view(m.shape[0], -1)
    return m


def conv_weight(conv: nn.Conv2d, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s weight [C_out, C_in, kh, kw] restricted to output channels ``rows`` and input
    channels ``cols`` (None: all), channels-last: a view of :func:`conv_matrix`.

    The convolution then gets the layout of its (channels-last) input and copies nothing
    (``index_select`` on the channels-last 4-D weight itself returned a plain layout that the
    convolution converted on every call).
    """
    w = conv.weight
    if rows is None and cols is None:
        return w
    _, cin, kh, kw = w.shape
    m = conv_matrix(conv, rows, cols)  # [|rows|, kh * kw * |cols|]
    return m.view(m.shape[0], kh, kw, -1).permute(0, 3, 1, 2)  # -> [|rows|, kh, kw, |cols|] -> [|rows|, |cols|, kh, kw]


def conv_rows(conv: nn.Conv2d, sel: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s weight restricted to output channels ``sel``, channels-last (:func:`conv_weight`)."""
    return conv_weight(conv, sel, None)


def conv_cols(conv: nn.Conv2d, sel: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s weight restricted to input channels ``sel``, channels-last (:func:`conv_weight`)."""
    return conv_weight(conv, None, sel)


def flipped_in_matrix(w: torch.Tensor) -> torch.Tensor:
    """[C_in, kh * kw * C_out]: per input channel, the kernel flipped in both spatial axes, its
    outputs innermost: the weight of the transposed convolution equal to ``w``'s, channels-last."""
    return (
        w.flip(2, 3).permute(1, 2, 3, 0).reshape(w.shape[1], -1).contiguous()
    )  # [C_out, C_in, kh, kw] -> [C_in, kh, kw, C_out] -> 2-D
