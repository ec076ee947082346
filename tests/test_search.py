"""dynas.search: options, samplers, storage, resume, constraints, de-duplication."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import warnings

import optuna
import pytest
from optuna.trial import TrialState

import dynas
from dynas.errors import ConfigError, StudyError, TargetError
from dynas.predictors.latency import predict
from dynas.predictors.targets import BUILTIN_DIR, load_target
from dynas.search import objective as objective_mod
from dynas.search import options as options_mod
from dynas.search.stopping import StopRule
from dynas.search.study import (
    SAMPLERS,
    SearchOptions,
    list_studies,
    load_study,
    open_storage,
    plan_search,
    run_search,
)
from dynas.spaces.config import ArchConfig
from dynas.spaces.searchspace import SearchSpace, SpaceOptions

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _opts(tmp_path, **kw):
    kw.setdefault("backbone", "resnet50")
    kw.setdefault("trials", 12)
    kw.setdefault("sampler", "random")
    kw.setdefault("storage", f"sqlite:///{tmp_path / 'search.db'}")
    kw.setdefault("show_progress", False)
    return SearchOptions(**kw)


def _complete(study):
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


# ----------------------------------------------------------------------------- options


def test_defaults_are_the_embedded_search():
    o = SearchOptions()
    assert (o.backbone, o.target, o.trials, o.sampler, o.proxy, o.input_size) == (
        "resnet101",
        "v100",
        500,
        "tpe",
        "prior",
        224,
    )
    assert (o.space, o.stop) == (SpaceOptions(), StopRule())


def test_flat_names_set_and_read_the_nested_options():
    flat = SearchOptions(paradigms="spatial, layer", rate_min=0.2, early_stop="halving", stop_eta=4)
    nested = SearchOptions(
        space=SpaceOptions(paradigms=("spatial", "layer"), rate_min=0.2), stop=StopRule("halving", eta=4)
    )
    assert flat == nested
    assert (flat.paradigms, flat.rate_min, flat.rate_max, flat.early_stop, flat.stop_eta) == (
        ("spatial", "layer"),
        0.2,
        1.0,
        "halving",
        4,
    )
    # a flat name replaces that field of nested options given with it, and works with dataclasses.replace
    assert SearchOptions(stop=StopRule("halving", eta=4), stop_margin=1.0).stop == StopRule("halving", 1.0, 2, 4)
    changed = dataclasses.replace(nested, early_stop="none", rate_step=0.1, trials=3)
    assert (changed.stop, changed.space.rate_step, changed.space.paradigms, changed.trials) == (
        StopRule("none", eta=4),
        0.1,
        ("spatial", "layer"),
        3,
    )
    with pytest.raises(ConfigError, match="stop_eta=1 is out of range"):
        SearchOptions(stop_eta=1)
    with pytest.raises(ConfigError, match=r"space=\{'rate_min': 0.2\} is not a SpaceOptions"):
        SearchOptions(space={"rate_min": 0.2})


@pytest.mark.parametrize(
    "kw, error, word",
    [
        ({"trials": 0}, ConfigError, "trials"),
        ({"seed": -1}, ConfigError, "seed"),
        ({"sampler": "annealing"}, ConfigError, "sampler"),
        ({"max_latency_ms": -3.0}, ConfigError, "max_latency_ms"),
        ({"max_latency_ratio": float("nan")}, ConfigError, "max_latency_ratio"),
        ({"batch_size": 0}, ConfigError, "batch_size"),
        ({"study_name": " "}, StudyError, "study_name"),
    ],
)
def test_bad_scalar_options_raise_one_line(kw, error, word):
    with pytest.raises(error) as info:
        SearchOptions(**kw)
    assert word in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kw, error, word",
    [
        ({"backbone": "vgg16"}, ConfigError, "vgg16"),
        ({"target": "tpu9000"}, TargetError, "tpu9000"),
        ({"paradigms": ("spatial", "wormhole")}, ConfigError, "wormhole"),
        ({"proxy": "oracle"}, ConfigError, "oracle"),
        ({"input_size": 8}, ConfigError, "input_size"),
        ({"storage": "not a url"}, StudyError, "storage"),
    ],
)
def test_plan_rejects_bad_options_and_writes_nothing(tmp_path, kw, error, word):
    with pytest.raises(error) as info:
        run_search(_opts(tmp_path, **kw))
    assert word in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_plan_resolves_target_batch_and_study_name(tmp_path):
    plan = plan_search(_opts(tmp_path, target="tx2", input_size=(192, 256)))
    assert plan.batch_size == load_target("tx2").default_batch_size
    assert plan.study_name == f"resnet50-tx2-b{plan.batch_size}-192x256-prior"
    # a target file is named by its stem
    mine = tmp_path / "mygpu.toml"
    shutil.copy(BUILTIN_DIR / "a100.toml", mine)
    plan = plan_search(_opts(tmp_path, target=str(mine), batch_size=7))
    assert plan.study_name == "resnet50-mygpu-b7-224x224-prior"
    assert plan.target_label == "mygpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mygpu.toml"]  # planning writes nothing


def test_default_storage_is_sqlite_in_the_working_directory(tmp_path):
    plan = plan_search(SearchOptions())
    assert plan.storage_url == "sqlite:///dynas.db"
    assert plan.study_name == f"resnet101-v100-b{load_target('v100').default_batch_size}-224x224-prior"


def test_timeout_stops_before_the_trial_count(tmp_path):
    study = run_search(_opts(tmp_path, trials=500, timeout_s=0.01))
    assert 1 <= len(_complete(study)) < 500


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs(tmp_path, name):
    study = run_search(_opts(tmp_path, sampler=name, trials=15))
    done = _complete(study)
    assert len(done) == 15
    assert study.best_trials and all(t.state == TrialState.COMPLETE for t in study.best_trials)


def test_gp_without_scipy_is_a_config_error(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match="SciPy"):
        run_search(_opts(tmp_path, sampler="gp"))
    assert list(tmp_path.iterdir()) == []


def test_tpe_search_emits_no_warnings(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_search(_opts(tmp_path, sampler="tpe", trials=14))
    assert [str(w.message) for w in caught] == []


def test_same_seed_gives_same_params(tmp_path):
    a = run_search(_opts(tmp_path, sampler="tpe", trials=14, seed=3, study_name="a"))
    b = run_search(_opts(tmp_path, sampler="tpe", trials=14, seed=3, study_name="b"))
    c = run_search(_opts(tmp_path, sampler="tpe", trials=14, seed=4, study_name="c"))
    pa, pb, pc = ([t.params for t in s.trials] for s in (a, b, c))
    assert pa == pb
    assert pa != pc


# ----------------------------------------------------------------------------- trials and study attrs


def test_trial_and_study_attrs(tmp_path):
    opts = _opts(tmp_path, target="rtx3060", batch_size=16)
    study = run_search(opts)
    a = study.user_attrs
    assert a["backbone"] == "resnet50" and a["input_size"] == [224, 224]
    assert a["target"] == "rtx3060" and a["target_path"] is None
    assert a["target_spec"]["n_sm"] == load_target("rtx3060").n_sm
    assert a["batch_size"] == 16 and a["proxy"] == "prior" and a["dynas_version"] == dynas.__version__
    assert a["search_space"] == SearchSpace("resnet50").to_dict()
    static = predict(ArchConfig.static("resnet50"), "rtx3060", 16)
    assert a["static_latency_ms"] == pytest.approx(static.latency_ms)
    space = SearchSpace("resnet50")
    for t in _complete(study):
        cfg = ArchConfig.from_dict(t.user_attrs["config"])
        assert cfg == space.config_from_params(t.params)
        pred = predict(cfg, "rtx3060", 16)
        assert t.values[0] == pytest.approx(pred.latency_ms)
        assert t.user_attrs["prediction"]["latency_ms"] == pytest.approx(pred.latency_ms)
        assert "config" not in t.user_attrs["prediction"]
        assert t.user_attrs["short"] == cfg.short()
        assert t.user_attrs["speedup"] == pytest.approx(static.latency_ms / pred.latency_ms)
        assert t.user_attrs["latency_ms_per_image"] == pytest.approx(pred.latency_ms / 16)
        assert t.user_attrs["flops_ratio"] == pytest.approx(pred.flops_ratio)
        assert 0.0 < t.values[1] < 100.0


def test_duplicate_params_reuse_values_without_predicting(tmp_path, monkeypatch):
    calls = []

    def counting_predict(cfg, target, batch_size=None):
        calls.append(cfg)
        return predict(cfg, target, batch_size)

    monkeypatch.setattr(objective_mod, "predict", counting_predict)
    monkeypatch.setattr(options_mod, "predict", counting_predict)  # the static reference
    # 3 choices per stage (static, layer@0.5, layer@1.0) -> 81 configs; 40 random trials repeat some.
    opts = _opts(tmp_path, paradigms=("static", "layer"), rate_min=0.5, rate_max=1.0, rate_step=0.5, trials=40)
    study = run_search(opts)
    done = _complete(study)
    unique = {tuple(sorted(t.params.items())) for t in done}
    assert len(unique) < len(done)  # the test needs duplicates
    assert len(calls) == len(unique) + 1  # one predict per distinct config, plus the static reference
    by_number = {t.number: t for t in done}
    dups = [t for t in done if "duplicate_of" in t.user_attrs]
    assert len(dups) == len(done) - len(unique)
    for t in dups:
        first = by_number[t.user_attrs["duplicate_of"]]
        assert first.params == t.params and first.values == t.values
        assert first.user_attrs["config"] == t.user_attrs["config"]


# ----------------------------------------------------------------------------- resume


def test_resume_runs_only_the_missing_trials(tmp_path):
    first = run_search(_opts(tmp_path, trials=10))
    assert len(_complete(first)) == 10
    again = run_search(_opts(tmp_path, trials=10))
    assert len(again.trials) == 10  # complete already: nothing runs
    more = run_search(_opts(tmp_path, trials=16))
    done = sorted(_complete(more), key=lambda t: t.number)
    assert [t.number for t in done] == list(range(16))
    # the resumed run does not replay the first run's random draws
    assert done[10].params != done[0].params
    assert list_studies(f"sqlite:///{tmp_path / 'search.db'}") == [more.study_name]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"batch_size": 3}, "batch_size"),
        ({"target": "a100"}, "target"),
        ({"input_size": 256}, "input_size"),
        ({"paradigms": ("static", "spatial")}, "search_space"),
        ({"max_latency_ratio": 0.5}, "max_latency_ratio"),
    ],
)
def test_resume_with_other_options_names_the_field(tmp_path, change, field):
    run_search(_opts(tmp_path, trials=2, study_name="s"))
    with pytest.raises(StudyError) as info:
        run_search(_opts(tmp_path, trials=4, study_name="s", **change))
    msg = str(info.value)
    assert field in msg and "\n" not in msg
    assert len(load_study(f"sqlite:///{tmp_path / 'search.db'}", "s").trials) == 2


def test_resume_refuses_a_foreign_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    foreign = optuna.create_study(storage=url, study_name="theirs")
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(StudyError, match="not created by dynas"):
        run_search(_opts(tmp_path, study_name="theirs"))


# ----------------------------------------------------------------------------- constraints


def test_constraints_keep_only_feasible_trials_on_the_front(tmp_path):
    plan = plan_search(_opts(tmp_path))
    static_ms = predict(ArchConfig.static("resnet50"), plan.target, plan.batch_size).latency_ms
    bound = 0.6 * static_ms
    study = run_search(_opts(tmp_path, trials=30, max_latency_ms=bound, max_latency_ratio=0.8))
    done = _complete(study)
    infeasible = [t for t in done if any(v > 0 for v in t.constraints.values())]
    assert infeasible, "the bound must cut some trials for this test to mean anything"
    for t in done:
        assert t.constraints["max_latency_ms"] == pytest.approx(t.values[0] - bound)
        assert t.constraints["max_latency_ratio"] == pytest.approx(t.user_attrs["latency_ratio"] - 0.8)
    front = study.best_trials
    assert front
    assert all(t.values[0] <= bound and t.user_attrs["latency_ratio"] <= 0.8 for t in front)
    assert not {t.number for t in front} & {t.number for t in infeasible}


# ----------------------------------------------------------------------------- storage


def test_storage_errors_are_one_line_and_create_nothing(tmp_path):
    for url, word in [
        ("mysql+nodriver://x", "cannot be opened"),
        (f"sqlite:///{tmp_path / 'missing' / 'x.db'}", "does not exist"),
        ("::::", "not a database URL"),
    ]:
        with pytest.raises(StudyError) as info:
            open_storage(url)
        assert word in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(StudyError, match="does not exist"):
        load_study(f"sqlite:///{tmp_path / 'nothing.db'}", "x")
    assert list(tmp_path.iterdir()) == []


def test_load_study_lists_available_names(tmp_path):
    run_search(_opts(tmp_path, trials=1, study_name="alpha"))
    run_search(_opts(tmp_path, trials=1, study_name="beta"))
    url = f"sqlite:///{tmp_path / 'search.db'}"
    with pytest.raises(StudyError) as info:
        load_study(url, "gamma")
    assert "alpha, beta" in str(info.value)
    with pytest.raises(StudyError, match="2 studies"):
        load_study(url, None)
    assert load_study(url, "beta").study_name == "beta"


def test_sequence_options_given_as_comma_text_are_split():
    o = SearchOptions(backbone="resnet18", paradigms="spatial, layer", spatial_granularities=[1, 2])
    assert o.paradigms == ("spatial", "layer") and o.spatial_granularities == (1, 2)
    assert plan_search(o).space.paradigms == ("spatial", "layer")
