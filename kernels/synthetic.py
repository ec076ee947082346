"""A harder built-in data set where depth pays (``--data synthetic-hard[:N]``).

The built-in ``synthetic`` set (one coloured square; the class is its colour) is solved by any
exit: a static ResNet-18 reaches 100 % top-1, so it cannot tell an early exit from a late one.
Here the class is a *combination* of three properties of one target object among clutter:

* shape: square or disc;
* texture: horizontal or vertical stripes;
* position: the target's centre in the top or the bottom half of the image.

That is 8 classes (``label = 4 shape + 2 texture + half``).  Around it lie ``clutter`` (8)
smaller objects of random shape, stripe orientation and colour, drawn first, with stripes as
wide as the target's, so every local feature (an edge, a stripe, a corner, a stripe width) also
occurs in the clutter, which covers more of the image than the target does; the target is told
apart by its size only (5/3 of the clutter's), and its half by where it lies in the whole
image.  Colours are random and carry no class information.  An exit on average-pooled shallow
features mostly counts the clutter's shapes and stripes; telling the target's needs features
of whole objects.

Images are generated from the seed (no download), [n, 3, H, W] floats around 0.
"""

from __future__ import annotations

import torch

from dynas.errors import ConfigError

__all__ = ["HARD_CLASSES", "hard_synthetic_images"]

#: number of classes of :func:`hard_synthetic_images`
HARD_CLASSES = 8


def _draw(
    x: torch.Tensor,
    g: torch.Generator,
    disc: torch.Tensor,
    vertical: torch.Tensor,
    cy: torch.Tensor,
    cx: torch.Tensor,
    radius: int,
    band: int,
    contrast: float,
) -> None:
    """Draw one object per image into ``x`` [n, 3, H, W], in place.

    ``disc``, ``vertical``: [n] bool (shape, stripe orientation); ``cy``, ``cx``: [n] centres;
    stripes ``band`` pixels wide, alternating +colour and -colour.
    """
    n, _, h, w = x.shape
    yy = torch.arange(h).view(1, h, 1)  # [1, H, 1]
    xx = torch.arange(w).view(1, 1, w)  # [1, 1, W]
    dy = yy - cy.view(n, 1, 1)  # [n, H, 1]
    dx = xx - cx.view(n, 1, 1)  # [n, 1, W]
    square = (dy.abs() <= radius) & (dx.abs() <= radius)  # [n, H, W]
    round_ = dy * dy + dx * dx <= radius * radius  # [n, H, W]
    inside = torch.where(disc.view(n, 1, 1), round_, square)  # [n, H, W]
    phase = torch.randint(0, 2 * band, (n, 1, 1), generator=g)  # [n, 1, 1]
    rows = ((yy + phase) // band) % 2 == 0  # [n, H, 1]
    cols = ((xx + phase) // band) % 2 == 0  # [n, 1, W]
    stripe = torch.where(vertical.view(n, 1, 1), cols.expand(n, h, w), rows.expand(n, h, w))  # [n, H, W]
    colour = contrast * (0.4 + 0.6 * torch.rand(n, 3, 1, 1, generator=g))  # [n, 3, 1, 1]
    value = torch.where(stripe[:, None], colour, -colour)  # [n, 3, H, W]
    x.copy_(torch.where(inside[:, None], value, x))


def hard_synthetic_images(
    n: int, size: tuple[int, int], seed: int = 0, *, clutter: int = 8, noise: float = 0.3, contrast: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images [n, 3, H, W] and labels [n] in ``0..7`` (see the module docstring).

    The target's radius is ``min(H, W) // 6`` (its side about a third of the image), the
    clutter's 0.6 times that; every object's stripes are ``radius // 4`` pixels wide; ``noise``
    is the background's standard deviation.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n={n!r} is out of range; allowed: an integer >= 1")
    if isinstance(clutter, bool) or not isinstance(clutter, int) or clutter < 0:
        raise ConfigError(f"clutter={clutter!r} is out of range; allowed: an integer >= 0")
    h, w = size
    if min(h, w) < 24:
        raise ConfigError(f"size={size!r} is too small; allowed: sides >= 24")
    g = torch.Generator().manual_seed(seed)
    x = noise * torch.randn(n, 3, h, w, generator=g)  # background, [n, 3, H, W]
    y = torch.randint(0, HARD_CLASSES, (n,), generator=g)  # [n]
    big = min(h, w) // 6
    small = max(2, round(0.6 * big))
    band = max(1, big // 4)  # one stripe width for every object: texture scale does not tell the target
    for _ in range(clutter):
        disc = torch.rand(n, generator=g) < 0.5  # [n]
        vertical = torch.rand(n, generator=g) < 0.5  # [n]
        cy = torch.randint(small, h - small, (n,), generator=g)  # [n]
        cx = torch.randint(small, w - small, (n,), generator=g)  # [n]
        _draw(x, g, disc, vertical, cy, cx, small, band, contrast)
    half = (y % 2).bool()  # [n] True: bottom half
    top = torch.randint(big, h // 2, (n,), generator=g)  # [n] a centre row in the top half
    cy = torch.where(half, h - 1 - top, top)  # [n] the bottom half's rows mirror the top half's
    cx = torch.randint(big, w - big, (n,), generator=g)  # [n]
    _draw(x, g, (y // 4).bool(), ((y // 2) % 2).bool(), cy, cx, big, band, contrast)
    return x, y
