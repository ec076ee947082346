"""The CPU work model (predictors/cpu*.py): its expectations, and the operators it counts against those the kernels dispatch."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dynas.errors import TargetError
from dynas.kernels import build_block
from dynas.predictors import cpu, latency
from dynas.predictors.latency import predict, predict_blocks
from dynas.predictors.targets import HardwareTarget, load_target
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import PARADIGMS, ArchConfig, StageConfig
from tests.calibration_data import DATA, UNIT
from tests.calibration_data import unit_target as _target
from tests.dispatch_counter import dispatched

# ----------------------------------------------------------------------------- the work model


def test_distinct_selections_expectation_matches_simulation():
    rng = random.Random(0)
    for m, M in ((8, 6), (8, 70), (3, 2), (8, 10**20)):
        sims = [len({rng.randrange(min(M, 10**9)) for _ in range(m)}) for _ in range(4000)]
        assert cpu.distinct(m, M) == pytest.approx(np.mean(sims), rel=0.03)


@pytest.mark.parametrize("stage, S, k", [(1, 4, 1), (1, 2, 7), (1, 7, 2), (0, 1, 100)])
def test_needed_pixel_expectation_matches_brute_force(stage, S, k):
    b = get_backbone("resnet50", 112).stage_blocks(stage)[0]
    gh, gw = b.out_hw[0] // S, b.out_hw[1] // S
    hm, wm = b.in_hw
    L = (S - 1) * b.stride + 3
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(300):
        on = rng.choice(gh * gw, size=k, replace=False)
        need = np.zeros((hm, wm), dtype=bool)
        for p in on:
            i, j = divmod(int(p), gw)
            r0, c0 = i * S * b.stride - 1, j * S * b.stride - 1
            need[max(r0, 0) : max(0, r0 + L), max(c0, 0) : max(0, c0 + L)] = True
        counts.append(need.sum())
    assert cpu.covered(b, S, k) == pytest.approx(np.mean(counts), rel=0.03)


@pytest.mark.parametrize("paradigm", [p for p in PARADIGMS if p != "static"])
@pytest.mark.parametrize("batch", [1, 8])
def test_predicted_latency_is_positive_and_monotone_in_rate(paradigm, batch):
    # below rate 1 (at rate 1 every sample of a batch shares one channel selection, and the
    # kernels then skip the per-selection split: a real drop, tested below)
    spec = get_backbone("resnet50", 224)
    last = 0.0
    for rate in (0.2, 0.4, 0.6, 0.8, 0.95):
        st = StageConfig(
            paradigm,
            rate,
            spatial_granularity=7 if "spatial" in paradigm else None,
            channel_granularity=4 if "channel" in paradigm else None,
            channel_rate=rate if "+" in paradigm else None,
        )
        cfg = ArchConfig("resnet50", spec.input_hw, (st,) * 4)
        ms = predict(cfg, _target(), batch).latency_ms
        assert math.isfinite(ms) and ms > last
        last = ms


def test_channel_rate_one_runs_the_batch_whole():
    conv_calls, repeats = cpu.TERMS.index("conv_calls"), cpu.TERMS.index("repeat_conv_calls")
    rate_one, below = (
        StageConfig("channel", 1.0, channel_granularity=4),
        StageConfig("channel", 0.95, channel_granularity=4),
    )
    b = get_backbone("resnet18", 112).stage_blocks(2)[1]
    whole, split = cpu.block_work(b, rate_one, 8), cpu.block_work(b, below, 8)
    # the whole batch: the two 3x3 convs once each; split: the two per selection, the first
    # selection's first calls, the others' repeats of them
    assert whole[conv_calls] == 2 and whole[repeats] == 0
    assert split[conv_calls] == 2 and split[repeats] > 12
    # a bottleneck runs differing selections in one pass (batched, or here on 7 x 7 with 61 of 64
    # groups the dense convolutions, masked), never one per selection
    b = get_backbone("resnet50", 112).stage_blocks(2)[1]
    assert cpu.block_work(b, below, 8)[repeats] == 0


def test_later_channel_parts_gather_the_weights_again():
    # C(256, 128) selections never repeat: at batch 8 every sample is its own part; the first
    # gathers its weights as batch 1 does, the other 7 gather the same rows again (from cache)
    b = get_backbone("resnet18", 64).stage_blocks(2)[1]
    st = StageConfig("channel", 0.5, channel_granularity=1)
    one, eight = cpu.block_work(b, st, 1), cpu.block_work(b, st, 8)
    T = cpu.TERMS
    assert one[T.index("regather_melem")] == 0 and one[T.index("repeat_conv_calls")] == 0
    weights = one[T.index("gather_melem")]  # batch 1 runs whole: its only gathers are the two convs' weights
    assert weights > 0
    assert eight[T.index("regather_melem")] == pytest.approx(7 * weights)
    assert eight[T.index("conv_calls")] == 2 and eight[T.index("repeat_conv_calls")] == pytest.approx(7 * 2)


def test_static_is_the_rate_one_layer_limit_minus_masker_work():
    # a layer gate at rate 1 runs every block: the same body work plus the masker's
    spec = get_backbone("resnet18", 64)
    b = spec.stage_blocks(1)[1]
    static = cpu.block_work(b, StageConfig(), 4)
    layer = cpu.block_work(b, StageConfig("layer", 1.0), 4, 1.0)
    extra = layer - static
    assert np.all(extra >= -1e-12)
    masker = cpu.Work()
    cpu.mlp_masker(masker, b, 4, 1)
    masker.ops(3)  # the running samples: arange, compare, nonzero
    np.testing.assert_allclose(extra, masker.v, atol=1e-12)


def _dispatched(spec, st: StageConfig, n: int) -> tuple[int, int, int]:
    """(convolution, matrix-product, other) operators one fast forward of a block dispatches."""
    import torch

    torch.manual_seed(0)
    blk = build_block(spec, st).eval().to(memory_format=torch.channels_last)
    for m in blk.maskers():
        m.set_gate_mode("random")
    blk.reuse_input = True  # as in a network
    blk.input_nonnegative = True  # ... whose block inputs are ReLU outputs (an identity shortcut is its own ReLU)
    x = torch.randn(n, spec.in_channels, *spec.in_hw).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        blk(x.clone())  # fills the cached weight layouts, as the untimed warm-up pass does
        return dispatched(lambda: blk(x))[0]


# (backbone, stage, block, choice, batch): paths whose operator count does not depend on the draw
_COUNTED = [
    (bb, s, i, st, n)
    for bb, s, i in (("resnet18", 1, 0), ("resnet50", 1, 1), ("regnety_400mf", 1, 1))
    for st, n in (
        (StageConfig(), 8),
        (StageConfig("channel", 0.5, channel_granularity=8), 1),
        (StageConfig("channel", 0.5, channel_granularity=1), 1),
        (StageConfig("channel", 1.0, channel_granularity=4), 8),
        (StageConfig("layer", 1.0), 8),
        (StageConfig("layer+channel", 1.0, channel_granularity=8, channel_rate=0.5), 1),
        (StageConfig("spatial", 0.5, spatial_granularity=1), 8),
        (StageConfig("spatial", 0.5, spatial_granularity=2), 1),
        (StageConfig("spatial", 0.5, spatial_granularity=14), 8),
        (StageConfig("spatial+channel", 0.5, spatial_granularity=2, channel_granularity=8, channel_rate=0.5), 1),
        # one channel part per sample: C(width, width / 2) selections never repeat
        (StageConfig("spatial+channel", 0.5, spatial_granularity=2, channel_granularity=1, channel_rate=0.5), 8),
        # differing selections: a part per sample (basic, RegNetY) or one batched pass (bottleneck)
        (StageConfig("channel", 0.5, channel_granularity=1), 8),
        # conv1 on gathered rows (25 % of the patches need < 65 % of the pixels), 3x3 conv on windows
        (StageConfig("spatial", 0.25, spatial_granularity=2), 2),
    )
] + [
    # a 4 x 4 map: gathered weights per sample do not pay, the dense convolutions run masked
    ("resnet50", 3, 1, StageConfig("channel", 0.5, channel_granularity=1), 8),
    # 1x1 patches of a bottleneck: conv1 on gathered rows, the 3x3 conv as one product of window rows
    ("resnet50", 0, 1, StageConfig("spatial", 0.2, spatial_granularity=1), 2),
]


@pytest.mark.parametrize("bb,s,i,st,n", _COUNTED, ids=lambda v: v.short() if isinstance(v, StageConfig) else str(v))
def test_work_model_counts_the_operators_the_kernels_dispatch(bb, s, i, st, n):
    # the per-call costs are fitted per operator: the model must count the operators the fast
    # path really dispatches (convolutions exactly; matrix products of pixel rows among the
    # matrix products; the rest, products of per-sample vectors included, within one operator:
    # a folded product of an expected, gathered row count pads with probability 3/4)
    spec = get_backbone(bb, 112).stage_blocks(s)[i]
    conv, mm, other = _dispatched(spec, st, n)
    w = cpu.block_work(spec, st, n)
    T = cpu.TERMS
    assert w[T.index("conv_calls")] + w[T.index("repeat_conv_calls")] == conv and w[T.index("mm_calls")] <= mm
    counted = w[T.index("mm_calls")] + w[T.index("op_calls")]
    assert abs(counted - (mm + other)) <= 1.0, (counted, mm + other)
    assert w[T.index("masker_calls")] == len(build_block(spec, st).maskers())


@pytest.mark.parametrize("bb,s,i,st,n", [c for c in _COUNTED if c[0] == "resnet50" and c[4] <= 2], ids=str)
def test_folded_row_products_are_counted_as_the_kernels_fold_them(bb, s, i, st, n, fold_from_64_rows):
    # the folding threshold moves with the host (cpu_paths.FOLD_MIN_ROWS): at 64 rows, as on
    # the host that preferred folding, the model and the kernels still agree
    test_work_model_counts_the_operators_the_kernels_dispatch(bb, s, i, st, n)


def test_expected_flops_follow_the_kernels_count():
    # rates whose budget counts are exact (0.5 of 64 patches, of 16 channel groups): the
    # predictor's expected FLOPs per stage equal the kernels' configured FLOPs record
    from dynas.kernels.model import build_model

    cfg = ArchConfig(
        "resnet50",
        (64, 64),
        (
            StageConfig("spatial", 0.5, spatial_granularity=2),
            StageConfig("channel", 0.5, channel_granularity=8),
            StageConfig("spatial+channel", 0.5, spatial_granularity=1, channel_granularity=16, channel_rate=0.5),
            StageConfig(),
        ),
    )
    model = build_model(cfg).eval()
    per_stage = [0.0] * 4
    for blk in model.blocks():
        if blk.paradigm != "static":
            per_stage[blk.spec.stage] += float(blk.configured_flops()["executed_flops"][0])
    pred = predict(cfg, _target(), 1)
    for s in range(3):
        assert pred.stages[s].expected_gflops * 1e9 == pytest.approx(per_stage[s], rel=1e-9)


def test_uncalibrated_work_is_an_error_not_a_zero():
    t = HardwareTarget(
        name="unit",
        description="",
        kind="cpu",
        default_batch_size=1,
        cpu=UNIT,
        threads=2,
        unexercised=("grouped_ms_per_gmac",),
    )
    predict(ArchConfig.static("resnet18", 64), t, 1)  # no grouped convs: fine
    with pytest.raises(TargetError, match="never calibrated on grouped_gmac"):
        predict(ArchConfig.static("regnety_400mf", 64), t, 1)


def test_a_dynamic_stage_pays_one_cold_start_on_its_first_block():
    target = str(DATA / "cpu-2core-dec01-late" / "cpu-2core-dec01-late.toml")
    cold_ms = load_target(target).cpu.dynamic_stage_us * 1e-3
    assert cold_ms > 0
    # ResNet-18's stage 0 has two blocks of one shape: they differ by the cold start alone
    for first in (StageConfig(), StageConfig("channel", 0.5, channel_granularity=8), StageConfig("spatial", 0.5, 4)):
        cfg = ArchConfig("resnet18", (224, 224), (first,) + (StageConfig(),) * 3)
        for n in (1, 8):
            b0, b1 = predict_blocks(cfg, target, n)[0]
            assert b0 - b1 == pytest.approx(0.0 if first.paradigm == "static" else cold_ms, abs=1e-12)
            work = latency.stage_work("resnet18", (224, 224), 0, first, n, None, 4)
            assert work[cpu.TERMS.index("dynamic_stages")] == (first.paradigm != "static")


@pytest.mark.parametrize(
    "bb, stage, S", [("resnet50", 0, 1), ("resnet50", 1, 2), ("resnet50", 2, 1), ("regnety_400mf", 1, 2)]
)
def test_the_model_runs_conv1_on_whole_maps_from_the_kernels_patch_count(bb, stage, S):
    # the kernels decide dense or gathered conv1 from a torch table of their windows; the model
    # from its own expectation of the needed pixels: the same fewest active patches
    from dynas.predictors import cpu_spatial

    b = get_backbone(bb, 112).stage_blocks(stage)[1]
    blk = build_block(b, StageConfig("spatial", 0.5, spatial_granularity=S))
    assert cpu_spatial.dense_head_min_patches(b, S) == blk._dense_min_patches
