"""The CPU work model of DenseNet (predictors/cpu_dense.py): the operators it counts against those
the dense kernels dispatch, its expectations against simulated draws, and predictions on the
committed CPU target."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dynas.predictors import cpu, cpu_dense
from dynas.predictors.latency import predict
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import ArchConfig, StageConfig, budget_count, stage_runs
from tests.dispatch_counter import dispatched

_POOLED = "cpu-2core-dec02-pooled"
TARGET = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / _POOLED / f"{_POOLED}.toml"
SIZE = (64, 64)
T = cpu.TERMS
CHOICES = {
    "static": StageConfig(),
    "layer": StageConfig("layer", 0.5),
    "channel": StageConfig("channel", 0.5, channel_granularity=8),
    # one part per running sample: C(128, 64) selections never repeat
    "channel-g1": StageConfig("channel", 0.5, channel_granularity=1),
    "layer+channel": StageConfig("layer+channel", 0.5, channel_granularity=8, channel_rate=0.5),
}


def _config(stage: int, st: StageConfig) -> ArchConfig:
    return ArchConfig("densenet121", SIZE, tuple(st if s == stage else StageConfig() for s in range(4)))


def _drawn_pass(stage: int, st: StageConfig, n: int, seed: int):
    """A dense block and the transition after it run as in a network (fast path, channels-last,
    random gates): the operators of one pass, and what each layer's gates drew in it."""
    import torch

    from dynas.kernels.model import build_model

    torch.manual_seed(seed)
    model = build_model(_config(stage, st)).eval().to(memory_format=torch.channels_last)
    model.set_gate_mode("random")
    blk = model.features.get_submodule(f"denseblock{stage + 1}")
    trans = getattr(model.features, f"transition{stage + 1}", None)
    spec = model.spec.stage_blocks(stage)[0]
    x = torch.rand(n, spec.in_channels, *spec.in_hw).contiguous(memory_format=torch.channels_last)

    def run():
        y = blk(x)
        return trans(y) if trans is not None else y

    with torch.inference_mode():
        for _ in range(10):  # fill the cached weight layouts and BN statistics of every path the draws take
            run()
        counts, ops = dispatched(run)
    layers = list(blk.values())
    if st.paradigm == "static":
        return counts, ops, [[True] * n for _ in layers], None
    decs = [layer._last[1] for layer in layers]
    ran = [[bool(d["layer"][j] > 0.5) if "layer" in d else True for j in range(n)] for d in decs]
    sels = None
    if "channel" in decs[0]:
        sels = [[tuple(int(g) for g in (d["channel"][j] > 0.5).nonzero().flatten()) for j in range(n)] for d in decs]
    return counts, ops, ran, sels


@pytest.mark.parametrize("stage", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("choice", list(CHOICES))
def test_dense_work_model_counts_the_operators_the_kernels_dispatch(choice, n, stage):
    # on the draw the kernels made (warm caches): convolutions exactly, whether a row product
    # folds into a convolution included; matrix products of pixel rows at most the dispatched
    # products (the maskers' per-sample vector products dispatch as linear but are counted as
    # other operators); matrix products and the other operators together exactly (tolerance 0:
    # on torch 2.13 every draw of every choice here matched to the operator)
    st = CHOICES[choice]
    (conv, mm, other), ops, ran, sels = _drawn_pass(stage, st, n, seed=n + stage)
    blocks = get_backbone("densenet121", SIZE).stage_blocks(stage)
    w = cpu_dense.drawn_block_work(blocks, st, ran, sels)
    assert w[T.index("conv_calls")] + w[T.index("repeat_conv_calls")] == conv, dict(ops)
    assert w[T.index("mm_calls")] <= mm
    counted = w[T.index("mm_calls")] + w[T.index("op_calls")]
    assert counted == mm + other, (counted, mm + other, dict(ops))


def _simulated_draw(rng, depth: int, runs: int, n: int, st: StageConfig, width: int):
    """Which layers each sample runs (a uniform ``runs``-subset of the block's, per sample) and
    its selected channel groups per layer (uniform, as many as the budget gives)."""
    ran = np.zeros((depth, n), dtype=bool)
    for j in range(n):
        ran[rng.choice(depth, size=runs, replace=False), j] = True
    sels = None
    if "channel" in st.paradigm:
        groups = width // st.channel_granularity
        a = budget_count(st.channel_density, groups)
        sels = [
            [tuple(sorted(rng.choice(groups, size=a, replace=False).tolist())) for _ in range(n)] for _ in range(depth)
        ]
    return ran.tolist(), sels


@pytest.mark.parametrize(
    "st, n",
    [
        (StageConfig("layer", 0.5), 1),
        (StageConfig("layer", 0.5), 4),
        (StageConfig("layer", 0.25), 8),
        (StageConfig("layer+channel", 0.5, channel_granularity=8, channel_rate=0.5), 4),
        (StageConfig("channel", 0.5, channel_granularity=32), 4),  # 4 groups: C(4, 2) = 6 selections repeat
    ],
    ids=lambda v: v.short() if isinstance(v, StageConfig) else str(v),
)
def test_expected_work_is_the_average_over_draws(st, n):
    # layer_work's expectation (binomial running samples, the union of the part's produced
    # channels, the transition's unproduced ones) against the mean of drawn passes
    stage = 1
    blocks = get_backbone("densenet121", SIZE).stage_blocks(stage)
    runs = stage_runs(_config(stage, st))[stage]
    depth = len(blocks)
    expected = sum(cpu_dense.layer_work(b, depth, st, n, runs) for b in blocks)
    rng = np.random.default_rng(0)
    draws = [_simulated_draw(rng, depth, runs or depth, n, st, blocks[0].width) for _ in range(300)]
    mean = np.mean([cpu_dense.drawn_block_work(blocks, st, ran, sels) for ran, sels in draws], axis=0)
    for term in ("op_calls", "gather_melem", "stream_melem", "conv_io_melem", "mm_gmac", "smallmap_gmac"):
        assert expected[T.index(term)] == pytest.approx(mean[T.index(term)], rel=0.04), term
    calls = ("conv_calls", "repeat_conv_calls")
    assert sum(expected[T.index(c)] for c in calls) == pytest.approx(sum(mean[T.index(c)] for c in calls), rel=0.04)


def test_static_block_work_follows_torchvision():
    # every layer: cat, BN, ReLU, 1x1 conv, BN, ReLU, 3x3 conv; the block's cat; the transition
    blocks = get_backbone("densenet121", SIZE).stage_blocks(0)
    w = cpu_dense.drawn_block_work(blocks, StageConfig(), [[True]] * len(blocks), None)
    assert w[T.index("conv_calls")] == 2 * len(blocks) + 1
    assert w[T.index("op_calls")] == 5 * len(blocks) + 1 + 3
    macs = sum(b.in_channels * b.width + 9 * b.width * b.out_channels for b in blocks) * 16 * 16
    assert w[T.index("pointwise_gmac")] + w[T.index("conv3x3_gmac")] == pytest.approx(
        (macs + 256 * 128 * 16 * 16) * 1e-9
    )


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("paradigm", ["layer", "channel", "layer+channel"])
def test_densenet_is_predicted_on_the_committed_cpu_target_and_rises_with_rate(paradigm, n):
    static = predict(ArchConfig.static("densenet121"), str(TARGET), n)
    assert math.isfinite(static.latency_ms) and static.latency_ms > 0 and static.head_ms > 0
    last = 0.0
    for rate in (0.25, 0.5, 0.75):
        st = StageConfig(
            paradigm,
            rate,
            channel_granularity=8 if "channel" in paradigm else None,
            channel_rate=rate if "+" in paradigm else None,
        )
        pred = predict(ArchConfig("densenet121", (224, 224), (st,) * 4), str(TARGET), n)
        assert math.isfinite(pred.latency_ms) and pred.latency_ms > last
        assert 0 < pred.expected_gflops < pred.dense_gflops
        last = pred.latency_ms


def test_head_counts_norm5():
    with_norm = cpu.head_work(1024, (7, 7), 1000, 2, norm=True)
    without = cpu.head_work(1024, (7, 7), 1000, 2)
    assert with_norm[T.index("stream_melem")] - without[T.index("stream_melem")] == pytest.approx(
        4 * 2 * 1024 * 49 * 1e-6
    )
    assert with_norm[T.index("op_calls")] - without[T.index("op_calls")] == 2


def test_search_on_a_cpu_target_accepts_densenet(tmp_path):
    from optuna.trial import TrialState

    from dynas.search.study import SearchOptions, run_search

    opts = SearchOptions(
        backbone="densenet121",
        target=str(TARGET),
        batch_size=1,
        trials=4,
        sampler="random",
        storage=f"sqlite:///{tmp_path / 'search.db'}",
        show_progress=False,
    )
    study = run_search(opts)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 4
