"""Early exits: config, predictor, policies that really halt, thresholds, loss, the hard data set."""

from __future__ import annotations

import collections
import contextlib
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
from optuna.trial import create_trial
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dynas.errors import ConfigError
from dynas.kernels import build_model
from dynas.kernels.data import check_data_spec, load_data
from dynas.kernels.exits import ExitHead, exit_accuracies, exit_outputs, fit_thresholds, with_thresholds
from dynas.kernels.recipe import distillation_loss, exit_loss
from dynas.kernels.synthetic import HARD_CLASSES, hard_synthetic_images
from dynas.predictors import cpu
from dynas.predictors.exits import gpu_head_ms, head_flops
from dynas.predictors.latency import _hw, predict
from dynas.predictors.targets import load_target
from dynas.predictors.thresholds import budget_curve, exit_at, thresholds_for_budget, thresholds_for_p
from dynas.results import export_trial
from dynas.spaces.config import ArchConfig, load_config

SIZE = 64  # resnet18 stage maps 16 / 8 / 4 / 2
CPU_TARGET = str(Path(__file__).resolve().parent / "data" / "cpu-2core-dec01-late" / "cpu-2core-dec01-late.toml")
STATIC4 = [{"paradigm": "static"}] * 4
DYNAMIC4 = [
    {"paradigm": "channel", "channel_granularity": 8, "rate": 0.5},
    {"paradigm": "static"},
    {"paradigm": "layer", "rate": 0.5},
    {"paradigm": "spatial", "spatial_granularity": 1, "rate": 0.5},
]


def _cfg(stages=STATIC4, exits=(0, 1, 2), **extra) -> ArchConfig:
    return ArchConfig.from_dict(
        {"backbone": "resnet18", "input_size": SIZE, "stages": stages, "exits": list(exits), **extra}
    )


def _model(cfg: ArchConfig, seed: int = 0) -> torch.nn.Module:
    """An eval model with non-trivial BN statistics (so that mistakes show in the outputs)."""
    torch.manual_seed(seed)
    model = build_model(cfg).set_num_classes(10)
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval().set_gate_mode("budget")


class _ConvCount(TorchDispatchMode):
    """Counts the convolutions dispatched (as the kernels' dispatch-counter test does)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in (
            "convolution",
            "mkldnn_convolution",
            "conv2d",
            "_convolution_transpose_pointwise",
        ):
            self.convs += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _stage_batches(model):
    """Yields stage -> batch sizes its first block ran on (forward pre-hooks while inside)."""
    seen: dict[int, list[int]] = collections.defaultdict(list)
    hooks = [
        model.stage_modules(s)[0].register_forward_pre_hook(lambda m, a, s=s: seen[s].append(a[0].shape[0]))
        for s in range(model.spec.num_stages)
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- config


def test_exits_round_trip_and_old_configs_unchanged():
    cfg = _cfg(exits=(0, 2), exit_head="conv", exit_width=64, exit_thresholds=[0.9, 0.5])
    d = json.loads(cfg.to_json())
    assert (
        d["exits"] == [0, 2]
        and d["exit_head"] == "conv"
        and d["exit_width"] == 64
        and d["exit_thresholds"] == [0.9, 0.5]
    )
    assert load_config(cfg.to_json()) == cfg and load_config(d) == cfg
    light = _cfg(exits=(1,))
    assert "exit_width" not in light.to_dict() and light.exit_head == "light"
    old = {"backbone": "resnet18", "input_size": SIZE, "stages": DYNAMIC4}
    cfg_old = load_config(old)
    assert set(cfg_old.to_dict()) == {"backbone", "input_size", "stages"}
    assert cfg_old == ArchConfig(cfg_old.backbone, cfg_old.input_size, cfg_old.stages)
    assert hash(cfg_old) == hash(ArchConfig(cfg_old.backbone, cfg_old.input_size, cfg_old.stages))
    assert cfg_old.short() == "C8@0.50 | static | L@0.50 | S1@0.50" and "exits 1 light" in light.short()


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"exits": [3]}, "stage 3 is the last stage, whose exit is the network's own head"),
        ({"exits": [7]}, "stage 7 does not exist in resnet18"),
        ({"exits": [-1]}, "stage -1 does not exist"),
        ({"exits": [1, 1]}, "lists stage 1 twice"),
        ({"exits": [2, 0]}, "not in increasing order"),
        ({"exits": [0.5]}, "is not a stage index"),
        ({"exits": [0], "exit_head": "big"}, "exit_head='big' is unknown; allowed: light, conv"),
        ({"exits": [0], "exit_width": 32}, "not used by exit_head 'light'"),
        ({"exits": [0], "exit_head": "conv", "exit_width": 0}, "exit_width=0"),
        ({"exits": [0, 1], "exit_thresholds": [0.5]}, "exit_thresholds has 1 entries; allowed: exactly 2"),
        ({"exits": [0], "exit_thresholds": [1.5]}, "exit_thresholds[0]=1.5 is out of range"),
        ({"exit_head": "conv"}, "'exit_head' needs 'exits'"),
        ({"exits": 1}, "exits=1 is not a list"),
    ],
)
def test_bad_exits_get_one_line(extra, message):
    with pytest.raises(ConfigError) as err:
        ArchConfig.from_dict({"backbone": "resnet18", "input_size": SIZE, "stages": STATIC4, **extra})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_export_keeps_exits_and_thresholds(tmp_path):
    cfg = _cfg(exits=(0, 2), exit_head="conv", exit_thresholds=[0.8, 0.6])
    pred = predict(cfg, "v100", 8).to_dict()
    study = optuna.create_study(directions=["minimize", "maximize"], study_name="exits")
    for k, v in {
        "backbone": "resnet18",
        "target": "v100",
        "batch_size": 8,
        "proxy": "prior",
        "static_top1": 70.0,
    }.items():
        study.set_user_attr(k, v)
    study.add_trial(
        create_trial(values=[pred["latency_ms"], 70.0], user_attrs={"config": cfg.to_dict(), "prediction": pred})
    )
    data = export_trial(study, 0, tmp_path / "e.json")
    assert load_config(tmp_path / "e.json") == cfg
    assert [e["after_stage"] for e in data["predictions"]["exits"]] == [0, 2, 3]


# ----------------------------------------------------------------------------- predictor


@pytest.mark.parametrize("target", ["v100", CPU_TARGET])
@pytest.mark.parametrize("head", ["light", "conv"])
def test_each_exit_is_cumulative_and_the_last_is_the_network(target, head):
    cfg = _cfg(DYNAMIC4, exit_head=head)
    pred = predict(cfg, target, 4)
    exits = pred.exits
    assert [e.after_stage for e in exits] == [0, 1, 2, 3] and [e.head for e in exits] == [head] * 3 + ["own"]
    last = exits[-1]
    assert last.latency_ms == pred.latency_ms and last.flops == pytest.approx(pred.expected_gflops * 1e9)
    heads_before = 0.0
    for e in exits[:-1]:
        body = pred.stem_ms + sum(p.latency_ms for p in pred.stages[: e.after_stage + 1])
        assert e.latency_ms == pytest.approx(body + e.head_ms) and e.head_ms > 0
        assert e.anytime_latency_ms == pytest.approx(e.latency_ms + heads_before)
        assert e.latency_ms_per_image == pytest.approx(e.latency_ms / 4)
        heads_before += e.head_ms
    assert last.anytime_latency_ms == pytest.approx(pred.latency_ms + heads_before)
    assert all(a.latency_ms < b.latency_ms and a.flops < b.flops for a, b in zip(exits, exits[1:]))
    rows = pred.to_dict()["exits"]
    assert {"after_stage", "latency_ms", "latency_ms_per_image", "flops"} <= set(rows[0])
    # the network's own numbers do not depend on its exits
    plain = predict(load_config({"backbone": "resnet18", "input_size": SIZE, "stages": DYNAMIC4}), target, 4)
    assert plain.latency_ms == pred.latency_ms and "exits" not in plain.to_dict()


@pytest.mark.parametrize("head", ["light", "conv"])
def test_exit_head_flops_are_torchs_count(head):
    head_module = ExitHead(128, 1000, head, 64)
    with FlopCounterMode(display=False) as fc:
        head_module(torch.randn(1, 128, 8, 8))
    assert fc.get_total_flops() == head_flops(128, (8, 8), 1000, 64 if head == "conv" else 0)


def test_exit_heads_are_modelled_like_the_own_head():
    # on a CPU target the light head's work is the own head's; the conv head adds a 1x1 conv's
    np.testing.assert_array_equal(cpu.exit_head_work(512, (2, 2), 1000, 4), cpu.head_work(512, (2, 2), 1000, 4))
    conv = cpu.exit_head_work(64, (16, 16), 1000, 4, width=128) - cpu.head_work(128, (16, 16), 1000, 4)
    T = cpu.TERMS
    assert conv[T.index("conv_calls")] == 1 and conv[T.index("pointwise_gmac")] == pytest.approx(
        4 * 256 * 64 * 128 * 1e-9
    )
    # on a GPU target the light head on the last stage's map costs what the own head costs
    pred = predict(_cfg(exits=(2,)), "v100", 4)
    spec = pred.config.spec
    assert gpu_head_ms(_hw(load_target("v100")), spec.head_in, spec.stage_out_hw(3), 1000, 4) == pytest.approx(
        pred.head_ms
    )
    assert pred.exits[0].head_ms == pytest.approx(gpu_head_ms(_hw(load_target("v100")), 256, (4, 4), 1000, 4))


# ----------------------------------------------------------------------------- the model


def test_training_returns_every_exit_and_no_exits_is_unchanged():
    model = build_model(_cfg(DYNAMIC4)).set_num_classes(10).train()
    outs = model(torch.randn(2, 3, SIZE, SIZE))
    assert isinstance(outs, list) and [tuple(o.shape) for o in outs] == [(2, 10)] * 4
    loss = exit_loss(outs, torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for h in model.exit_heads for p in h.parameters())
    plain = build_model({"backbone": "resnet18", "input_size": SIZE, "stages": DYNAMIC4})
    assert isinstance(plain(torch.randn(2, 3, SIZE, SIZE)), torch.Tensor) and len(plain.exit_heads) == 0
    with pytest.raises(ConfigError, match="has no exits"):
        plain.set_exit_policy("budget", budget_ms=1.0, target="v100")


def test_static_weights_load_with_the_exit_heads_reported():
    model = build_model(_cfg())
    static = build_model(ArchConfig.static("resnet18", SIZE)).state_dict()
    res = model.load_pretrained(static, strict=True)
    assert res.missing_keys == [] and res.exit_keys and all(k.startswith("exit_heads.") for k in res.exit_keys)


@pytest.mark.parametrize("stages", [STATIC4, DYNAMIC4], ids=["static", "dynamic"])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_budget_halts_at_the_deepest_fitting_exit_and_runs_nothing_after(stages, path):
    cfg = _cfg(stages)
    model = _model(cfg).set_path(path)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model.set_exit_policy("all")(x)  # every exit computed: the reference
        full = _ConvCount()
        with full:
            model.set_exit_policy("final")(x)
        exits = predict(cfg, "v100", 3).exits
        for e in exits:
            budget = e.latency_ms * 1.0001  # fits this exit, not the next
            count = _ConvCount()
            with _stage_batches(model) as seen, count:
                out = model.set_exit_policy("budget", budget_ms=budget, target="v100")(x)
            assert model.last_exit.tolist() == [e.exit] * 3
            torch.testing.assert_close(out, ref[e.exit], atol=1e-5, rtol=1e-5)
            assert sorted(seen) == list(range(e.after_stage + 1))  # later stages never started
            if stages is STATIC4:  # stem + 2 convs per block + downsamples of the stages run
                blocks = [b for b in model.spec.blocks if b.stage <= e.after_stage]
                assert count.convs == 1 + sum(2 + b.has_downsample for b in blocks)
            assert count.convs < full.convs or e.exit == len(exits) - 1
    with pytest.raises(ConfigError, match=r"below the first exit's cost \(after stage 0\) at batch 3"):
        model.set_exit_policy("budget", budget_ms=exits[0].latency_ms * 0.5, target="v100")(x)


def test_halting_after_stage_1_of_4_skips_the_later_stages_work():
    model = _model(_cfg(exits=(1,)))
    x = torch.randn(2, 3, SIZE, SIZE)
    budget = predict(model.config, "v100", 2).exits[0].latency_ms
    with torch.no_grad():
        halted, full = _ConvCount(), _ConvCount()
        with halted:
            model.set_exit_policy("budget", budget_ms=budget, target="v100")(x)
        with full:
            model.set_exit_policy("final")(x)
    assert (halted.convs, full.convs) == (10, 20)  # stem 1 + stage 0: 4 + stage 1: 5, of 1 + 4 + 5 + 5 + 5


class _UnitClock:
    """A clock that only the units move: each unit takes ``factor`` x its predicted time."""

    def __init__(self, model, costs: dict, factor: float) -> None:
        self.t_ms = 0.0
        units = [(model.conv1, costs["stem"])]
        units += [(blk, costs["blocks"][blk.spec.stage][blk.spec.index]) for blk in model.blocks()]
        units += [(head, ms) for head, ms in zip(list(model.exit_heads) + [model.fc], costs["heads"])]
        for module, ms in units:
            module.register_forward_pre_hook(lambda m, a, ms=ms: self._advance(factor * ms))

    def _advance(self, ms: float) -> None:
        self.t_ms += ms

    def __call__(self) -> float:
        return self.t_ms / 1e3


@pytest.mark.parametrize("factor", [0.5, 1.0, 3.0])  # the predictor over-, exactly, under-estimates
@pytest.mark.parametrize("share", [0.3, 0.6, 1.2])  # the deadline as a share of the predicted whole
def test_deadline_stops_before_a_unit_that_would_pass_it(factor, share):
    cfg = _cfg(DYNAMIC4)
    model = _model(cfg)
    x = torch.randn(2, 3, SIZE, SIZE)
    exits = predict(cfg, "v100", 2).exits
    deadline = max(exits[0].anytime_latency_ms, share * exits[-1].anytime_latency_ms)
    policy = model.set_exit_policy("deadline", deadline_ms=deadline, target="v100").exit_policy
    costs = policy.unit_costs(cfg, 2)
    policy.clock = _UnitClock(model, costs, factor)
    with torch.no_grad():
        ref = model.set_exit_policy("all")(x)
        model.exit_policy = policy
        out = model(x)
    trace, k = model.last_trace, int(model.last_exit[0])
    torch.testing.assert_close(out, ref[k], atol=1e-5, rtol=1e-5)
    prefix = 1 + len(model.stage_modules(0)) + 1  # stem, stage 0's blocks, the first exit: always run
    for name, predicted, start, _end in trace[prefix:]:
        assert start + predicted <= deadline + 1e-9, name  # started only when predicted to end in time
    name, predicted, start, end = trace[-1]
    # the guarantee: overrun <= the last unit's own time, unless the prefix alone passed the deadline
    assert end <= deadline + (end - start) + 1e-9 or (len(trace) == prefix and factor > 1)
    order = ["stem"] + [f"stage {b.stage} block {b.index}" for b in model.spec.blocks]
    for s in range(4):
        order.insert(order.index(f"stage {s} block {model.spec.stage_depth(s) - 1}") + 1, f"exit {s}")
    assert [u[0] for u in trace] == order[: len(trace)]
    if len(trace) < len(order):  # it stopped: the next unit was predicted to pass the deadline
        nxt = order[len(trace)]
        nxt_ms = (
            costs["stem"]
            if nxt == "stem"
            else costs["heads"][int(nxt[5:])]
            if nxt.startswith("exit")
            else costs["blocks"][int(nxt.split()[1])][int(nxt.split()[3])]
        )
        assert trace[-1][3] + nxt_ms > deadline
    else:
        assert k == 3
    if factor <= 1.0:  # an exact or pessimistic predictor never overruns
        assert trace[-1][3] <= deadline + 1e-9


def test_deadline_on_the_real_clock_stops_early_within_its_guarantee():
    # one thread: on a host other processes load, two spinning OpenMP threads made single passes
    # of this network 3-25x slower than their neighbours, which no deadline derived from them survives
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _deadline_on_the_real_clock()
    finally:
        torch.set_num_threads(threads)


def _deadline_on_the_real_clock():
    cfg = _cfg(STATIC4)
    model = _model(cfg)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        model.set_exit_policy("deadline", deadline_ms=1e6, target=CPU_TARGET)
        model(x)  # warm-up
        full_ms = []
        for _ in range(3):  # the fastest of three full passes: a pass slowed by other load would set a deadline
            model(x)  # the next pass could meet without halting
            assert int(model.last_exit[0]) == 3 and len(model.last_trace) == 1 + len(model.spec.blocks) + 4
            full_ms.append(model.last_trace[-1][3])
        deadline = min(full_ms) / 2
        model.set_exit_policy("deadline", deadline_ms=deadline, target=CPU_TARGET)(x)
    trace = model.last_trace
    name, predicted, start, end = trace[-1]
    assert int(model.last_exit[0]) < 3
    assert end <= deadline + (end - start) or len(trace) == 1 + len(model.stage_modules(0)) + 1


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("stages", [STATIC4, DYNAMIC4], ids=["static", "dynamic"])
def test_confidence_policy_really_skips_and_matches_the_reference(batch, stages):
    cfg = _cfg(stages)
    model = _model(cfg, seed=1)
    torch.manual_seed(2)
    x = torch.randn(batch, 3, SIZE, SIZE) * torch.linspace(0.2, 3.0, batch).view(batch, 1, 1, 1)
    with torch.no_grad():
        ref = model.set_exit_policy("all")(x)
        conf = torch.stack([F.softmax(o, 1).amax(1) for o in ref])  # [4, batch]
        # thresholds half-way between sorted confidences: about a third leave at each early exit
        thresholds = []
        for k in range(3):
            c = conf[k].sort().values
            i = min(len(c) - 1, max(1, (2 * len(c)) // 3))
            thresholds.append(float((c[i - 1] + c[i]) / 2) if len(c) > 1 else float(c[0]) - 1e-6)
        with _stage_batches(model) as seen:
            out = model.set_exit_policy("confidence", thresholds=thresholds)(x)
    # reference: first exit whose confidence reaches its threshold, the own head otherwise
    want = torch.as_tensor(exit_at(conf.double().numpy(), thresholds))
    assert model.last_exit.tolist() == want.tolist()
    picked = torch.stack([ref[int(k)][i] for i, k in enumerate(want)])
    torch.testing.assert_close(out, picked, atol=1e-5, rtol=1e-5)
    running = batch
    for s in range(4):  # every stage ran on exactly the samples no earlier exit had taken
        assert seen[s] == ([running] if running else [])
        if s < 3:
            running -= int((want == s).sum())


def test_confidence_thresholds_come_from_the_config_and_must_fit_it():
    cfg = _cfg(exit_thresholds=[1.0, 1.0, 0.0])
    model = _model(cfg)
    with torch.no_grad():
        model.set_exit_policy("confidence")(torch.randn(3, 3, SIZE, SIZE))
    assert model.last_exit.tolist() == [2, 2, 2]  # threshold 0: every sample left at exit 2
    with pytest.raises(ConfigError, match="thresholds for a different config"):
        model.set_exit_policy("confidence", thresholds=[0.5, 0.5])
    with pytest.raises(ConfigError, match="no exit_thresholds"):
        _model(_cfg()).set_exit_policy("confidence")
    with pytest.raises(ConfigError, match="exit_thresholds\\[1\\]=2"):
        model.set_exit_policy("confidence", thresholds=[0.5, 2, 0.5])
    with pytest.raises(ConfigError, match="unknown; allowed: final, all, budget, deadline, confidence"):
        model.set_exit_policy("fastest")


# ----------------------------------------------------------------------------- thresholds


def test_thresholds_follow_msdnets_procedure_by_hand():
    # 3 exits, 10 samples; p = 1: shares 1/3 each -> floor(10/3) = 3 samples leave at each early exit
    conf = np.array(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
            [0.1, 0.2, 0.3, 0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35],
            [0.5] * 10,
        ]
    )
    t = thresholds_for_p(conf, 1.0)
    assert t == (0.7, 0.75)  # exit 0: 3rd most confident; exit 1: 3rd among samples 3..9
    assert exit_at(conf, t).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert thresholds_for_p(conf, 0.0) == (0.0, 0.0) and exit_at(conf, (0.0, 0.0)).tolist() == [0] * 10


def test_thresholds_for_a_budget_meet_it_and_trade_accuracy_for_latency():
    rng = np.random.default_rng(0)
    n = 400
    conf = np.sort(rng.uniform(0.1, 1.0, (3, n)), axis=0)  # later exits more confident
    correct = rng.uniform(size=(3, n)) < np.array([[0.5], [0.7], [0.9]])  # and more accurate
    costs = [1.0, 2.0, 4.0]
    curve = budget_curve(conf, correct, costs, [1.0, 1.5, 2.5, 4.0, 10.0], first_stage=0)
    for r in curve:
        assert r.mean_latency_ms <= r.budget_ms + 1e-12 and abs(sum(r.shares) - 1) < 1e-12
        at = exit_at(conf, r.thresholds)
        assert r.accuracy == pytest.approx(correct[at, np.arange(n)].mean())
        assert r.mean_latency_ms == pytest.approx(np.mean(np.asarray(costs)[at]))
    assert curve[0].shares[0] == 1.0 and curve[0].p == 0.0  # the first exit's own cost: everything leaves there
    assert [r.accuracy for r in curve] == sorted(r.accuracy for r in curve)
    assert curve[-1].accuracy >= correct[2].mean() - 1e-12
    with pytest.raises(ConfigError, match=r"below the first exit's cost \(the exit after stage 0\): 1 ms per image"):
        thresholds_for_budget(conf, correct, costs, 0.5, first_stage=0)
    with pytest.raises(ConfigError, match="costs_ms"):
        thresholds_for_budget(conf, correct, [1.0, 2.0], 3.0)


def test_fit_thresholds_on_a_model_writes_a_config_the_policy_runs():
    cfg = _cfg(exits=(0, 2))
    model = _model(cfg)
    torch.manual_seed(0)
    data = [(torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 10, (8,))) for _ in range(2)]
    exits = predict(cfg, CPU_TARGET, 8).exits
    mid = (exits[0].anytime_latency_ms_per_image + exits[-1].anytime_latency_ms_per_image) / 2
    fitted = fit_thresholds(model, data, CPU_TARGET, [mid], batch_size=8)[0]
    assert fitted.mean_latency_ms <= mid and len(fitted.thresholds) == 2
    new = with_thresholds(cfg, fitted)
    assert load_config(new.to_json()).exit_thresholds == fitted.thresholds
    model.config = new
    conf, hit = exit_outputs(model, data)
    assert conf.shape == hit.shape == (3, 16)
    assert exit_accuracies(model, data) == pytest.approx(hit.float().mean(1).tolist())
    with torch.no_grad():
        model.set_exit_policy("confidence")(data[0][0])
    # thresholds are validation confidences: compare where no confidence sits on its threshold
    c = conf[:2, :8].double().numpy()
    clear = (np.abs(c - np.asarray(fitted.thresholds)[:, None]) > 1e-5).all(axis=0)
    want = exit_at(conf[:, :8].double().numpy(), fitted.thresholds)
    assert clear.any() and (model.last_exit.numpy()[clear] == want[clear]).all()
    with pytest.raises(ConfigError, match="below the first exit's cost"):
        fit_thresholds(model, data, CPU_TARGET, [exits[0].anytime_latency_ms_per_image / 2], batch_size=8)


# ----------------------------------------------------------------------------- loss and data


def test_exit_loss_is_the_weighted_sum_plus_distillation_from_the_final_exit():
    torch.manual_seed(0)
    outs = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    want = sum(w * F.cross_entropy(o, y) for w, o in zip((0.5, 1.0, 2.0), outs))
    want = want + 0.5 * (distillation_loss(outs[0], outs[2]) + distillation_loss(outs[1], outs[2])) / 2
    got = exit_loss(outs, y, weights=(0.5, 1.0, 2.0))
    torch.testing.assert_close(got, want)
    teacher = torch.randn(4, 5)
    assert not torch.allclose(exit_loss(outs, y, teacher_logits=teacher), exit_loss(outs, y))
    exit_loss(outs, y, kd_weight=0.0).backward()
    with pytest.raises(ConfigError, match="one per exit"):
        exit_loss(outs, y, weights=(1.0, 1.0))
    with pytest.raises(ConfigError, match="list of every exit's logits"):
        exit_loss(outs[0], y)


def test_hard_synthetic_set_is_seeded_and_registered():
    x, y = hard_synthetic_images(64, (48, 48), seed=3)
    x2, y2 = hard_synthetic_images(64, (48, 48), seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (64, 3, 48, 48)
    assert set(y.tolist()) <= set(range(HARD_CLASSES)) and len(set(y.tolist())) == HARD_CLASSES
    splits = load_data("synthetic-hard:32", (32, 32), 8, seed=1)
    assert splits.num_classes == HARD_CLASSES and sum(len(b[1]) for b in splits.val) == 256
    assert check_data_spec(" synthetic-hard ") == "synthetic-hard"
    with pytest.raises(ConfigError, match="allowed: synthetic-hard:N"):
        check_data_spec("synthetic-hard:x")


def test_hard_set_puts_the_target_in_its_labelled_half():
    # the target (the largest object, drawn last) is the class's half: count its pixels per half
    x, y = hard_synthetic_images(32, (64, 64), seed=0, clutter=0, noise=0.0)
    on = x.abs().sum(1) > 0  # [n, H, W] object pixels
    top, bottom = on[:, :32].sum((1, 2)), on[:, 32:].sum((1, 2))
    assert ((bottom > top) == (y % 2).bool()).all()


def test_finetune_proxy_records_each_exits_top1(monkeypatch):
    # the proxy's trainer is wired for exits elsewhere; a minimal exit-aware one stands in for it here
    from dynas.kernels import finetune as ft

    def exit_finetune(model, batches, steps, *, lr=0.05, teacher=None, checkpoints=(), on_checkpoint=None, **_):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        for step in range(steps):
            x, y = next(batches)
            out = model(x)
            loss = exit_loss(out, y) if isinstance(out, list) else F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_checkpoint is not None and step + 1 in checkpoints:
                on_checkpoint(step + 1)

    monkeypatch.setattr(ft, "finetune", exit_finetune)
    proxy = ft.FinetuneProxy(data="synthetic:16", steps=2, batch_size=8, checkpoints=1, pretrain_steps=1)
    cfg = load_config({"backbone": "resnet18", "input_size": 32, "stages": STATIC4, "exits": [1]})
    result = proxy.evaluate(cfg)
    rows = result.attrs["exit_top1"]
    assert [r["after_stage"] for r in rows] == [1, 3] and all(0 <= r["top1"] <= 100 for r in rows)
    assert rows[-1]["top1"] == pytest.approx(result.top1)  # the own head's is the proxy's score
    plain = proxy.evaluate(load_config({"backbone": "resnet18", "input_size": 32, "stages": STATIC4}))
    assert "exit_top1" not in plain.attrs
