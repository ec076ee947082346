"""Held-out checks of the fast paths: blocks, shapes, granularities, rates, batch sizes, layouts
and gate modes that ``test_kernels.py`` was not written for, drawn at random with fixed seeds,
each fast path forced on in turn; fast == reference within 1e-4."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from dynas.kernels import blocks, build_block, build_model, convs, gather, spatial
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import ArchConfig, StageConfig
from tests.kernel_inputs import randomize_bn

ATOL = RTOL = 1e-4
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "regnety_400mf", "regnety_800mf")
PARADIGMS = ("spatial", "channel", "layer", "spatial+channel", "layer+channel")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _draw_case(rng: random.Random) -> dict:
    """One random block, input size (maybe not square), paradigm, rate, granularities and batch."""
    while True:
        backbone = rng.choice(BACKBONES)
        hw = (rng.randint(33, 97), rng.randint(33, 97))
        spec = rng.choice(get_backbone(backbone, hw).blocks)
        paradigm = rng.choice(PARADIGMS)
        s = rng.choice(_divisors(math.gcd(*spec.out_hw))) if "spatial" in paradigm else None
        gs = [g for g in _divisors(spec.width) if spec.width // g >= 2]
        g = rng.choice(gs) if "channel" in paradigm else None
        if g is None or gs:
            break
    rate = round(rng.uniform(0.05, 1.0), 2)
    cfg = StageConfig(
        paradigm=paradigm,
        rate=rate,
        spatial_granularity=s,
        channel_granularity=g,
        channel_rate=round(rng.uniform(0.1, 1.0), 2) if "+" in paradigm else None,
    )
    return {
        "backbone": backbone,
        "hw": hw,
        "spec": spec,
        "cfg": cfg,
        "batch": rng.choice([1, 2, 3, 5, 8]),
        "layout": rng.choice([torch.channels_last, torch.contiguous_format]),
        "mode": rng.choice(["adaptive", "budget", "random"]),
    }


CASES = [_draw_case(random.Random(1000 + i)) for i in range(40)]


def _fast_and_reference(model, x, seed: int = 7):
    """Both paths on ``x`` with the same random-gate draws."""
    with torch.no_grad():
        torch.manual_seed(seed)
        model.set_path("reference")
        ref = model(x)
        torch.manual_seed(seed)
        model.set_path("fast")
        fast = model(x)
    return fast, ref


def _block(case: dict, seed: int):
    torch.manual_seed(seed)
    blk = build_block(case["spec"], case["cfg"])
    randomize_bn(blk, seed)
    blk = blk.eval().to(memory_format=case["layout"])
    for m in blk.maskers():
        m.set_gate_mode(case["mode"])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case["batch"], case["spec"].in_channels, *case["spec"].in_hw, generator=gen)
    # per-sample offsets: the maskers' pooled inputs differ between samples, and so do their decisions
    x = (x + 2 * torch.randn(case["batch"], case["spec"].in_channels, 1, 1, generator=gen)).contiguous(
        memory_format=case["layout"]
    )
    return blk, x


#: each fast path forced on: (module, constant, value) settings, or a block attribute
FORCED = {
    "default": [],
    "channels batched": [(blocks, "GATHER_MACS_PER_WEIGHT", 0)],
    "channels dense-masked": [(blocks, "GATHER_MACS_PER_WEIGHT", float("inf"))],
    "spatial window rows": [(spatial, "ROWS_MAX_PATCH_PIXELS", 10**9)],
    "spatial windows": [(spatial, "ROWS_MAX_PATCH_PIXELS", 0)],
}


@pytest.mark.parametrize("forced", list(FORCED))
@pytest.mark.parametrize("i", range(len(CASES)))
def test_drawn_block_fast_matches_reference(i, forced, monkeypatch):
    case = CASES[i]
    for mod, name, value in FORCED[forced]:
        monkeypatch.setattr(mod, name, value)
    blk, x = _block(case, seed=i)
    for dense_head in (False, True) if forced.startswith("spatial") and hasattr(blk, "_dense_min_patches") else (None,):
        if dense_head is not None:  # conv1 on gathered rows, then on whole maps
            blk._dense_min_patches = 0 if dense_head else 10**9
        fast, ref = _fast_and_reference(blk, x)
        assert fast.shape == (case["batch"], case["spec"].out_channels, *case["spec"].out_hw)
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


def _draw_batched_case(rng: random.Random) -> dict:
    """A bottleneck block whose samples select different channels (random gates, batch >= 2)."""
    case = _draw_case(rng)
    while (
        case["spec"].kind != "bottleneck" or "channel" not in case["cfg"].paradigm or case["cfg"].channel_density >= 1
    ):
        case = _draw_case(rng)
    return {**case, "batch": rng.choice([2, 3, 4, 7]), "mode": "random"}


BATCHED = [_draw_batched_case(random.Random(3000 + i)) for i in range(12)]


@pytest.mark.parametrize("pays", [True, False])
@pytest.mark.parametrize("i", range(len(BATCHED)))
def test_drawn_batched_selections_match_reference(i, pays, monkeypatch):
    # different selections per sample: one batched pass with per-sample weights, or the masked dense one
    monkeypatch.setattr(blocks, "GATHER_MACS_PER_WEIGHT", 0 if pays else float("inf"))
    blk, x = _block(BATCHED[i], seed=100 + i)
    fast, ref = _fast_and_reference(blk, x)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


def _draw_net(rng: random.Random) -> ArchConfig:
    backbone = rng.choice(BACKBONES)
    hw = (rng.randint(40, 90), rng.randint(40, 90))
    spec = get_backbone(backbone, hw)
    stages = []
    for st in range(spec.num_stages):
        first = next(b for b in spec.blocks if b.stage == st)
        paradigm = rng.choice(PARADIGMS + ("static",))
        if paradigm == "static":
            stages.append(StageConfig())
            continue
        s = rng.choice(_divisors(math.gcd(*first.out_hw))) if "spatial" in paradigm else None
        g = rng.choice([g for g in _divisors(first.width) if first.width // g >= 2]) if "channel" in paradigm else None
        stages.append(
            StageConfig(
                paradigm,
                round(rng.uniform(0.1, 0.9), 2),
                s,
                g,
                round(rng.uniform(0.2, 0.9), 2) if "+" in paradigm else None,
            )
        )
    return ArchConfig(backbone, hw, tuple(stages))


NETS = [_draw_net(random.Random(2000 + i)) for i in range(8)]


@pytest.mark.parametrize("i", range(len(NETS)))
def test_drawn_network_fast_matches_reference(i):
    cfg = NETS[i]
    torch.manual_seed(i)
    model = build_model(cfg).eval()
    randomize_bn(model, i)
    layout = torch.channels_last if i % 2 else torch.contiguous_format
    model = model.to(memory_format=layout)
    x = torch.randn(1 + i % 4, 3, *cfg.input_size).contiguous(memory_format=layout)
    for mode in ("budget", "random"):
        model.set_gate_mode(mode)
        fast, ref = _fast_and_reference(model, x)
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("seed", range(6))
def test_window_rows_is_im2col(seed):
    # the overlapping strided view + row gather gives F.unfold's columns of the chosen pixels
    rng = random.Random(seed)
    n, h, w, c, kh, kw = (
        rng.randint(1, 3),
        rng.randint(3, 11),
        rng.randint(3, 11),
        rng.randint(1, 9),
        rng.choice([1, 3]),
        rng.choice([1, 3, 5]),
    )
    if kh > h or kw > w:
        kw = kh = 1
    buf = torch.randn(n, h, w, c, generator=torch.Generator().manual_seed(seed))
    cols = F.unfold(buf.permute(0, 3, 1, 2), (kh, kw))  # [n, C*kh*kw, L] in (c, i, j) order
    ho, wo = h - kh + 1, w - kw + 1
    pix = torch.randperm(n * ho * wo, generator=torch.Generator().manual_seed(seed))[: rng.randint(1, n * ho * wo)]
    nn_, r, q = pix // (ho * wo), (pix % (ho * wo)) // wo, pix % wo
    got = convs.window_rows(buf, (nn_ * h + r) * w + q, kh, kw)  # [M, kh*kw*C] in (i, j, c) order
    want = cols[nn_, :, r * wo + q].view(-1, c, kh, kw).permute(0, 2, 3, 1).reshape(len(pix), -1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("s,hw", [(1, (3, 4)), (2, (6, 4)), (3, (6, 9)), (2, (4, 4))])
@pytest.mark.parametrize("fraction", [0.5, 0.65, 0.9])
def test_dense_min_patches_by_enumeration(s, hw, fraction):
    # the expected share of needed pixels, counted over every choice of p active patches
    gh, gw = hw[0] // s, hw[1] // s
    chain = ((1, 1, 0), (3, 1, 1))
    axes = (spatial.patch_axis(hw[0], s, gh, chain), spatial.patch_axis(hw[1], s, gw, chain))
    table = spatial.window_table(*axes, gh, gw)  # [G, L*L]
    g, pixels = gh * gw, hw[0] * hw[1]
    want = g + 1
    for p in range(g + 1):
        shares = []
        for on in itertools.combinations(range(g), p):
            hit = torch.zeros(pixels + 1, dtype=torch.bool)
            hit[table[list(on)].flatten()] = True
            shares.append(float(hit[:pixels].float().mean()))
        if sum(shares) / len(shares) >= fraction - 1e-12:
            want = p
            break
    assert spatial.dense_min_patches(table, pixels, fraction) == want


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_add_pixel_rows(layout):
    out = torch.randn(2, 5, 3, 4).contiguous(memory_format=layout)
    want = out.clone()
    pix = torch.tensor([0, 7, 13, 23])
    rows = torch.randn(4, 5)
    for p, r in zip(pix.tolist(), rows):
        want[p // 12, :, (p % 12) // 4, p % 4] += r
    gather.add_pixel_rows(out, pix, rows)
    torch.testing.assert_close(out, want)


def test_selected_bn_statistics_follow_updates():
    # eval_bn gathers a cached stack of the four statistics; changing one must invalidate it
    bn = torch.nn.BatchNorm2d(8).eval()
    x = torch.randn(2, 3, 4, 4)
    sel = torch.tensor([1, 4, 6])
    for _ in range(2):
        want = F.batch_norm(
            x, bn.running_mean[sel], bn.running_var[sel], bn.weight[sel], bn.bias[sel], False, 0.0, bn.eps
        )
        torch.testing.assert_close(gather.eval_bn(x, bn, sel), want)
        with torch.no_grad():
            bn.running_mean.add_(0.5)
            bn.weight.mul_(-1.5)
