"""The finetune proxy, its data plugins, multi-objective early stopping, and their search plumbing."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from dynas.errors import ConfigError
from dynas.kernels.data import check_data_spec, load_data
from dynas.kernels.finetune import MIN_REALISED_RATE, FinetuneProxy
from dynas.kernels.trainer import realised_rates
from dynas.predictors.proxy import Reporter, StopTrial, get_proxy
from dynas.results import checkpoints_table, export_trial, hypervolume
from dynas.search.stopping import STOPPERS, Peer, StopRule, make_stopper
from dynas.search.study import SearchOptions, finished_trials, run_search
from dynas.spaces.config import ArchConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DYNAS = str(Path(sys.executable).with_name("dynas"))
sys.path.insert(0, str(ROOT))

TINY = dict(data="synthetic:64", steps=4, batch_size=8, checkpoints=2, pretrain_steps=2)
CFG = load_config(
    {
        "backbone": "resnet18",
        "input_size": 32,
        "stages": [
            {"paradigm": "spatial", "spatial_granularity": 2, "rate": 0.5},
            {"paradigm": "layer+channel", "channel_granularity": 16, "rate": 0.5, "channel_rate": 0.5},
            {"paradigm": "layer", "rate": 0.5},
            {"paradigm": "static"},
        ],
    }
)


class Recorder(Reporter):
    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple[int, float, bool]] = []
        self.stop_at = stop_at

    def report(self, step: int, top1: float, final: bool = False) -> None:
        self.calls.append((step, top1, final))
        if step == self.stop_at:
            raise StopTrial(step, "test stop")


@pytest.fixture(scope="module")
def proxy():
    torch.set_num_threads(2)
    p = FinetuneProxy(**TINY)
    p.static_score(ArchConfig.static("resnet18", 32))
    return p


# ----------------------------------------------------------------------------- data


def test_synthetic_data_is_seeded_and_shaped():
    a = load_data("synthetic:64", (32, 32), batch_size=8, seed=3)
    b = load_data("synthetic:64", (32, 32), batch_size=8, seed=3)
    assert a.num_classes == 10
    xa, ya = next(a.train_batches())
    xb, yb = next(b.train_batches())
    assert xa.shape == (8, 3, 32, 32) and ya.shape == (8,)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sum(len(y) for _, y in a.val) == 256  # held-out split: at least 256


def test_train_batches_restart_the_same_sequence():
    d = load_data("synthetic:64", (32, 32), batch_size=8, seed=0)
    first = [y for _, (_, y) in zip(range(10), d.train_batches())]  # 10 batches: crosses an epoch (8 per epoch)
    again = [y for _, (_, y) in zip(range(10), d.train_batches())]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[8])  # the next epoch is reshuffled


def test_tensor_file_data(tmp_path):
    x, y = torch.rand(20, 3, 32, 32), torch.randint(0, 4, (20,))
    path = tmp_path / "d.pt"
    torch.save(
        {"train_images": x[:12], "train_labels": y[:12], "val_images": x[12:], "val_labels": y[12:], "num_classes": 4},
        path,
    )
    d = load_data(str(path), (32, 32), batch_size=5)
    assert d.num_classes == 4
    assert sum(len(b) for _, b in d.val) == 8
    with pytest.raises(ConfigError, match=r"are 32x32; allowed: the search's input size 64x64"):
        load_data(str(path), (64, 64), batch_size=5)
    torch.save({"train_images": x}, path)
    with pytest.raises(ConfigError, match=r"holds \['train_images'\]; allowed: a dict with keys"):
        load_data(str(path), (32, 32), batch_size=5)


def make_loaders(input_size, batch_size, seed):
    """An entry point for --data: 3 classes, tiny."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(12, 3, *input_size, generator=g), torch.arange(12) % 3
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size), torch.utils.data.DataLoader(ds, batch_size=4)


def test_entry_point_data():
    d = load_data("tests.test_finetune:make_loaders", (32, 32), batch_size=6)
    assert d.num_classes == 3  # 1 + the largest held-out label
    assert next(d.train_batches())[0].shape == (6, 3, 32, 32)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "is not a data spec"),
        ("imagenet", "neither a file nor a known data set"),
        ("synthetic:0", "must be an integer >= 1"),
        ("synthetic:x", "must be an integer >= 1"),
        ("nosuchmodule_xyz:f", "cannot be loaded"),
    ],
)
def test_bad_data_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        load_data(spec, (32, 32), batch_size=4)


def test_a_directory_is_an_image_folder(tmp_path):
    # a folder is the ImageFolder layout (tests/test_fulltrain.py trains on one); an empty one is refused on load
    assert check_data_spec(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ConfigError, match="is an empty folder"):
        load_data(str(tmp_path), (32, 32), batch_size=4)
    with pytest.raises(ConfigError, match="does not exist"):
        check_data_spec(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- realised rates


def test_realised_rates_weight_channel_rate_by_executed_samples():
    t = torch.tensor
    readout = [
        {"stage": 0, "rates": {"spatial": t([0.5, 0.25]), "primary": t([0.5, 0.25])}},
        {"stage": 1, "rates": {"layer": t([1.0, 0.0]), "channel": t([0.5, 1.0]), "primary": t([1.0, 0.0])}},
        {"stage": 1, "rates": {"layer": t([1.0, 1.0]), "channel": t([0.25, 0.75]), "primary": t([1.0, 1.0])}},
    ]
    rates = realised_rates([readout, readout[:1]], [2, 6])
    assert rates[0] == {"rate": pytest.approx(0.375)}
    assert rates[1]["rate"] == pytest.approx(0.75)  # (0.5 + 1.0) / 2, weight 2 only
    # executed samples: 0.5 (block 1), 0.25 and 0.75 (block 2); the skipped sample's 1.0 is ignored
    assert rates[1]["channel_rate"] == pytest.approx((0.5 + 0.25 + 0.75) / 3)


# ----------------------------------------------------------------------------- the proxy


def test_finetune_is_registered_and_rejects_unknown_options():
    assert isinstance(get_proxy("finetune", **TINY), FinetuneProxy)
    with pytest.raises(
        ConfigError, match=r"proxy option epochs=3 is not an option of proxy 'finetune'; allowed: data, steps"
    ):
        get_proxy("finetune", epochs=3)
    with pytest.raises(ConfigError, match="is not an option of proxy 'prior'"):
        get_proxy("prior", steps=3)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps=0 is out of range"),
        (dict(steps=2, checkpoints=3), "checkpoints=3 exceeds steps=2"),
        (dict(lr=float("nan")), "lr=nan is out of range"),
        (dict(weights="/no/such/file.pt"), "is not a file"),
        (dict(data="imagenet"), "neither a file nor a known data set"),
        (dict(distill="yes"), "is not a bool"),
    ],
)
def test_finetune_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneProxy(**kw)


def test_checkpoint_steps_are_even_and_end_at_steps():
    assert FinetuneProxy(steps=60, checkpoints=3).checkpoint_steps() == [20, 40, 60]
    assert FinetuneProxy(steps=5, checkpoints=5).checkpoint_steps() == [1, 2, 3, 4, 5]
    assert FinetuneProxy(steps=7, checkpoints=1).checkpoint_steps() == [7]


def test_evaluate_reports_checkpoints_and_is_deterministic(proxy):
    rec = Recorder()
    res = proxy.evaluate(CFG, rec)
    assert [(s, f) for s, _, f in rec.calls] == [(2, False), (4, True)]
    assert rec.calls[-1][1] == res.top1 and 0 <= res.top1 <= 100
    assert proxy.evaluate(CFG).top1 == res.top1  # same config, same score
    assert set(res.attrs["top1_by_step"]) == {"2", "4"}
    realised = res.realised or CFG
    for st, real in zip(CFG.stages, realised.stages):
        assert st.paradigm == real.paradigm
        assert MIN_REALISED_RATE <= real.rate <= 1
    for s, r in res.attrs["realised_rates"].items():
        assert math.isclose(
            realised.stages[int(s)].rate, min(1, max(MIN_REALISED_RATE, round(r["rate"], 3))), abs_tol=1e-3
        )


def test_stop_trial_ends_training_at_the_checkpoint(proxy):
    rec = Recorder(stop_at=2)
    with pytest.raises(StopTrial, match="test stop"):
        proxy.evaluate(CFG, rec)
    assert [s for s, _, _ in rec.calls] == [2]


def test_static_config_has_no_dynamic_rates(proxy):
    res = proxy.evaluate(ArchConfig.static("resnet18", 32))
    assert res.realised is None and res.attrs["realised_rates"] == {}


def test_pickled_proxy_keeps_prepared_weights_not_loaders(proxy):
    clone = pickle.loads(pickle.dumps(proxy))
    assert clone._data == {} and set(clone._prepared) == set(proxy._prepared)
    assert clone.static_score(ArchConfig.static("resnet18", 32)) == proxy.static_score(
        ArchConfig.static("resnet18", 32)
    )
    assert clone.evaluate(CFG).top1 == proxy.evaluate(CFG).top1  # the worker rebuilds the same data


def test_weights_start_the_static_backbone(tmp_path):
    from dynas.kernels.model import build_model

    torch.manual_seed(7)
    static = build_model(ArchConfig.static("resnet18", 32))  # 1000-class head: dropped for 10 classes
    path = tmp_path / "w.pt"
    torch.save(static.state_dict(), path)
    p = FinetuneProxy(**{**TINY, "pretrain_steps": 0}, weights=str(path))
    prepared = p.prepare("resnet18", (32, 32))
    assert torch.equal(prepared["state"]["conv1.weight"], static.state_dict()["conv1.weight"])
    assert prepared["state"]["fc.weight"].shape == (10, 512)


# ----------------------------------------------------------------------------- stoppers


def peers(*items):
    return [Peer(i, lat, top1, complete) for i, (lat, top1, complete) in enumerate(items)]


@pytest.mark.parametrize("name", sorted(STOPPERS))
def test_every_stopper_goes_on_without_peers(name):
    assert make_stopper(name).should_stop(1, 0.0, 1.0, []) is None


def test_dominance_rule():
    s = make_stopper(StopRule("dominance", margin=2.0, min_trials=2))
    # two complete trials at least as fast and >= 2 points better: stop
    assert "dominated at step 3: 2 complete trials" in s.should_stop(
        3, 50.0, 1.0, peers((1.0, 52.0, True), (0.5, 60.0, True))
    )
    # one is slower, or only 1.9 points better, or not complete: go on
    assert s.should_stop(3, 50.0, 1.0, peers((1.1, 52.0, True), (0.5, 60.0, True))) is None
    assert s.should_stop(3, 50.0, 1.0, peers((1.0, 51.9, True), (0.5, 60.0, True))) is None
    assert s.should_stop(3, 50.0, 1.0, peers((1.0, 52.0, False), (0.5, 60.0, True))) is None
    assert (
        make_stopper(StopRule("dominance", min_trials=1)).should_stop(3, 50.0, 1.0, peers((0.5, 60.0, True)))
        is not None
    )


def test_halving_keeps_the_best_third_and_the_front():
    s = make_stopper(StopRule("halving", eta=3, min_trials=2))
    others = peers((1.0, 80.0, True), (1.0, 70.0, False), (2.0, 60.0, True))
    # 4 trials at the checkpoint, the best ceil(4/3) = 2 go on
    assert s.should_stop(1, 90.0, 1.0, others) is None
    assert s.should_stop(1, 75.0, 1.0, others) is None  # rank 2: beaten by one, like 70 (which is less accurate)
    assert "rank 3 of 4" in s.should_stop(1, 65.0, 1.0, others)
    # a faster trial on the checkpoint's front goes on however low its top-1
    assert s.should_stop(1, 10.0, 0.1, others) is None
    assert s.should_stop(1, 10.0, 1.0, peers((1.0, 80.0, True))) is None  # below min_trials


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name="asha"), "early_stop='asha' is unknown; allowed: dominance, halving, none"),
        (dict(margin=-1.0), "stop_margin=-1.0 is out of range"),
        (dict(min_trials=0), "stop_min_trials=0 is out of range"),
        (dict(eta=1), "stop_eta=1 is out of range"),
    ],
)
def test_bad_stop_rules(kw, match):
    with pytest.raises(ConfigError, match=match):
        StopRule(**kw)


# ----------------------------------------------------------------------------- search plumbing


def curve_search(storage, trials=30, early_stop="dominance", **kw):
    return run_search(
        SearchOptions(
            backbone="resnet18",
            target="a100",
            proxy="tests.slow_proxy:curve",
            trials=trials,
            storage=storage,
            early_stop=early_stop,
            show_progress=False,
            seed=1,
            **kw,
        )
    )


def _check_stopped(study):
    done = finished_trials(study)
    stopped = [t for t in done if t.state == TrialState.PRUNED]
    assert stopped, "the dominance rule stopped no trial"
    for t in stopped:
        step = t.user_attrs["stopped_at_step"]
        assert t.user_attrs["stop_reason"].startswith(f"dominated at step {step}")
        assert "config" in t.user_attrs and "latency_ms_configured" in t.user_attrs
        if "duplicate_of" not in t.user_attrs:  # a repeated config reuses its original's outcome, untrained
            assert max(t.intermediate_values) == step  # nothing was reported after the stop
    for t in done:
        if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs:
            assert sorted(t.intermediate_values) == [1, 2, 3]
            assert t.intermediate_values[3] == pytest.approx(t.values[1])
    return done, stopped


@pytest.mark.parametrize("kind", ["memory", "sqlite", "journal"])
def test_search_stops_dominated_trials_and_counts_them(kind, tmp_path):
    storage = {
        "memory": optuna.storages.InMemoryStorage(),
        "sqlite": f"sqlite:///{tmp_path / 's.db'}",
        "journal": f"journal:///{tmp_path / 's.journal'}",
    }[kind]
    study = curve_search(storage)
    done, stopped = _check_stopped(study)
    assert len(done) == 30  # --trials counts stopped trials
    if kind != "memory":
        again = curve_search(storage)  # resume: nothing missing
        assert len(again.get_trials()) == len(study.get_trials())
    table = checkpoints_table(study)
    trained = [t for t in done if "duplicate_of" not in t.user_attrs]
    assert len(table) == len(trained) and (table["state"] != "complete").sum() == sum(t in stopped for t in trained)


def test_no_early_stopping_completes_every_trial():
    study = curve_search(optuna.storages.InMemoryStorage(), trials=12, early_stop="none")
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())


def test_stop_decisions_follow_the_rule():
    """Replay the study: every trial stopped at step k had >= 2 complete, at-least-as-fast
    trials finished before it that were >= margin ahead at k; no complete trial had."""
    study = curve_search(optuna.storages.InMemoryStorage(), trials=30)
    trials = sorted(finished_trials(study), key=lambda t: t.number)
    for i, t in enumerate(trials):
        lat = t.user_attrs["latency_ms_configured"]
        earlier = [p for p in trials[:i] if p.state == TrialState.COMPLETE and "duplicate_of" not in p.user_attrs]
        for step, value in sorted(t.intermediate_values.items()):
            if step == 3 or "duplicate_of" in t.user_attrs:
                continue
            n = sum(1 for p in earlier if p.values[0] <= lat and p.intermediate_values[step] >= value + 2.0)
            should = n >= 2
            stopped_here = t.state == TrialState.PRUNED and t.user_attrs["stopped_at_step"] == step
            assert should == stopped_here, (t.number, step, n)
            if should:
                break


def test_duplicate_of_a_stopped_trial_is_stopped_again():
    # A space of 4 configs: the sampler must repeat itself.
    study = run_search(
        SearchOptions(
            backbone="resnet18",
            target="a100",
            proxy="tests.slow_proxy:curve",
            trials=12,
            storage=optuna.storages.InMemoryStorage(),
            show_progress=False,
            paradigms=("layer",),
            rate_min=0.5,
            rate_max=1.0,
            rate_step=0.5,
            seed=0,
            stop_min_trials=1,
            stop_margin=0.0,
        )
    )
    dup_stopped = [t for t in study.get_trials() if "duplicate_of" in t.user_attrs and t.state == TrialState.PRUNED]
    for t in dup_stopped:
        orig = study.get_trials()[t.user_attrs["duplicate_of"]]
        assert orig.state == TrialState.PRUNED and t.user_attrs["stop_reason"] == orig.user_attrs["stop_reason"]
    assert len(finished_trials(study)) == 12


def test_prior_studies_keep_their_hypervolume_reference():
    study = run_search(
        SearchOptions(
            backbone="resnet18", target="a100", trials=5, storage=optuna.storages.InMemoryStorage(), show_progress=False
        )
    )
    a = study.user_attrs
    assert a["reference_top1"] == pytest.approx(a["static_top1"] - 5.0)
    assert a["proxy_options"] is None and a["early_stop"]["name"] == "dominance"


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(params=["journal", "postgresql"])
def shared_storage(request, tmp_path):
    """A storage URL several processes can share (PostgreSQL: tests/conftest.py)."""
    import uuid

    if request.param == "journal":
        return f"journal:///{tmp_path / 'w.journal'}", "w"
    return request.getfixturevalue("postgres_url"), f"es-{uuid.uuid4().hex[:10]}"


def test_workers_share_early_stopping(shared_storage, tmp_path):
    """Two worker processes on one study: exactly --trials finished, stopped ones included, and
    every stop agrees with the trials that had completed when it was decided."""
    url, name = shared_storage
    r = subprocess.run(
        [
            DYNAS,
            "-q",
            "search",
            "--backbone",
            "resnet18",
            "--target",
            "a100",
            "--trials",
            "16",
            "--workers",
            "2",
            "--storage",
            url,
            "--study-name",
            name,
            "--no-progress",
            "--proxy",
            "tests.slow_proxy:curve_200ms",
            "--stop-min-trials",
            "1",
            "--html",
            str(tmp_path / "w.html"),
            "--export",
            str(tmp_path / "w.json"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    from dynas.search.study import load_study

    study = load_study(url, name)
    done, stopped = _check_stopped(study)
    assert len(done) == 16
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert len({t.user_attrs["worker"] for t in study.get_trials()}) == 2
    for t in (t for t in stopped if "duplicate_of" not in t.user_attrs):
        # the trial its reason names first completed before the stop, at least as fast and ahead
        first = int(t.user_attrs["stop_reason"].split("(#")[1].split()[0])
        other = study.get_trials()[first]
        step = t.user_attrs["stopped_at_step"]
        assert other.state == TrialState.COMPLETE and other.datetime_complete <= t.datetime_complete
        assert other.values[0] <= t.user_attrs["latency_ms_configured"]
        assert other.intermediate_values[step] >= t.intermediate_values[step] + 2.0


# ----------------------------------------------------------------------------- the CLI, end to end


def test_cli_finetune_search_end_to_end(tmp_path):
    """What CI runs of `dynas search --proxy finetune`: a tiny budget, from the console script."""
    argv = [
        DYNAS,
        "search",
        "--proxy",
        "finetune",
        "--backbone",
        "resnet18",
        "--input-size",
        "32",
        "--target",
        "a100",
        "--trials",
        "4",
        "--data",
        "synthetic:64",
        "--finetune-steps",
        "2",
        "--finetune-batch-size",
        "8",
        "--checkpoints",
        "2",
        "--pretrain-steps",
        "2",
        "--no-progress",
        "--stop-min-trials",
        "1",
        "--stop-margin",
        "0",
        "--export",
        "x.json",
        "--html",
        "x.html",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "proxy finetune" in r.stdout and "checkpoints (held-out top-1 %" in r.stdout
    exported = json.loads((tmp_path / "x.json").read_text())
    assert exported["proxy"]["name"] == "finetune"
    r2 = subprocess.run(
        [DYNAS, "pareto", "--storage", "sqlite:///dynas.db"], capture_output=True, text=True, cwd=tmp_path
    )
    assert r2.returncode == 0 and "top1_by_step" in r2.stdout
    from dynas.search.study import load_study

    study = load_study(f"sqlite:///{tmp_path / 'dynas.db'}", None)
    assert len(finished_trials(study)) == 4
    assert study.user_attrs["proxy_options"]["steps"] == 2
    assert study.user_attrs["reference_top1"] == pytest.approx(10.0)  # chance on 10 classes
    assert hypervolume(study) >= 0
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert sorted(t.intermediate_values) == [1, 2]
        if "realised_config" in t.user_attrs:
            real = load_config(t.user_attrs["realised_config"])
            from dynas.predictors.latency import predict

            assert t.values[0] == pytest.approx(predict(real, "a100", 128).latency_ms)
            assert export_trial(study, t, tmp_path / "e.json")["realised"]["latency_ms"] == t.values[0]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--data", "synthetic"], "--data applies to --proxy finetune only; got --proxy prior"),
        (["--proxy", "finetune", "--data", "nope"], "data='nope' is neither a file nor a known data set"),
        (["--proxy", "finetune", "--checkpoints", "9", "--finetune-steps", "3"], "checkpoints=9 exceeds steps=3"),
        (["--stop-eta", "1"], "stop_eta=1 is out of range"),
    ],
)
def test_cli_bad_finetune_options(tmp_path, extra, match):
    r = subprocess.run([DYNAS, "search", "--trials", "2", *extra], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert match in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sampler", sorted(__import__("dynas.search.study", fromlist=["SAMPLERS"]).SAMPLERS))
def test_every_sampler_runs_on_with_stopped_trials(sampler):
    """Optuna's TPE ranks pruned trials through study.direction, which multi-objective studies
    lack; the search shows it stopped trials as points instead.  Every sampler must go on."""
    study = curve_search(optuna.storages.InMemoryStorage(), trials=24, sampler=sampler)
    _check_stopped(study)
    assert len(finished_trials(study)) == 24


def loaders_without_keywords():
    """A --data entry point with the wrong signature."""


def test_entry_point_with_the_wrong_signature_is_a_one_line_error():
    with pytest.raises(
        ConfigError, match=r"failed when called as function\(input_size=\(H, W\), batch_size=B, seed=S\)"
    ):
        load_data("tests.test_finetune:loaders_without_keywords", (32, 32), batch_size=4)
    with pytest.raises(ConfigError, match="is a int; allowed: a function"):
        load_data("tests.test_finetune:LOADER_CONSTANT", (32, 32), batch_size=4)


LOADER_CONSTANT = 3


def test_unreadable_weights_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"not a checkpoint")
    p = FinetuneProxy(**{**TINY, "pretrain_steps": 0}, weights=str(path))
    with pytest.raises(ConfigError, match=r"^finetune weights: pretrained=.* cannot be loaded"):
        p.prepare("resnet18", (32, 32))
