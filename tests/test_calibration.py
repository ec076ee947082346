"""Calibration: measured targets, the work model of dynas's kernels, the fit, calibrate/validate."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dynas.cli import main
from dynas.errors import ConfigError, TargetError
from dynas.kernels import build_block
from dynas.kernels.calibrate import measure, run_plan
from dynas.predictors import cpu, latency
from dynas.predictors.calibration import compare, fit_target, per_sample_gated, retest_summary, round_spread
from dynas.predictors.latency import predict, predict_blocks
from dynas.predictors.targets import HardwareTarget, load_target, target_toml, write_target
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import PARADIGMS, ArchConfig, StageConfig, budget_count
from dynas.spaces.design import CALIBRATION_RATES, VALIDATION_RATES, PlanItem, calibration_plan, validation_plan

#: trimmed copies of benchmark measurements (tests/data/README.md says which rows of which run)
DATA = Path(__file__).resolve().parent / "data"
UNIT = cpu.CpuCosts(*([1.0] * len(cpu.COST_FIELDS)))


def _target(costs: cpu.CpuCosts = UNIT, **fit) -> HardwareTarget:
    return HardwareTarget(name="unit", description="", kind="cpu", default_batch_size=1, cpu=costs, threads=2, fit=fit)


# ----------------------------------------------------------------------------- target files


def test_cpu_target_round_trips_through_toml(tmp_path):
    t = dataclasses.replace(_target(cpu.CpuCosts(*(0.5 + i for i in range(len(cpu.COST_FIELDS))))), column_block=4)
    path = write_target(t, tmp_path / "mine.toml")
    back = load_target(str(path))
    assert back.kind == "cpu" and back.cpu == t.cpu and back.threads == 2 and back.column_block == 4
    cfg = ArchConfig.static("resnet18", 64)
    assert predict(cfg, str(path), 1).latency_ms == pytest.approx(predict(cfg, t, 1).latency_ms)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("conv_call_us"), "cpu.conv_call_us is missing"),
        (lambda c: c.update(conv_call_us=-1.0), "cpu.conv_call_us=-1.0 is out of range"),
        (lambda c: c.update(bogus=1.0), "cpu.bogus is unknown"),
        (lambda c: c.update(threads=0), "cpu.threads=0 is out of range"),
        (lambda c: c.update(column_block=0), "cpu.column_block=0 is out of range"),
        (lambda c: c.update(column_block=2.5), "cpu.column_block=2.5 is not a positive integer"),
    ],
)
def test_cpu_target_file_errors_name_the_field(tmp_path, edit, message):
    import tomllib

    data = tomllib.loads(target_toml(_target()))
    edit(data["cpu"])
    lines = ['name = "bad"', 'kind = "cpu"', "[cpu]"] + [f"{k} = {v}" for k, v in data["cpu"].items()]
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TargetError, match=message.replace("(", r"\(")):
        load_target(str(path))


def test_write_target_into_missing_directory_writes_nothing(tmp_path):
    with pytest.raises(TargetError, match="does not exist"):
        write_target(_target(), tmp_path / "no" / "t.toml")
    assert list(tmp_path.iterdir()) == []


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


# operators that launch no kernel (views); everything else the fast path dispatches is counted
_VIEW_OPS = {
    "view",
    "_unsafe_view",
    "permute",
    "select",
    "slice",
    "expand",
    "as_strided",
    "t",
    "detach",
    "alias",
    "unsqueeze",
    "squeeze",
    "reshape",
    "_reshape_alias",
    "transpose",
    "split",
    "unbind",
    "flatten",
    "view_as",
    "unflatten",
    "expand_as",
    "narrow",
}
_CONV_OPS = {"conv2d", "convolution", "mkldnn_convolution", "_convolution_transpose_pointwise"}
_MM_OPS = {"linear", "mm", "addmm", "matmul", "bmm"}  # bmm: the batched products of differing selections


def _dispatched(spec, st: StageConfig, n: int) -> tuple[int, int, int]:
    """(convolution, matrix-product, other) operators one fast forward of a block dispatches."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    blk = build_block(spec, st).eval().to(memory_format=torch.channels_last)
    for m in blk.maskers():
        m.set_gate_mode("random")
    blk.reuse_input = True  # as in a network
    blk.input_nonnegative = True  # ... whose block inputs are ReLU outputs (an identity shortcut is its own ReLU)
    x = torch.randn(n, spec.in_channels, *spec.in_hw).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        blk(x.clone())  # fills the cached weight layouts, as the untimed warm-up pass does
        count = Count()
        with count:
            blk(x)
    ops = {k: v for k, v in count.ops.items() if k not in _VIEW_OPS}
    conv = sum(v for k, v in ops.items() if k in _CONV_OPS)
    mm = sum(v for k, v in ops.items() if k in _MM_OPS)
    return conv, mm, sum(ops.values()) - conv - mm


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


# ----------------------------------------------------------------------------- design and fit


def test_calibration_plan_is_stratified_and_balanced():
    items = list(itertools.islice(calibration_plan(("resnet18", "resnet50"), 64, (1, 8), seed=3), 4 + 2 * 2 * 12))
    assert all(i.config.stages == ArchConfig.static(i.config.backbone, 64).stages for i in items[:4])
    rest = items[4:]
    assert [i.batch_size for i in rest[:4]] == [1, 8, 1, 8]
    for backbone in ("resnet18", "resnet50"):
        cfgs = [i.config for i in rest if i.config.backbone == backbone and i.batch_size == 1][:12]
        for s in range(4):
            seen = [c.stages[s].paradigm for c in cfgs]
            assert {p: seen.count(p) for p in PARADIGMS} == {p: 2 for p in PARADIGMS}
            rates = [c.stages[s].rate for c in cfgs if c.stages[s].paradigm != "static"]
            assert set(rates) <= set(CALIBRATION_RATES)


def test_validation_configs_never_use_a_calibration_rate():
    items = validation_plan(("resnet18", "regnety_400mf"), 64, (1,), count=20, seed=5)
    assert len(items) == 20 and {i.config.backbone for i in items} == {"resnet18", "regnety_400mf"}
    for i in items:
        for st in i.config.stages:
            if st.paradigm != "static":
                assert st.rate in VALIDATION_RATES and st.rate not in CALIBRATION_RATES
    again = validation_plan(("resnet18", "regnety_400mf"), 64, (1,), count=20, seed=5)
    assert [i.config for i in items] == [i.config for i in again]


def _synthetic_table(true: cpu.CpuCosts, batch_sizes: tuple[int, ...], count: int = 120) -> pd.DataFrame:
    """Calibration rows whose times are ``true``'s predictions of the calibration plan's networks."""
    plan = itertools.islice(calibration_plan(("resnet18", "resnet50", "regnety_400mf"), 64, batch_sizes, seed=0), count)
    rows = []
    for net, item in enumerate(plan):
        p = predict(item.config, _target(true), item.batch_size)
        parts = [("stem", -1, p.stem_ms), ("head", -1, p.head_ms)] + [
            (f"stage{s}", s, st.latency_ms) for s, st in enumerate(p.stages)
        ]
        for part, stage, ms in parts:
            rows.append(
                {
                    "network_id": net,
                    "config": item.config.to_json(indent=None),
                    "batch_size": item.batch_size,
                    "part": part,
                    "stage": stage,
                    "measured_ms": ms,
                }
            )
    return pd.DataFrame(rows)


def test_fit_recovers_the_costs_that_generated_the_measurements():
    true = cpu.CpuCosts(*(1.0 + (7 * i) % 11 for i in range(len(cpu.COST_FIELDS))))
    fitted = fit_target(_synthetic_table(true, (1, 4)), "synthetic", {"threads": 2})
    assert fitted.fit["parts_mape_pct"] < 1e-3 and fitted.fit["outlier_rows"] == 0
    cfg = ArchConfig("resnet50", (64, 64), (StageConfig("spatial", 0.35, spatial_granularity=2),) * 4)
    assert predict(cfg, fitted, 4).latency_ms == pytest.approx(predict(cfg, _target(true), 4).latency_ms, rel=1e-4)


def test_a_batch_1_calibration_prices_later_channel_parts_like_the_first():
    # at batch 1 a block never runs a second channel part: nothing measures those costs, so the
    # fit gives them the first part's instead of leaving them unexercised (an error at batch 8)
    true = cpu.CpuCosts(*(1.0 + (7 * i) % 11 for i in range(len(cpu.COST_FIELDS))))
    fitted = fit_target(_synthetic_table(true, (1,), 60), "batch1", {"threads": 2})
    assert fitted.unexercised == ()
    for later, first in cpu.LATER_PART_FIELDS.items():
        assert getattr(fitted.cpu, later) == getattr(fitted.cpu, first) == pytest.approx(getattr(true, first), rel=1e-4)
    cfg = ArchConfig("resnet18", (64, 64), (StageConfig("channel", 0.5, channel_granularity=4),) + (StageConfig(),) * 3)
    assert predict(cfg, fitted, 8).latency_ms > 0


def test_narrow_maps_cost_the_column_block_in_macs():
    # 2x2 spatial patches: conv2 of a bottleneck runs on [P, k, 4, 4] windows -> [P, k, 2, 2],
    # two output columns; with a column block of 4 its MACs count 2x, wide maps' not at all.
    b = get_backbone("resnet50", (224, 224)).stage_blocks(2)[1]  # 14 x 14
    patches = StageConfig("spatial", 0.5, spatial_granularity=2)
    work = {cb: cpu.block_work(b, patches, 1, 1.0, cb) for cb in (1, 4)}
    small = cpu.TERMS.index("smallmap_gmac")
    conv2_gmac = budget_count(0.5, 49) * 4 * b.width * b.width * 9 * 1e-9  # [P, k, 4, 4] -> [P, k, 2, 2]
    assert work[4][small] - work[1][small] == pytest.approx(conv2_gmac)
    others = np.arange(len(cpu.TERMS)) != small
    assert np.array_equal(work[4][others], work[1][others])
    static = StageConfig()
    assert np.array_equal(cpu.block_work(b, static, 1, 1.0, 4), cpu.block_work(b, static, 1, 1.0, 1))  # 14 columns
    # 1x1 patches: conv2 is a matrix product of window rows, which has no columns
    one = StageConfig("spatial", 0.5, spatial_granularity=1)
    assert np.array_equal(cpu.block_work(b, one, 1, 1.0, 4), cpu.block_work(b, one, 1, 1.0, 1))


def test_the_model_folds_row_products_where_the_kernels_do():
    from dynas.kernels import blocks

    assert (cpu.FOLD_MIN_ROWS, cpu.FOLD_MIN_MACS) == (blocks.FOLD_MIN_ROWS, blocks.FOLD_MIN_MACS)
    # a channel-gated bottleneck: conv1 / conv3 are row products on the selected channels; on
    # 14 x 14 (196 rows) they are folded convolutions, on 7 x 7 (49 rows) BLAS products
    gated = StageConfig("channel", 0.5, channel_granularity=64)
    mm, pw = cpu.TERMS.index("mm_gmac"), cpu.TERMS.index("pointwise_gmac")
    big = get_backbone("resnet50", (224, 224)).stage_blocks(2)[1]  # 1024 -> 256 -> 1024 on 14 x 14
    small = get_backbone("resnet50", (224, 224)).stage_blocks(3)[1]  # 2048 -> 512 -> 2048 on 7 x 7
    w_big, w_small = cpu.block_work(big, gated, 1, 1.0, 1), cpu.block_work(small, gated, 1, 1.0, 1)
    vec = cpu.TERMS.index("vec_gmac")
    k = budget_count(0.5, 8) * 64
    assert w_big[mm] == 0 and 0 < w_big[vec] < 1e-3  # only the masker's small layers stay BLAS
    k_big = budget_count(0.5, 4) * 64  # of 256 channels
    assert w_big[pw] == pytest.approx(196 * k_big * (1024 + 1024) * 1e-9)  # conv1 and conv3, folded
    rows_gmac = 49 * k * (2048 + 2048) * 1e-9  # conv1 [49, 2048] -> [49, k], conv3 [49, k] -> [49, 2048]
    assert w_small[mm] == pytest.approx(rows_gmac, rel=1e-2)


def test_old_target_files_keep_their_meaning(tmp_path):
    # files written before row products and indexed rows had their own costs load as they fitted
    costs = cpu.CpuCosts(*(0.5 + i for i in range(len(cpu.COST_FIELDS))))
    text = target_toml(_target(costs))
    later = ("mm_ms_per_gmac", "vec_ms_per_gmac", "index_ms_per_mrow", "masker_call_us", "dynamic_stage_us")
    old = "\n".join(line for line in text.splitlines() if not line.startswith(later))
    (tmp_path / "old.toml").write_text(old)
    back = load_target(str(tmp_path / "old.toml")).cpu
    assert back.mm_ms_per_gmac == back.vec_ms_per_gmac == costs.pointwise_ms_per_gmac and back.index_ms_per_mrow == 0.0
    assert back.masker_call_us == back.dynamic_stage_us == 0.0  # no gate cost beyond the counted operators
    assert back._replace(**{f: getattr(costs, f) for f in later}) == costs
    # a file with row products but no per-sample products priced them alike
    (tmp_path / "mid.toml").write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith("vec_ms_per_gmac"))
    )
    assert load_target(str(tmp_path / "mid.toml")).cpu.vec_ms_per_gmac == costs.mm_ms_per_gmac


@pytest.mark.parametrize("true_block", [1, 4])
@pytest.mark.parametrize("whole", [False, True], ids=["stages", "whole-networks"])
def test_fit_picks_the_column_block_that_generated_the_measurements(true_block, whole):
    true = cpu.CpuCosts(*(1.0 + (7 * i) % 11 for i in range(len(cpu.COST_FIELDS))))
    gen = dataclasses.replace(_target(true), column_block=true_block)
    plan = itertools.islice(calibration_plan(("resnet50",), 224, (1,), seed=0), 60)
    rows = []
    for net, item in enumerate(plan):
        p = predict(item.config, gen, item.batch_size)
        parts = [(f"stage{s}", s, st.latency_ms) for s, st in enumerate(p.stages)]
        if whole:  # every part and the network: the block is chosen by cross-validated networks
            parts += [("stem", -1, p.stem_ms), ("head", -1, p.head_ms), ("network", -1, p.latency_ms)]
        for part, stage, ms in parts:
            rows.append(
                {
                    "network_id": net,
                    "config": item.config.to_json(indent=None),
                    "batch_size": item.batch_size,
                    "part": part,
                    "stage": stage,
                    "measured_ms": ms,
                }
            )
    fitted = fit_target(pd.DataFrame(rows), "synthetic", {"threads": 2})
    assert fitted.column_block == true_block and fitted.fit["parts_mape_pct"] < 1e-3
    cv = fitted.fit["column_block_network_cv_mape_pct"]
    assert (cv != "") == whole and (not whole or f"{true_block}: 0.00" in cv)


def test_the_column_block_is_the_one_that_predicts_held_out_networks_best(monkeypatch):
    from dynas.predictors import calibration as cal

    data = DATA / "cpu-2core-dec01-pairs"
    table = pd.read_csv(data / "cpu-2core-dec01-pairs.csv")
    table = table[table["network_id"] < 120]
    fitted = fit_target(table, "t")
    cv = {
        int(k): float(v)
        for k, v in (kv.split(": ") for kv in fitted.fit["column_block_network_cv_mape_pct"].split(", "))
    }
    assert set(cv) == set(cpu.COLUMN_BLOCKS) and fitted.column_block == min(cv, key=cv.get)
    # too few whole networks to cross-validate: the part rows' median error decides
    monkeypatch.setattr(cal, "CV_MIN_NETWORKS", 10_000)
    few = fit_target(table, "t")
    med = {int(k): float(v) for k, v in (kv.split(": ") for kv in few.fit["column_block_median_err_pct"].split(", "))}
    assert few.fit["column_block_network_cv_mape_pct"] == "" and few.column_block == min(med, key=med.get)


def test_fit_rejects_tables_it_cannot_use():
    with pytest.raises(ConfigError, match="column 'measured_ms' is missing"):
        fit_target(pd.DataFrame({"config": ["{}"], "batch_size": [1], "part": ["stem"], "stage": [-1]}), "x")
    with pytest.raises(ConfigError, match="measured_ms=-1.0 is out of range"):
        fit_target(
            pd.DataFrame({"config": ["{}"], "batch_size": [1], "part": ["stem"], "stage": [-1], "measured_ms": [-1.0]}),
            "x",
        )


# ----------------------------------------------------------------------------- measuring


def test_measure_splits_a_pass_into_its_parts():
    cfg = ArchConfig("resnet18", (32, 32), (StageConfig("layer", 0.5),) + (StageConfig(),) * 3)
    m = measure(cfg, 2, repeats=2, warmup=0)
    assert len(m.stages_ms) == 4 and min(m.stages_ms) > 0 and m.stem_ms > 0 and m.head_ms > 0
    assert m.stem_ms + sum(m.stages_ms) + m.head_ms <= m.network_ms * 1.5  # medians of parts of the same passes


def test_measure_times_every_block_in_passes_of_their_own():
    cfg = ArchConfig("resnet18", (32, 32), (StageConfig("channel", 0.5, channel_granularity=8),) + (StageConfig(),) * 3)
    assert measure(cfg, 1, repeats=1, warmup=0).blocks_ms == ()
    m = measure(cfg, 2, repeats=3, warmup=1, blocks=True)
    assert [len(b) for b in m.blocks_ms] == [cfg.spec.stage_depth(s) for s in range(4)]
    assert min(min(b) for b in m.blocks_ms) > 0
    rows = pd.DataFrame(run_plan([PlanItem(cfg, 1)], repeats=1, warmup=0, blocks=True))
    blocks = rows[rows["part"].str.startswith("block")]
    assert list(blocks["part"]) == [f"block{s}.{i}" for s in range(4) for i in range(cfg.spec.stage_depth(s))]
    assert (blocks["stage"] == blocks["part"].str[5].astype(int)).all() and (blocks["measured_ms"] > 0).all()
    assert blocks["choice"].iloc[0] == cfg.stages[0].short()


def test_the_fit_and_the_scores_keep_block_rows_apart():
    data = DATA / "cpu-2core-dec01-late"
    cal = pd.read_csv(data / "cpu-2core-dec01-late.csv")
    cal = cal[cal["network_id"] < 60]
    first = cal[cal["part"] == "stage0"]
    junk = first.assign(part="block0.0", measured_ms=first["measured_ms"] * 50)  # would wreck a fit that used them
    assert fit_target(pd.concat([cal, junk]), "t").cpu == fit_target(cal, "t").cpu
    scored = compare(pd.concat([cal, junk]), str(data / "cpu-2core-dec01-late.toml"))
    blocks = scored[scored["part"] == "block0.0"]
    want = [
        predict_blocks(c, str(data / "cpu-2core-dec01-late.toml"), int(n))[0][0]
        for c, n in zip(blocks["config"], blocks["batch_size"])
    ]
    np.testing.assert_allclose(blocks["predicted_ms"], want, rtol=1e-12)
    gated = per_sample_gated(blocks)
    assert gated.any() and not gated.all()  # the calibration design has stage-0 layer gates and others
    with pytest.raises(
        ConfigError, match=r"part='block0\.9' is not a block of resnet18; allowed: block<stage>\.<index>"
    ):
        compare(junk.assign(part="block0.9").head(1), str(data / "cpu-2core-dec01-late.toml"))


def test_run_plan_rows_carry_the_environment_and_stop_at_max_items():
    rows = run_plan(validation_plan(("resnet18",), 32, (1,), count=3, seed=0), repeats=1, warmup=0, max_items=2)
    df = pd.DataFrame(rows)
    assert df["network_id"].nunique() == 2
    assert set(df["part"]) == {"stem", "stage0", "stage1", "stage2", "stage3", "head", "network"}
    for col in ("device", "device_name", "torch_version", "threads", "date", "gate_mode"):
        assert df[col].notna().all()


def test_run_rounds_keeps_each_networks_fastest_round(monkeypatch):
    import dynas.kernels.calibrate as cal

    items = validation_plan(("resnet18",), 32, (1,), count=3, seed=0)
    slow = {(0, 0), (1, 2)}  # (round, network) pairs disturbed by "other load"
    calls = []

    def fake_measure(config, n, device, repeats, warmup, seed, blocks=False, reference=None):
        net = [i.config for i in items].index(config)
        rnd = sum(1 for c in calls if c == net)
        calls.append(net)
        t = (10.0 + net) * (3.0 if (rnd, net) in slow else 1.0)
        return cal.Measurement(1.0, (t / 4,) * 4, 1.0, t, repeats)

    monkeypatch.setattr(cal, "measure", fake_measure)
    rows = pd.DataFrame(cal.run_rounds(items, 2, repeats=1, seed=7))
    net = rows[rows["part"] == "network"].set_index("network_id")["measured_ms"]
    assert net.to_dict() == {0: 10.0, 1: 11.0, 2: 12.0}
    assert calls == [0, 1, 2, 2, 1, 0]  # the second round runs in reverse order
    assert (rows["rounds"] == 2).all() and len(rows) == 3 * 7
    # how much longer each network's slower round took: the machine's noise
    spread = rows.groupby("network_id")["round_spread"].agg(["min", "max"])
    assert (spread["min"] == spread["max"]).all() and spread["max"].tolist() == pytest.approx([2.0, 0.0, 2.0])
    assert round_spread(rows) == pytest.approx({"count": 3, "median_pct": 200.0, "p90_pct": 200.0})
    assert round_spread(rows.drop(columns="round_spread")) is None


def test_run_rounds_on_an_endless_plan_remeasures_the_first_rounds_networks(monkeypatch):
    import dynas.kernels.calibrate as cal

    seen = []

    def fake_measure(config, n, device, repeats, warmup, seed, blocks=False, reference=None):
        seen.append((config, n, seed))
        return cal.Measurement(1.0, (1.0,) * 4, 1.0, 7.0 + len(seen), repeats)

    monkeypatch.setattr(cal, "measure", fake_measure)
    rows = pd.DataFrame(
        cal.run_rounds(calibration_plan(("resnet18",), 32, (1,), seed=0), 2, repeats=1, seed=3, max_items=4)
    )
    assert sorted(rows["network_id"].unique()) == [0, 1, 2, 3]
    assert len(seen) == 8 and seen[4:] == seen[:4][::-1]  # the same networks and seeds, reversed
    assert [s for _, _, s in seen[:4]] == [3, 4, 5, 6]
    first = rows[rows["part"] == "network"]["measured_ms"].tolist()
    assert first == [8.0, 9.0, 10.0, 11.0]  # each keeps its faster (first) round


@pytest.mark.parametrize("spread, busy", [(0.089, True), (0.03, False)])
def test_a_busy_machine_is_named_next_to_the_scores(tmp_path, capsys, spread, busy):
    # seed 23 of the late calibration was measured while the host was busy (rounds a median 8.9 % apart)
    data = DATA / "cpu-2core-dec01-late"
    val = pd.read_csv(data / "validation-seed23.csv")
    val["round_spread"] = spread
    val.to_csv(tmp_path / "m.csv", index=False)
    assert (
        main(
            [
                "validate",
                "--target",
                str(data / "cpu-2core-dec01-late.toml"),
                "--measurements",
                str(tmp_path / "m.csv"),
                "--csv",
                str(tmp_path / "out.csv"),
                "--html",
                str(tmp_path / "out.html"),
                "-q",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert f"a median {100 * spread:.1f}% longer" in captured.out
    assert ("the machine was busy: a median round spread of 8.9% is more than 5%" in captured.err) == busy
    assert ("busy" in captured.err) == busy
    assert ("--host-check pairs" in captured.err) == busy


@pytest.mark.parametrize("paired, busy", [(0.021, False), (0.083, True)])
def test_pairs_that_held_the_drift_silence_the_busy_warning(tmp_path, capsys, paired, busy):
    data = DATA / "cpu-2core-dec01-pairs"
    val = pd.read_csv(data / "validation-seed28.csv")
    val = val[val["network_id"] < 8].assign(round_spread=0.171, paired_spread=paired)
    val.to_csv(tmp_path / "m.csv", index=False)
    assert (
        main(
            [
                "validate",
                "--target",
                str(data / "cpu-2core-dec01-pairs.toml"),
                "--measurements",
                str(tmp_path / "m.csv"),
                "--csv",
                str(tmp_path / "out.csv"),
                "--html",
                str(tmp_path / "out.html"),
                "-q",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "a median 17.1% longer" in captured.out and f"a median {100 * paired:.1f}% longer" in captured.out
    assert "networks x host" in captured.out and "timed pass by pass alongside it" in captured.out
    assert ("the machine was busy even for pairs" in captured.err) == busy and ("round spread" not in captured.err)


# ----------------------------------------------------------------------------- the commands


def test_calibrate_validate_and_search_on_the_calibrated_target(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "calibrate",
                "-o",
                "mine.toml",
                "--backbones",
                "resnet18",
                "--input-size",
                "32",
                "--batch-size",
                "1,2",
                "--budget-s",
                "4",
                "--rounds",
                "2",
                "--repeats",
                "1",
                "--threads",
                "1",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "fit on" in out and Path("mine.toml").is_file() and Path("mine.csv").is_file()
    assert "\nrounds: " in out and "longer than its fastest" in out
    t = load_target("./mine.toml")
    assert t.kind == "cpu" and t.threads == 1 and t.environment["backbones"] == "resnet18"
    assert t.fit["round_spread_median_pct"] >= 0 and t.fit["round_spread_p90_pct"] >= t.fit["round_spread_median_pct"]
    assert set(t.static_ms) == {"resnet18-32x32-b1", "resnet18-32x32-b2"}  # the plan's static networks
    cal = pd.read_csv("mine.csv")
    assert {"measured_ms", "device_name", "torch_version", "threads", "date", "batch_size"} <= set(cal.columns)

    # refit from the CSV gives the same target
    assert main(["calibrate", "-o", "again.toml", "--measurements", "mine.csv", "-q"]) == 0
    assert load_target("./again.toml").cpu == t.cpu

    assert (
        main(
            [
                "validate",
                "--target",
                "mine.toml",
                "--backbones",
                "resnet18",
                "--input-size",
                "32",
                "--count",
                "2",
                "--batch-size",
                "1",
                "--repeats",
                "1",
                "--rounds",
                "2",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "networks" in out and "Spearman" in out and "host speed:" in out and "\nrounds: 2 networks" in out
    val = pd.read_csv("validate-mine.csv")
    before, after = val["host_ratio_before"].iloc[0], val["host_ratio_after"].iloc[0]
    assert before > 0 and after > 0 and val["host_ratio_before"].nunique() == val["host_ratio_after"].nunique() == 1
    assert ("networks x host" in out) == (abs(before / after - 1) <= 0.03)
    assert set(val["part"]) >= {"network", "stage0", "block0.0", "block3.1"} and np.isfinite(val["predicted_ms"]).all()
    assert "\nblocks " in out
    html = Path("validate-mine.html").read_text()
    assert "plotly" in html[:100000] and all(t in html for t in ("whole networks", "single stages", "single blocks"))

    # each network followed by its static network: per-network host factors
    assert (
        main(
            [
                "validate",
                "--target",
                "mine.toml",
                "--backbones",
                "resnet18",
                "--input-size",
                "32",
                "--count",
                "1",
                "--batch-size",
                "2",
                "--repeats",
                "1",
                "--rounds",
                "1",
                "--host-check",
                "each",
                "--csv",
                "each.csv",
                "--html",
                "each.html",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "networks x host" in out and "each prediction scaled by its static network" in out
    assert (pd.read_csv("each.csv")["reference_ms"] > 0).all()
    assert (
        main(
            [
                "validate",
                "--target",
                "mine.toml",
                "--backbones",
                "resnet18",
                "--input-size",
                "32",
                "--count",
                "1",
                "--batch-size",
                "1",
                "--repeats",
                "1",
                "--rounds",
                "1",
                "--host-check",
                "none",
                "--csv",
                "none.csv",
                "--html",
                "none.html",
                "--no-blocks",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "host" not in out and "\nblocks " not in out and "\nrounds: " not in out  # one round
    none = pd.read_csv("none.csv")
    assert "host_ratio_before" not in none and not none["part"].str.startswith("block").any()

    # the measurements can be re-scored without measuring
    assert (
        main(
            [
                "validate",
                "--target",
                "mine.toml",
                "--measurements",
                "validate-mine.csv",
                "--csv",
                "re.csv",
                "--html",
                "re.html",
                "-q",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(pd.read_csv("re.csv")["predicted_ms"], val["predicted_ms"])
    assert "host speed:" in capsys.readouterr().out  # the recorded ratio is scored again

    assert (
        main(
            [
                "predict",
                json.dumps(ArchConfig.static("resnet18", 32).to_dict()),
                "--target",
                "./mine.toml",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "search",
                "--backbone",
                "resnet18",
                "--input-size",
                "32",
                "--target",
                "./mine.toml",
                "--trials",
                "6",
                "--batch-size",
                "1",
                "--storage",
                f"sqlite:///{tmp_path / 's.db'}",
                "-q",
            ]
        )
        == 0
    )


def test_host_speed_times_the_recorded_static_networks_again(monkeypatch):
    from dynas.kernels import calibrate as kc

    timed = []

    def fake_measure(cfg, n, device="cpu", repeats=5, warmup=1, seed=0):
        timed.append((cfg.backbone, n))
        return kc.Measurement(0.0, (), 0.0, 12.0 if n == 1 else 30.0, repeats)

    monkeypatch.setattr(kc, "measure", fake_measure)
    recorded = {"resnet18-64x64-b1": 10.0, "resnet18-64x64-b8": 40.0, "resnet50-64x64-b1": 5.0}
    rows = kc.host_speed(
        recorded,
        [("resnet18", 64, 1), ("resnet18", 64, 1), ("resnet18", 64, 8), ("resnet18", 64, 2), ("resnet34", 64, 1)],
    )
    # each recorded network once; unrecorded ones (batch 2, resnet34) are skipped
    assert timed == [("resnet18", 1), ("resnet18", 8)]
    assert [(r["key"], r["ratio"]) for r in rows] == [("resnet18-64x64-b1", 1.2), ("resnet18-64x64-b8", 0.75)]


@pytest.mark.parametrize("before, after, scaled", [(0.95, 0.96, True), (0.90, 1.00, False)])
def test_validate_scales_by_the_host_speed_only_when_it_held_steady(tmp_path, capsys, before, after, scaled):
    data = DATA / "cpu-2core-dec01-ops"
    df = pd.read_csv(data / "validation-seed18.csv")
    df = df[df["network_id"] < 6].assign(host_ratio_before=before, host_ratio_after=after)
    df.to_csv(tmp_path / "m.csv", index=False)
    assert (
        main(
            [
                "validate",
                "--target",
                str(data / "cpu-2core-dec01-ops.toml"),
                "--measurements",
                str(tmp_path / "m.csv"),
                "--csv",
                str(tmp_path / "v.csv"),
                "--html",
                str(tmp_path / "v.html"),
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"{before:.3f} x their calibrated time before" in out and f"{after:.3f} x after" in out
    assert ("networks x host" in out) == scaled and ("moved by more than 3%" in out) == (not scaled)


def test_run_plan_times_the_reference_after_each_item(monkeypatch):
    from dynas.kernels import calibrate as kc

    order = []
    monkeypatch.setattr(
        kc,
        "measure",
        lambda cfg, n, *a, **k: (
            order.append(("net", n)) or kc.Measurement(1.0, tuple(1.0 for _ in cfg.stages), 1.0, 6.0, 1)
        ),
    )
    items = list(itertools.islice(calibration_plan(["resnet18"], 32, (1, 2), seed=0), 3))
    rows = kc.run_plan(items, reference=lambda item: order.append(("ref", item.batch_size)) or 2.0 * item.batch_size)
    assert order == [("net", 1), ("ref", 1), ("net", 2), ("ref", 2), ("net", 1), ("ref", 1)]
    assert [r["reference_ms"] for r in rows if r["part"] == "network"] == [2.0, 4.0, 2.0]


def test_measure_runs_a_reference_pass_after_every_pass():
    import torch

    cfg = ArchConfig("resnet18", (32, 32), (StageConfig("layer", 0.5),) + (StageConfig(),) * 3)

    class Reference(torch.nn.Module):
        def forward(self, x):
            return x

    order = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: (
            order.append(type(mod).__name__) if type(mod).__name__ in ("DynamicNet", "Reference") else None
        )
    )
    try:
        m = measure(cfg, 2, repeats=3, warmup=2, reference=Reference())
    finally:
        hook.remove()
    assert order == ["DynamicNet", "Reference"] * 5  # after each of 2 warm-up and 3 timed passes
    assert m.reference_ms > 0
    assert math.isnan(measure(cfg, 1, repeats=1, warmup=0).reference_ms)


def test_run_plan_pairs_each_network_with_its_static_network(monkeypatch):
    from dynas.kernels import calibrate as kc
    from dynas.kernels import model as km

    built = []
    real_build = km.build_model
    monkeypatch.setattr(km, "build_model", lambda cfg: built.append(cfg) or real_build(cfg))
    items = validation_plan(("resnet18",), 32, (1, 2), count=2, seed=0)
    rows = pd.DataFrame(kc.run_plan(items, repeats=1, warmup=0, paired=True))
    nets = rows[rows["part"] == "network"]
    assert len(nets) == 4 and (nets["reference_ms"] > 0).all() and (rows["host_check"] == "pairs").all()
    # one static model serves every network of its backbone and input size, at every batch size
    assert [c for c in built if c == ArchConfig.static("resnet18", 32)] == [ArchConfig.static("resnet18", 32)]
    with pytest.raises(ConfigError, match=r"paired=True with a reference is out of range"):
        kc.run_plan(items, paired=True, reference=lambda item: 1.0)


def test_paired_times_are_fitted_in_units_of_the_quiet_host():
    from dynas.predictors.calibration import host_normalized

    true = cpu.CpuCosts(*(1.0 + (7 * i) % 11 for i in range(len(cpu.COST_FIELDS))))
    plan = list(itertools.islice(calibration_plan(("resnet18", "regnety_400mf"), 64, (1, 4), seed=0), 100))
    assert all(all(st.paradigm == "static" for st in i.config.stages) for i in plan[:4])  # static ones come first
    rng = random.Random(0)
    rows, quiet_ms = [], []
    for net, item in enumerate(plan):
        slow = 1.0 if net < 4 else 1.0 + 0.6 * rng.random()  # other load slowed the host while it ran
        p = predict(item.config, _target(true), item.batch_size)
        ref = predict(ArchConfig.static(item.config.backbone, 64), _target(true), item.batch_size).latency_ms
        parts = [("stem", -1, p.stem_ms), ("head", -1, p.head_ms), ("network", -1, p.latency_ms)]
        parts += [(f"stage{s}", s, st.latency_ms) for s, st in enumerate(p.stages)]
        for part, stage, ms in parts:
            rows.append(
                {
                    "network_id": net,
                    "backbone": item.config.backbone,
                    "input_h": 64,
                    "input_w": 64,
                    "config": item.config.to_json(indent=None),
                    "batch_size": item.batch_size,
                    "part": part,
                    "stage": stage,
                    "measured_ms": ms * slow,
                    "reference_ms": ref * slow,
                    "host_check": "pairs",
                }
            )
            quiet_ms.append(ms)
    df = pd.DataFrame(rows)
    norm = host_normalized(df)
    np.testing.assert_allclose(norm["raw_measured_ms"], df["measured_ms"])
    np.testing.assert_allclose(norm["measured_ms"], quiet_ms)  # the slow-down divided out
    unpaired = df.assign(host_check="each")
    pd.testing.assert_frame_equal(host_normalized(unpaired), unpaired)
    fitted = fit_target(df, "paired", {"threads": 2})
    assert fitted.fit["parts_mape_pct"] < 1e-3 and fitted.fit["host_normalized_networks"] == len(plan)
    cfg = ArchConfig("resnet18", (64, 64), (StageConfig("spatial", 0.35, spatial_granularity=2),) * 4)
    assert predict(cfg, fitted, 4).latency_ms == pytest.approx(predict(cfg, _target(true), 4).latency_ms, rel=1e-4)
    static = ArchConfig.static("regnety_400mf", 64)
    assert fitted.static_ms["regnety_400mf-64x64-b4"] == pytest.approx(predict(static, _target(true), 4).latency_ms)
    # the same times without their pairs: the host's drift lands in the fit
    assert fit_target(df.drop(columns="host_check"), "raw").fit["parts_mape_pct"] > 1.0


def test_calibrate_and_validate_in_pairs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "calibrate",
                "-o",
                "p.toml",
                "--backbones",
                "resnet18",
                "--input-size",
                "32",
                "--batch-size",
                "1",
                "--budget-s",
                "3",
                "--rounds",
                "2",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--host-check",
                "pairs",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    t = load_target("./p.toml")
    n = t.fit["host_normalized_networks"]
    assert n >= 1 and f"pairs: {n} networks fitted in units of the quietest host seen" in out
    assert "relative to its static network" in out and t.fit["paired_spread_median_pct"] >= 0
    cal = pd.read_csv("p.csv")
    assert (cal["host_check"] == "pairs").all() and (cal["reference_ms"] > 0).all()
    assert (
        main(
            [
                "validate",
                "--target",
                "p.toml",
                "--backbones",
                "resnet18",
                "--input-size",
                "32",
                "--count",
                "1",
                "--batch-size",
                "1",
                "--repeats",
                "1",
                "--rounds",
                "1",
                "--host-check",
                "pairs",
                "--csv",
                "v.csv",
                "--html",
                "v.html",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert all(f"{part} x host" in out for part in ("networks", "stages", "blocks"))
    assert "timed pass by pass alongside it" in out
    assert (pd.read_csv("v.csv")["host_check"] == "pairs").all()
    # a target calibrated in pairs is validated in pairs unless told otherwise
    assert (
        main(
            [
                "validate",
                "--target",
                "p.toml",
                "--backbones",
                "resnet18",
                "--input-size",
                "32",
                "--count",
                "1",
                "--batch-size",
                "1",
                "--repeats",
                "1",
                "--rounds",
                "1",
                "--no-blocks",
                "--csv",
                "d.csv",
                "--html",
                "d.html",
                "-q",
            ]
        )
        == 0
    )
    assert "timed pass by pass alongside it" in capsys.readouterr().out
    assert (pd.read_csv("d.csv")["host_check"] == "pairs").all()


def test_calibrate_pools_several_calibration_csvs(tmp_path, capsys):
    a = pd.read_csv(DATA / "cpu-2core-dec01-pairs" / "cpu-2core-dec01-pairs.csv")
    b = pd.read_csv(DATA / "cpu-2core-dec02-pairs" / "cpu-2core-dec02-pairs.csv")
    a, b = a[a["network_id"] < 40], b[b["network_id"] < 40]  # both start at id 0
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    assert (
        main(
            [
                "calibrate",
                "--measurements",
                f"{tmp_path / 'a.csv'},{tmp_path / 'b.csv'}",
                "-o",
                str(tmp_path / "pooled.toml"),
                "-q",
            ]
        )
        == 0
    )
    assert "read 80 networks" in capsys.readouterr().out
    pooled = load_target(str(tmp_path / "pooled.toml"))
    by_hand = fit_target(pd.concat([a, b.assign(network_id=b["network_id"] + 40)]), "by-hand")
    assert pooled.cpu == by_hand.cpu and pooled.static_ms == by_hand.static_ms
    assert pooled.fit["host_normalized_networks"] == 80 and pooled.environment["calibration_csv"] == "a.csv,b.csv"
    # the quiet reference is the fastest over both tables
    both = pd.concat([a, b])
    quiet = both[(both["backbone"] == "resnet18") & (both["batch_size"] == 1)]["reference_ms"].min()
    assert pooled.static_ms["resnet18-224x224-b1"] == pytest.approx(quiet, rel=0.1)


def test_static_ms_round_trips_and_bad_values_name_the_field(tmp_path):
    t = dataclasses.replace(_target(), static_ms={"resnet50-224x224-b1": 31.5})
    back = load_target(str(write_target(t, tmp_path / "t.toml")))
    assert back.static_ms == {"resnet50-224x224-b1": 31.5}
    bad = target_toml(t).replace("= 31.5", "= -2.0")
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(TargetError, match=r"static_ms.resnet50-224x224-b1=-2.0 is out of range"):
        load_target(str(tmp_path / "bad.toml"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "-o", "no/such/dir/t.toml"], "does not exist"),
        (["calibrate", "-o", "t.toml", "--backbones", "resnet7", "--budget-s", "1"], "'resnet7' is unknown"),
        (["calibrate", "-o", "t.toml", "--measurements", "missing.csv"], "cannot be read as CSV"),
        (["validate", "--target", "nope"], "target='nope' is unknown"),
        (["validate", "--target", "v100", "--configs", "missing.json"], "cannot be read"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynas: error:") and "\n" not in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_measuring_keeps_freed_memory_and_records_it():
    import platform

    from dynas.kernels.calibrate import environment, keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first  # set once per process
    assert environment()["malloc"] == first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first.startswith("glibc: trim off")
    else:
        assert first == "default"


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


def test_retest_separates_the_hosts_noise_from_the_models_error():
    data = DATA / "cpu-2core-dec01-pairs"
    first = pd.read_csv(data / "validation-seed32.csv")
    first = first[first["network_id"] < 12]  # 12 networks: 6 configs at batch 1 and 8
    # the same networks "measured again": 10 % slower, alongside a static network 10 % slower
    # (the host's drift, divided out), and one network 21 % slower (noise)
    second = first.assign(measured_ms=first["measured_ms"] * 1.1, reference_ms=first["reference_ms"] * 1.1)
    second.loc[second["network_id"] == 0, "measured_ms"] *= 1.1
    target = str(data / "cpu-2core-dec01-pairs.toml")
    same = retest_summary(first, first, target)
    assert same["networks"].sum() == 12
    # a table against itself: no noise, errors correlate fully (to the 2 decimals benchmarks/retest.py prints)
    assert same.set_index("batch_size")["noise_pct"].round(2).to_dict() == {1: 0.0, 8: 0.0}
    assert (same["error_corr"].round(2) == 1.0).all()
    moved = retest_summary(first, second, target).set_index("batch_size")["noise_pct"].round(2)
    n0 = int(first.loc[first["network_id"] == 0, "batch_size"].iloc[0])
    other = ({1, 8} - {n0}).pop()
    assert moved[n0] > 0 and moved[other] == 0  # network 0 moved, the rest only with the host
    # a table without pairs is refused in one line
    with pytest.raises(ConfigError, match=r"^second table: column 'reference_ms' is empty; allowed: .*pairs$"):
        retest_summary(first, first.drop(columns="reference_ms"), target)
    with pytest.raises(ConfigError, match=r"^second table: no network of the first table; allowed: .*--seed"):
        retest_summary(first, first.assign(batch_size=first["batch_size"] * 2), target)
