"""The spatial fast path of a dynamic block (:mod:`dynas.kernels.blocks`): patches of S x S
output positions, gathered, run through the block's body, and written back.

Geometry first: which region of the block input, and which window of the intermediate map
(conv1's output), each patch of the grid needs (:class:`Axis`, :func:`patch_axis`,
:func:`window_table`), and how a body sees a batch of gathered patches (:class:`Geom`).  Then
:class:`SpatialPatches`, the part of :class:`~dynas.kernels.dynamic.DynamicBlock` that runs
the active patches: blocks whose conv1 is 1x1 run conv1 once per needed pixel
(:meth:`SpatialPatches._spatial_mid`), basic blocks recompute conv1 on input regions that carry
the whole halo (:meth:`SpatialPatches._spatial_regions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dynas.errors import ConfigError
from dynas.kernels.convs import window_rows
from dynas.kernels.gather import add_pixel_rows, pixel_rows, take_samples
from dynas.kernels.maskers import SpatialMasker
from dynas.predictors.cpu_paths import DENSE_HEAD_MIN_FRACTION, ROWS_MAX_PATCH_PIXELS  # shared with the CPU work model
from dynas.spaces.backbones import BlockSpec, conv_out

__all__ = [
    "Axis",
    "patch_axis",
    "window_table",
    "dense_min_patches",
    "Geom",
    "DENSE_POOL",
    "DENSE_HEAD_MIN_FRACTION",
    "ROWS_MAX_PATCH_PIXELS",
    "SpatialPatches",
]


def window_table(ax_h: "Axis", ax_w: "Axis", gh: int, gw: int) -> torch.Tensor:
    """[gh * gw, L_h * L_w] flat intermediate-map pixel of each window position of each patch;
    positions in the zero padding map to H_m * W_m (a dump slot)."""
    hm, wm = ax_h.mid_size, ax_w.mid_size
    r = torch.arange(gh)[:, None] * ax_h.mid_step - ax_h.mid_off + torch.arange(ax_h.mid_len)  # [gh, L_h]
    c = torch.arange(gw)[:, None] * ax_w.mid_step - ax_w.mid_off + torch.arange(ax_w.mid_len)  # [gw, L_w]
    rr = r[:, None, :, None].expand(gh, gw, ax_h.mid_len, ax_w.mid_len)  # [gh, gw, L_h, L_w]
    cc = c[None, :, None, :].expand(gh, gw, ax_h.mid_len, ax_w.mid_len)
    inside = (rr >= 0) & (rr < hm) & (cc >= 0) & (cc < wm)
    return torch.where(inside, rr * wm + cc, hm * wm).reshape(gh * gw, -1)


def dense_min_patches(window_pix: torch.Tensor, mid_pixels: int, fraction: float) -> int:
    """The fewest active patches per sample at which their windows are expected to need at
    least ``fraction`` of the intermediate map's ``mid_pixels`` pixels, the patches chosen
    uniformly at random (patches + 1 where no count is).

    window_pix: [G, L_h * L_w] (:func:`window_table`).  A pixel that ``c`` of the G windows cover
    is needed unless all of them are off: probability 1 - C(G - c, p) / C(G, p) with p active.
    """
    g = window_pix.shape[0]
    cover = torch.bincount(window_pix.flatten(), minlength=mid_pixels + 1)[:mid_pixels].double()  # [H_m * W_m]
    p = torch.arange(g + 1, dtype=torch.float64)  # [G + 1] active patches
    off = torch.ones(mid_pixels, g + 1, dtype=torch.float64)  # P(all c covering windows off), per pixel and p
    for i in range(int(cover.max()) if mid_pixels else 0):
        off = off * torch.where(cover[:, None] > i, ((g - p - i) / (g - i)).clamp(min=0.0), torch.ones_like(p))
    needed = 1.0 - off.mean(dim=0)  # [G + 1] expected fraction of needed pixels
    enough = (needed >= fraction).nonzero().flatten()
    return int(enough[0]) if enough.numel() else g + 1


@dataclass
class Geom:
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


DENSE_POOL = Geom(1, None, lambda t: t.mean(dim=(2, 3)), lambda s: s)


@dataclass(frozen=True)
class Axis:
    """Gather geometry along one axis for patches of side S (see ``patch_axis``)."""

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


def patch_axis(size_in: int, patch: int, grid: int, chain: tuple[tuple[int, int, int], ...]) -> Axis:
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
    return Axis(step, region, pad_lo, pad_hi, patch * s2, p2, mid_len, mid_size)


class SpatialPatches:
    """The spatial gates' part of :class:`~dynas.kernels.dynamic.DynamicBlock` (a mixin of it).

    It uses the block's ``spec``, ``_chain``, ``_sparse_body`` / ``_tail`` / ``_head_rows`` /
    ``_head_map`` / ``_tail_cols`` (the block kind's body on gathered rows) and ``_empty`` /
    ``_writable_shortcut`` (the mixin's).
    """

    spec: BlockSpec
    #: (buf [n, H_p, W_p, k] zero-padded conv1 output, top_left [M] flat pixels of buf, sel) ->
    #: [M, C_out] rows: the rest of the body at M output pixels, or None where the block kind
    #: has no such path (then the 3x3 conv runs on the windows)
    _tail_cols: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def _init_spatial(self, spec: BlockSpec, s: object, rate: float) -> None:
        """Patches of side ``s``: the masker, the gather geometry and its index tables."""
        ho, wo = spec.out_hw
        if not isinstance(s, int) or s < 1 or ho % s or wo % s:
            raise ConfigError(f"spatial_granularity={s!r} does not divide block {spec.name}'s {ho}x{wo} output map")
        self.granularity = s
        self.grid_hw = (ho // s, wo // s)
        self.spatial_masker = SpatialMasker(spec.in_channels, self.grid_hw, rate)
        chain = self._chain()
        self._axes = (
            patch_axis(spec.in_hw[0], s, self.grid_hw[0], chain),
            patch_axis(spec.in_hw[1], s, self.grid_hw[1], chain),
        )
        gh, gw = self.grid_hw
        ax_h, ax_w = self._axes
        wp = ax_w.grid_len(gw)  # width of the zero-padded intermediate buffer (``_spatial_mid``)
        a = torch.arange(s)
        r = (torch.arange(gh)[:, None] * s + a)[:, None, :, None]  # [gh, 1, S, 1] output rows of each patch
        c = (torch.arange(gw)[:, None] * s + a)[None, :, None, :]  # [1, gw, 1, S] output cols
        stride = chain[1][1]
        # per patch g = i * gw + j, [G, S*S] in (row, col) order: the flat output pixel of a sample's
        # map, and the flat top-left pixel of its 3x3 window in the padded buffer (row r * stride)
        self.register_buffer("_patch_out", (r * wo + c).reshape(gh * gw, s * s), persistent=False)
        self.register_buffer("_patch_tl", (r * stride * wp + c * stride).reshape(gh * gw, s * s), persistent=False)
        # [G]: flat top-left pixel of each patch's window in the padded buffer
        self.register_buffer(
            "_window_tl",
            (torch.arange(gh)[:, None] * ax_h.mid_step * wp + torch.arange(gw) * ax_w.mid_step).flatten(),
            persistent=False,
        )
        self.register_buffer("_window_pix", window_table(ax_h, ax_w, gh, gw), persistent=False)
        self._dense_min_patches = dense_min_patches(
            self._window_pix, ax_h.mid_size * ax_w.mid_size, DENSE_HEAD_MIN_FRACTION
        )

    def _spatial_forward(
        self,
        x: torch.Tensor,
        dec: dict[str, torch.Tensor],
        parts: list[tuple[torch.Tensor, torch.Tensor | None]],
        base: torch.Tensor,
    ) -> torch.Tensor:
        """Block output [N, C_out, H_out, W_out]: the active patches of each channel part
        (``parts``: batch indices, selected channels) through the body, plus ``base`` (the
        shortcut), ReLU(shortcut) elsewhere."""
        ho, wo = self.spec.out_hw
        s = self.granularity
        n = x.shape[0]
        ys = []
        padded = None  # the zero-padded input that region reads use, made once for all parts
        for idx, sel in parts:
            whole = idx.numel() == n  # idx is then arange(n): no sample gathers
            active = (dec["spatial"] if whole else dec["spatial"].index_select(0, idx)) > 0.5  # [n_u, gh, gw]
            pn, pg = active.view(idx.numel(), -1).nonzero(as_tuple=True)  # [P] each: local sample, patch (i * gw + j)
            if pn.numel() == 0:
                continue
            if sel is not None and sel.numel() == 0:
                y = pixel_rows(self._empty(pn.numel(), s, s, x))  # [P * S * S, C_out]
            elif self._chain()[0] == (1, 1, 0):
                y = self._spatial_mid(x, idx, pn, pg, sel)
            else:
                if padded is None:
                    padded = self._padded_input(x)
                y = pixel_rows(self._spatial_regions(padded, idx, pn, pg, sel))  # [P, C_out, S, S] -> rows
            nb = pn if whole else idx[pn]  # [P] batch index of each patch
            # pixel rows of the active patches: [P, 1] + [P, S*S] -> [P * S * S], in y's (p, a, b) order
            ys.append((((nb * (ho * wo))[:, None] + self._patch_out.index_select(0, pg)).flatten(), y))
        # shortcut + patch rows, then one ReLU over the map (patches are disjoint: each row is added once)
        out = self._writable_shortcut(base, x)
        for pix, y in ys:
            add_pixel_rows(out, pix, y)
        return out.relu_()

    def _se_geom(self, pn: torch.Tensor, n_u: int, valid: torch.Tensor | None = None) -> Geom:
        """SE squeeze/expand over the P gathered patches of ``n_u`` samples (``pn``: [P] local sample)."""
        inv_area = 1.0 / (self.spec.out_hw[0] * self.spec.out_hw[1])

        def pool(t: torch.Tensor) -> torch.Tensor:
            # [P, C, S, S] -> [P, C] -> per sample [n_u, C]: mean over the whole masked map
            return t.new_zeros(n_u, t.shape[1]).index_add_(0, pn, t.sum(dim=(2, 3))) * inv_area

        return Geom(0, valid, pool, lambda sc: sc.index_select(0, pn))  # expand: [n_u, C] -> [P, C]

    def _padded_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` zero-padded for region reads: [N, C_in, H_in + lo + hi, W_in + lo + hi]."""
        ax_h, ax_w = self._axes
        return F.pad(x, (ax_w.pad_lo, ax_w.pad_hi, ax_h.pad_lo, ax_h.pad_hi))

    def _spatial_regions(
        self, xp: torch.Tensor, idx: torch.Tensor, pn: torch.Tensor, pg: torch.Tensor, sel: torch.Tensor | None
    ) -> torch.Tensor:
        """Active patches [P, C_out, S, S] from regions of the *input* that carry the whole halo.

        Used when conv1 is not a 1x1 stride-1 conv (basic blocks): conv1 runs on each region,
        halo included, so overlapping halos are computed once per patch.  ``xp``: the whole
        batch's input, zero-padded once per block (:meth:`_padded_input`) for every channel part.
        """
        ax_h, ax_w = self._axes
        nb = idx[pn]  # [P] batch index of each patch
        pi, pj = pg // self.grid_hw[1], pg % self.grid_hw[1]  # [P] grid row, grid col
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

    def _spatial_mid(
        self, x: torch.Tensor, idx: torch.Tensor, pn: torch.Tensor, pg: torch.Tensor, sel: torch.Tensor | None
    ) -> torch.Tensor:
        """Rows [P * S * S, C_out] of the active patches (in (patch, row, col) order) for blocks
        whose conv1 is 1x1, stride 1.

        conv1 runs once per needed pixel (the union of the active patches' windows of the 3x3
        conv's input, halo included) on gathered pixel rows, or on the whole maps when that
        union is expected to be most of them (:data:`DENSE_HEAD_MIN_FRACTION`; the table
        ``_dense_min_patches``), into a zero-padded channels-last buffer (zero = the 3x3 conv's
        padding).  The 3x3 conv then reads each active patch's window from it
        (:func:`~dynas.kernels.convs.window_rows`), or, for small patches
        (:data:`ROWS_MAX_PATCH_PIXELS`) where a convolution over many tiny windows runs far
        below its rate, runs as one matrix product of the active output pixels' windows.
        """
        ax_h, ax_w = self._axes
        n_u, whole = idx.numel(), idx.numel() == x.shape[0]
        hm, wm = ax_h.mid_size, ax_w.mid_size  # conv1 output = block input size
        hp, wp = ax_h.grid_len(self.grid_hw[0]), ax_w.grid_len(self.grid_hw[1])
        if pn.numel() >= self._dense_min_patches * n_u:
            # conv1 on every pixel of the samples: no row gather, no scatter
            h = self._head_map(x if whole else take_samples(x, idx), sel)  # [n_u, k, H_m, W_m]
            k = h.shape[1]
            # [n_u, H_m, W_m, k] -> zero-padded [n_u, H_p, W_p, k]
            buf = F.pad(
                h.permute(0, 2, 3, 1),
                (0, 0, ax_w.mid_off, wp - wm - ax_w.mid_off, ax_h.mid_off, hp - hm - ax_h.mid_off),
            )
        else:
            # mark the mid pixels of every active window: slot H_m*W_m of each sample is the dump
            # for window positions in the padding
            need = torch.zeros(n_u, hm * wm + 1, dtype=torch.bool, device=x.device)
            hits = ((pn * (hm * wm + 1))[:, None] + self._window_pix.index_select(0, pg)).flatten()  # [P * L_h * L_w]
            need.view(-1).index_fill_(0, hits, True)
            mn, mflat = need[:, :-1].nonzero(as_tuple=True)  # [M] each: local sample, flat mid pixel
            rows = pixel_rows(x).index_select(0, (mn if whole else idx[mn]) * (hm * wm) + mflat)  # [M, C_in]
            h = self._head_rows(rows, sel)  # [M, k], k = |sel|
            k = h.shape[1]
            # zero-padded channels-last intermediate map [n_u, H_p, W_p, k] as rows [n_u * H_p * W_p, k]
            buf = x.new_zeros(n_u, hp, wp, k)
            buf.view(-1, k).index_copy_(0, (mn * hp + mflat // wm + ax_h.mid_off) * wp + mflat % wm + ax_w.mid_off, h)
        s = self.granularity
        if s * s <= ROWS_MAX_PATCH_PIXELS and self._tail_cols is not None:
            # the 3x3 conv at the active output pixels: [P, 1] + [P, S*S] -> [P * S * S] window top-left pixels
            top_left = ((pn * (hp * wp))[:, None] + self._patch_tl.index_select(0, pg)).flatten()
            return self._tail_cols(buf, top_left, sel)  # [P * S * S, C_out]
        # each active patch's window, [P, L_h * L_w * k] -> [P, L_h, L_w, k] -> [P, k, L_h, L_w] channels-last
        lh, lw = ax_h.mid_len, ax_w.mid_len
        win = window_rows(buf, pn * (hp * wp) + self._window_tl.index_select(0, pg), lh, lw)
        regions = win.view(-1, lh, lw, k).permute(0, 3, 1, 2)
        return pixel_rows(self._tail(regions, sel, self._se_geom(pn, n_u)))  # [P, C_out, S, S] -> [P * S * S, C_out]
