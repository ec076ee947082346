"""Dynamic kernels: fast (skipping) path == dense-masked reference, budgets, FLOPs, weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dynas.errors import ConfigError
from dynas.kernels import (
    blocks,
    budget_count,
    build_block,
    build_model,
    convs,
)
from dynas.spaces.config import ArchConfig, StageConfig
from dynas.spaces.torch_model import BasicBlock, Bottleneck, RegNetYBlock
from tests.kernel_inputs import (
    ATOL,
    BLOCKS,
    DEVICES,
    DYNAMIC,
    RTOL,
    block_spec,
    both_paths,
    make_block,
    randomize_bn,
    set_gate_mode,
    stage_choice,
)

# ----------------------------------------------------------------------------- fast == reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("gi", [0, 1])
@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("paradigm", DYNAMIC)
@pytest.mark.parametrize("key", list(BLOCKS), ids=lambda k: f"{k[0]}-s{k[1]}b{k[2]}")
def test_fast_matches_reference(key, paradigm, rate, gi, batch, device):
    spec, blk = make_block(key, paradigm, rate, gi, device)
    x = torch.randn(batch, spec.in_channels, *spec.in_hw, generator=torch.Generator().manual_seed(2)).to(device)
    for mode in ("adaptive", "budget"):
        set_gate_mode(blk, mode)
        fast, ref, ref_flops = both_paths(blk, x)
        assert fast.shape == (batch, spec.out_channels, *spec.out_hw)
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)
        # the two paths took the same decisions
        for k, v in ref_flops["rates"].items():
            torch.testing.assert_close(blk.last_flops["rates"][k], v)


@pytest.mark.parametrize("paradigm", ["spatial", "spatial+channel"])
@pytest.mark.parametrize(
    "key",
    [("resnet18", 1, 0), ("resnet18", 3, 1), ("resnet50", 2, 0), ("resnet50", 1, 1)],
    ids=lambda k: f"{k[0]}-s{k[1]}b{k[2]}",
)
def test_one_pixel_patches_run_conv2_as_one_matrix_product(key, paradigm, monkeypatch):
    # 1x1 patches: the 3x3 conv sees windows of exactly its size and runs as [P, 9C] @ [9C, C_out]
    # (basic blocks: windows gathered as [P, C, 3, 3]; bottlenecks: window rows of conv1's buffer)
    spec = block_spec(*key)
    blk = build_block(spec, stage_choice(paradigm, 0.5, 1, spec.width // 8))
    torch.manual_seed(1)
    randomize_bn(blk)
    blk.eval()
    set_gate_mode(blk, "budget")
    calls = []
    real, real_rows = blocks.one_pixel_conv, blocks.window_rows
    monkeypatch.setattr(blocks, "one_pixel_conv", lambda *a: calls.append(tuple(a[0].shape[-2:])) or real(*a))
    monkeypatch.setattr(
        blocks, "window_rows", lambda buf, tl, kh, kw: calls.append((kh, kw)) or real_rows(buf, tl, kh, kw)
    )
    # (a bottleneck batch whose samples select different channels runs its dense convolutions, masked)
    batch = 1 if paradigm == "spatial+channel" and spec.kind == "bottleneck" else 3
    x = torch.randn(batch, spec.in_channels, *spec.in_hw, generator=torch.Generator().manual_seed(2))
    fast, ref, _ = both_paths(blk, x)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)
    assert calls and all(c == (3, 3) for c in calls)  # 3x3 windows, one product each


@pytest.mark.parametrize("paradigm", DYNAMIC)
@pytest.mark.parametrize("key", list(BLOCKS), ids=lambda k: f"{k[0]}-s{k[1]}b{k[2]}")
def test_different_decisions_per_sample(key, paradigm):
    # budget mode at 0.5 with random inputs: samples pick different patches / channel groups
    spec, blk = make_block(key, paradigm, 0.5, 1)
    set_gate_mode(blk, "budget")
    gen = torch.Generator().manual_seed(3)
    # per-sample channel offsets make the pooled masker inputs differ between samples
    x = torch.randn(6, spec.in_channels, *spec.in_hw, generator=gen) + 3 * torch.randn(
        6, spec.in_channels, 1, 1, generator=gen
    )
    dec = blk.decide(x)
    if "layer" not in dec:
        primary = dec["spatial"] if "spatial" in dec else dec["channel"]
        flat = primary.reshape(6, -1)
        if flat.shape[1] > 2:
            assert len({tuple(r.tolist()) for r in flat}) > 1
    fast, ref, _ = both_paths(blk, x)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("paradigm", DYNAMIC)
@pytest.mark.parametrize("key", list(BLOCKS), ids=lambda k: f"{k[0]}-s{k[1]}b{k[2]}")
def test_all_gates_on_is_the_static_block(key, paradigm):
    spec, blk = make_block(key, paradigm, 0.5, 1)
    static = {"basic": BasicBlock, "bottleneck": Bottleneck, "regnety": RegNetYBlock}[spec.kind](spec).eval()
    static.load_state_dict(blk.state_dict(), strict=False)
    for m in blk.maskers():
        m.set_force("on")
    x = torch.randn(3, spec.in_channels, *spec.in_hw)
    fast, ref, _ = both_paths(blk, x)
    with torch.no_grad():
        dense = static(x)
    torch.testing.assert_close(fast, dense, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ref, dense, atol=ATOL, rtol=RTOL)
    flops = blk.last_flops
    torch.testing.assert_close(flops["executed_flops"], torch.full((3,), flops["dense_flops"]))


@pytest.mark.parametrize("paradigm", DYNAMIC)
@pytest.mark.parametrize("key", list(BLOCKS), ids=lambda k: f"{k[0]}-s{k[1]}b{k[2]}")
def test_all_gates_off(key, paradigm):
    spec, blk = make_block(key, paradigm, 0.5, 0)
    for m in blk.maskers():
        m.set_force("off")
    x = torch.randn(2, spec.in_channels, *spec.in_hw)
    fast, ref, _ = both_paths(blk, x)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)
    if paradigm != "channel":
        # nothing of the body is added: ReLU(shortcut)
        with torch.no_grad():
            expected = torch.relu(blk._shortcut(x))
        torch.testing.assert_close(fast, expected, atol=ATOL, rtol=RTOL)
    flops = blk.last_flops
    assert torch.all(flops["executed_flops"] >= flops["masker_flops"])
    assert torch.all(flops["executed_flops"] < flops["dense_flops"])


def test_regnety_channel_aligned_and_unaligned_groups():
    # G=8 equals the conv group width (no zero-fill), G=4 and G=12 split / straddle conv groups
    spec = block_spec("regnety_400mf", 1, 1)  # 104 wide, 13 conv groups of 8, identity shortcut
    x = torch.randn(4, spec.in_channels, *spec.in_hw)
    for g in (4, 8, 52):
        blk = build_block(spec, StageConfig("channel", 0.3, channel_granularity=g))
        randomize_bn(blk)
        blk.eval()
        set_gate_mode(blk, "budget")
        fast, ref, _ = both_paths(blk, x)
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("g", [4, 8, 13])
def test_grouped_channel_selection_keeps_channels_last(g):
    # Unaligned selections are zero-filled into their touched conv groups; a 4-D ``new_zeros`` is
    # NCHW, and the grouped conv and every later op of the block then ran NCHW (1.1-1.4x slower).
    spec = block_spec("regnety_400mf", 1, 1)  # 104 wide, 13 conv groups of 8
    blk = build_block(spec, StageConfig("channel", 0.4, channel_granularity=g))
    randomize_bn(blk)
    blk = blk.eval().to(memory_format=torch.channels_last)
    conv = blk.f.b[0]
    sel = torch.arange(0, spec.width, 3)  # every third channel: straddles conv groups
    h = torch.randn(2, spec.width, *spec.in_hw)[:, sel].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = convs.gated_conv(h, conv, sel, 1, 1)  # [2, |sel|, H, W]
        full = torch.zeros(2, spec.width, *spec.in_hw)
        full[:, sel] = h
        ref = F.conv2d(full, conv.weight, None, 1, 1, 1, conv.groups)[:, sel]
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=RTOL)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # and the whole block keeps the layout on that path
    set_gate_mode(blk, "budget")
    x = torch.randn(2, spec.in_channels, *spec.in_hw).contiguous(memory_format=torch.channels_last)
    fast, ref_out, _ = both_paths(blk, x)
    torch.testing.assert_close(fast, ref_out, atol=ATOL, rtol=RTOL)
    assert fast.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- budget, training, FLOPs


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("paradigm", DYNAMIC)
def test_budget_mode_exact_counts(paradigm, rate):
    spec, blk = make_block(("resnet50", 1, 1), paradigm, rate, 0)
    set_gate_mode(blk, "budget")
    n = 5
    with torch.no_grad():
        dec = blk.decide(torch.randn(n, spec.in_channels, *spec.in_hw))
    if "spatial" in dec:
        per = dec["spatial"].reshape(n, -1).sum(1)
        assert per.tolist() == [budget_count(rate, 81)] * n
    if "channel" in dec:
        per = dec["channel"].sum(1)
        assert per.tolist() == [budget_count(rate, blk.channel_masker.n_decisions)] * n
    if "layer" in dec:
        # a block on its own is a stage of one block: budget_count(rate, 1) = 1 run per sample
        assert dec["layer"].tolist() == [1.0] * n
    assert set(torch.cat([v.flatten() for v in dec.values()]).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("paradigm", ["layer", "layer+channel"])
def test_layer_budget_is_per_sample_over_the_stage(paradigm, rate, batch):
    # resnet50 stage 2 has 6 blocks: in budget mode every sample runs exactly budget_count(rate, 6)
    # of them, at any batch size (batch 1 included), and the fast path still matches the reference
    cfg = ArchConfig(
        "resnet50", (71, 71), (StageConfig(),) * 2 + (stage_choice(paradigm, rate, None, 4),) + (StageConfig(),)
    )
    model = build_model(cfg).eval().set_gate_mode("budget")
    randomize_bn(model)
    x = torch.randn(batch, 3, 71, 71, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        fast = model(x)
        runs = torch.stack([r["rates"]["layer"] for r in model.flops_readout()])  # [6, N]
        ref = model.set_path("reference")(x)
    assert runs.shape == (6, batch)
    assert runs.sum(0).tolist() == [float(budget_count(rate, 6))] * batch
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


def test_layer_budget_follows_the_learned_scores():
    # with every score positive the first k blocks run; with every score negative the last k
    cfg = ArchConfig("resnet50", (71, 71), (StageConfig("layer", 0.5),) + (StageConfig(),) * 3)
    model = build_model(cfg).eval().set_gate_mode("budget")
    gates = [b.layer_masker for b in model.blocks() if b.layer_masker is not None]
    assert [g.slot for g in gates] == [(0, 3), (1, 3), (2, 3)]
    x = torch.randn(2, 3, 71, 71)
    for sign, expected in ((1.0, [1.0, 1.0, 0.0]), (-1.0, [0.0, 1.0, 1.0])):
        for g in gates:
            torch.nn.init.zeros_(g.fc2.weight)
            g.fc2.bias.data = torch.tensor([-sign, sign])
        with torch.no_grad():
            model(x)
        assert [float(r["rates"]["layer"][0]) for r in model.flops_readout()] == expected


@pytest.mark.parametrize("paradigm", ["spatial", "channel"])
def test_random_mode_exact_counts_uniform_independent_choice(paradigm):
    # random mode: the budget's exact count per sample, but the choice is uniform and differs
    # between samples even when the (untrained) scores are the same for every sample
    spec, blk = make_block(("resnet50", 1, 1), paradigm, 0.3, 0)
    set_gate_mode(blk, "random")
    torch.manual_seed(0)
    x = torch.randn(1, spec.in_channels, *spec.in_hw).expand(400, -1, -1, -1)  # identical samples
    with torch.no_grad():
        mask = blk.decide(x)[paradigm].reshape(400, -1)  # [400, n_decisions]
    k = budget_count(0.3, mask.shape[1])
    assert mask.sum(1).tolist() == [float(k)] * 400
    assert torch.unique(mask, dim=0).shape[0] > 300  # independent per sample
    freq = mask.mean(0)  # each decision is on with probability k / n
    assert (freq - k / mask.shape[1]).abs().max() < 0.12


def test_random_mode_layer_quota_is_a_uniform_subset_of_the_stage():
    # resnet50 stage 2 has 6 layer gates and a quota of 3 per sample: every sample runs exactly 3,
    # every block runs about half the samples (a greedy coin flip would favour the first blocks)
    cfg = ArchConfig("resnet50", (39, 39), (StageConfig(),) * 2 + (StageConfig("layer", 0.5),) + (StageConfig(),))
    model = build_model(cfg).eval().set_gate_mode("random")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 39, 39).expand(300, -1, -1, -1)
    with torch.no_grad():
        model(x)
    runs = torch.stack([r["rates"]["layer"] for r in model.flops_readout()])  # [6, 300]
    assert runs.sum(0).tolist() == [3.0] * 300
    assert (runs.mean(1) - 0.5).abs().max() < 0.1
    assert torch.unique(runs.t(), dim=0).shape[0] > 15  # many of the C(6, 3) = 20 subsets occur


def test_budget_count_rule():
    assert budget_count(0.1, 81) == 8
    assert budget_count(0.5, 9) == 5  # half rounds up
    assert budget_count(0.01, 9) == 1  # at least one
    assert budget_count(1.0, 7) == 7


def test_adaptive_mode_is_argmax():
    spec, blk = make_block(("resnet50", 1, 1), "spatial", 0.5, 1)
    x = torch.randn(2, spec.in_channels, *spec.in_hw)
    with torch.no_grad():
        logits = blk.spatial_masker.logits(x)
        mask = blk.spatial_masker(x)
    assert torch.equal(mask, (logits[:, 1] > logits[:, 0]).float())


@pytest.mark.parametrize("paradigm", DYNAMIC)
@pytest.mark.parametrize("key", [("resnet18", 1, 0), ("resnet50", 1, 0), ("regnety_400mf", 1, 0)], ids=lambda k: k[0])
def test_training_forward_is_differentiable(key, paradigm):
    spec, blk = make_block(key, paradigm, 0.5, 1)
    blk.train()
    for m in blk.maskers():
        m.temperature = 2.0
    if blk.layer_masker is not None:
        # lean towards "on" so that the channel masker behind the layer gate influences the output
        blk.layer_masker.fc2.bias.data = torch.tensor([-1.0, 1.0])
    x = torch.randn(4, spec.in_channels, *spec.in_hw)
    out = blk(x)
    flops = blk.last_flops
    executed = flops["executed_flops"]
    assert executed.shape == (4,) and executed.requires_grad
    assert torch.all(executed >= flops["masker_flops"]) and torch.all(executed <= flops["dense_flops"] + 1e-3)
    assert set(flops["rates"]) >= {"primary"}
    (out.square().mean() + executed.mean() / flops["dense_flops"]).backward()
    for m in blk.maskers():
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_training_masks_are_hard_and_temperature_is_checked():
    spec, blk = make_block(("resnet50", 1, 1), "spatial", 0.5, 1)
    blk.train()
    x = torch.randn(8, spec.in_channels, *spec.in_hw)
    blk.spatial_masker.temperature = 0.5
    m1 = blk.spatial_masker(x)
    assert set(m1.unique().tolist()) == {0.0, 1.0}
    blk.spatial_masker.temperature = 0.0
    with pytest.raises(ConfigError, match="temperature"):
        blk.spatial_masker(x)


@pytest.mark.parametrize("key", list(BLOCKS), ids=lambda k: f"{k[0]}-s{k[1]}b{k[2]}")
def test_dense_flops_match_torch_flop_counter(key):
    spec, blk = make_block(key, "spatial+channel", 0.5, 1)
    static = {"basic": BasicBlock, "bottleneck": Bottleneck, "regnety": RegNetYBlock}[spec.kind](spec).eval()
    x = torch.randn(1, spec.in_channels, *spec.in_hw)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        static(x)
    body = fc.get_total_flops()
    masker = 0
    for m in blk.maskers():
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m.logits(x)
        assert fc.get_total_flops() == m.flops()
        masker += fc.get_total_flops()
    with torch.no_grad():
        blk(x)
    assert blk.last_flops["dense_flops"] == pytest.approx(body + masker)
    assert blk.last_flops["masker_flops"] == pytest.approx(masker)


@pytest.mark.parametrize("paradigm", ["channel", "layer", "layer+channel"])
def test_fast_path_executes_the_counted_flops(paradigm):
    # channel / layer skipping on a plain bottleneck executes exactly the analytical count
    spec, blk = make_block(("resnet50", 1, 0), paradigm, 0.25, 0)
    set_gate_mode(blk, "budget")
    x = torch.randn(4, spec.in_channels, *spec.in_hw)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        blk(x)
    assert fc.get_total_flops() == pytest.approx(float(blk.last_flops["executed_flops"].sum()), rel=1e-6)


@pytest.mark.parametrize("key", [("resnet18", 1, 0), ("resnet50", 1, 0), ("regnety_400mf", 1, 0)], ids=lambda k: k[0])
def test_spatial_fast_path_skips_work(key):
    spec, blk = make_block(key, "spatial", 0.1, 0)  # S=1: 9 of 81 positions per sample
    set_gate_mode(blk, "budget")
    x = torch.randn(2, spec.in_channels, *spec.in_hw)
    counts = {}
    for path in ("reference", "fast"):
        blk.set_path(path)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            blk(x)
        counts[path] = fc.get_total_flops()
    assert counts["fast"] < 0.5 * counts["reference"]


# ----------------------------------------------------------------------------- layouts, caches


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("paradigm", DYNAMIC)
@pytest.mark.parametrize(
    "key", [("resnet50", 1, 0), ("resnet50", 1, 1), ("regnety_400mf", 1, 0)], ids=lambda k: f"{k[0]}-s{k[1]}b{k[2]}"
)
def test_fast_matches_reference_in_channels_last(key, paradigm, batch):
    # the fast path gathers pixel rows from channels-last maps; the result must not depend on layout
    spec, blk = make_block(key, paradigm, 0.5, 1)
    blk = blk.to(memory_format=torch.channels_last)
    set_gate_mode(blk, "budget")
    x = torch.randn(batch, spec.in_channels, *spec.in_hw).contiguous(memory_format=torch.channels_last)
    fast, ref, _ = both_paths(blk, x)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous_format"])
def test_input_channel_selection_is_the_column_gather(pad, layout, monkeypatch):
    # conv2 of a basic block on selected input channels: the transposed convolution over row-gathered
    # flipped kernels (channels-last, CPU float32) gives the column gather's convolution; NCHW keeps it
    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(24, 40, 3, padding=1, bias=False)
    sel = torch.tensor([0, 3, 4, 9, 17, 23])
    h = torch.randn(3, sel.numel(), 6, 7, generator=gen).contiguous(memory_format=getattr(torch, layout))
    calls = []
    real = convs.TRANSPOSED_CONV
    if real is not None:
        monkeypatch.setattr(convs, "TRANSPOSED_CONV", lambda *a: calls.append(a[1].shape) or real(*a))
    with torch.no_grad():
        out = convs.conv_inputs(h, conv, sel, pad)
        ref = F.conv2d(h, conv.weight.index_select(1, sel), None, 1, pad)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        convs.conv_inputs(h, conv, sel, pad)
    assert fc.get_total_flops() == 2 * out.numel() * sel.numel() * 9  # the convolution's, cropped output only
    assert bool(calls) == (real is not None and layout == "channels_last")
    if calls:
        assert tuple(calls[0]) == (sel.numel(), 40, 3, 3)  # [|sel|, C_out, kh, kw]


@pytest.mark.skipif(convs.TRANSPOSED_CONV is None, reason="this torch build has no oneDNN transposed convolution")
@pytest.mark.parametrize("paradigm", ["channel", "spatial+channel", "layer+channel"])
@pytest.mark.parametrize("batch", [1, 4])
def test_basic_block_channel_path_uses_the_row_gather(paradigm, batch, monkeypatch):
    # in channels-last, a basic block's conv2 reads its selected input channels by rows and matches the reference
    spec, blk = make_block(("resnet18", 1, 0), paradigm, 0.5, 1)
    blk = blk.to(memory_format=torch.channels_last)
    set_gate_mode(blk, "budget")
    calls = []
    real = convs.TRANSPOSED_CONV
    monkeypatch.setattr(convs, "TRANSPOSED_CONV", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(batch, spec.in_channels, *spec.in_hw).contiguous(memory_format=torch.channels_last)
    fast, ref, _ = both_paths(blk, x)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)
    assert calls


@pytest.mark.parametrize("paradigm", ["spatial", "channel", "layer"])
def test_fast_path_never_writes_the_callers_input(paradigm):
    # a standalone block must leave its input alone; a DynamicNet may reuse its own intermediates
    spec, blk = make_block(("resnet50", 1, 1), paradigm, 0.5, 1)
    x = torch.randn(2, spec.in_channels, *spec.in_hw)
    before = x.clone()
    with torch.no_grad():
        blk(x)
    assert torch.equal(x, before) and blk.reuse_input is False
    cfg = ArchConfig("resnet50", (71, 71), (stage_choice(paradigm, 0.5, 3, 4),) * 2 + (StageConfig(),) * 2)
    model = build_model(cfg).eval()
    assert all(b.reuse_input for b in model.blocks())
    img = torch.randn(2, 3, 71, 71)
    img_before = img.clone()
    with torch.inference_mode():
        fast = model(img)
        ref = model.set_path("reference")(img)
    assert torch.equal(img, img_before)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


def test_cached_weight_layouts_follow_weight_updates():
    # the channel path caches re-laid-out weights; an in-place update must invalidate them
    spec, blk = make_block(("resnet50", 1, 1), "channel", 0.5, 1)
    set_gate_mode(blk, "budget")
    x = torch.randn(2, spec.in_channels, *spec.in_hw)
    both_paths(blk, x)
    with torch.no_grad():
        blk.conv3.weight.mul_(-2.0)
        blk.conv2.weight.add_(0.1)
    fast, ref, _ = both_paths(blk, x)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)


def test_training_readout_has_the_adaptive_rate_and_configured_flops():
    spec, blk = make_block(("resnet50", 1, 1), "spatial+channel", 0.5, 1)
    blk.train()
    blk(torch.randn(3, spec.in_channels, *spec.in_hw))
    rates = blk.last_flops["rates"]
    assert rates["primary_adaptive"].shape == (3,) and rates["primary_adaptive"].requires_grad
    conf = blk.configured_flops()
    assert 0 < float(conf["executed_flops"][0]) < conf["dense_flops"]


@pytest.mark.parametrize("m", [64, 70, 72, 131, 40])  # folded by 8, by 7, padded to 136; 40: too few rows
def test_row_product_is_a_matrix_product(m, monkeypatch, fold_from_64_rows):
    # the folded 1x1 convolution gives F.linear's rows, whatever the row count's divisors (this
    # host's rule folds only far larger products: the fixture sets the 64-row one)
    gen = torch.Generator().manual_seed(3)
    rows, w = torch.randn(m, 384, generator=gen), torch.randn(512, 384, generator=gen)
    folded = []
    real = torch.ops.aten.mkldnn_convolution
    monkeypatch.setattr(torch.ops.aten, "mkldnn_convolution", lambda x, *a: folded.append(x.shape) or real(x, *a))
    with torch.no_grad():
        out = convs.row_product(rows, w)
        out_t = convs.row_product(rows, w.t().contiguous().t())  # a transposed view, as conv3 passes it
    torch.testing.assert_close(out, F.linear(rows, w), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_t, F.linear(rows, w), atol=1e-4, rtol=1e-4)
    will_fold = convs.ONEDNN and m >= convs.FOLD_MIN_ROWS
    assert bool(folded) == will_fold
    if will_fold:
        f = folded[0][-1]
        assert f == (8 if m % 8 == 0 else 7 if m % 7 == 0 else 8) and folded[0][2] * f >= m  # [1, K, M'/f, f]


def test_row_product_keeps_the_matrix_product_for_autograd():
    rows = torch.randn(128, 256, requires_grad=True)
    w = torch.randn(128, 256)
    convs.row_product(rows, w).sum().backward()
    torch.testing.assert_close(rows.grad, w.sum(0).expand(128, -1))
