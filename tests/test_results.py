"""Tests of dynas.results: tables, hypervolume, trial selection, export and the HTML report.

Most tests build small studies by hand (optuna.trial.create_trial with the user attrs that
dynas search writes) so that every expected value can be checked by hand; one test runs a real
30-trial search end to end.
"""

from __future__ import annotations

import json
import os

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from dynas.errors import StudyError
from dynas.results import (
    PARETO_COLUMNS,
    all_trials_table,
    export_trial,
    hypervolume,
    hypervolume_history,
    laudnet_args,
    pareto_table,
    select_trial,
    write_csv,
    write_html,
)
from dynas.results.plots import make_figure
from dynas.spaces.config import ArchConfig, load_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

BATCH = 128
STATIC_MS = 100.0  # whole batch
STATIC_TOP1 = 76.0
DENSE_STAGE_GFLOPS = (1.0, 2.0, 3.0, 2.0)
STEM_HEAD_GFLOPS = 0.5

S_8471 = {
    "backbone": "resnet50",
    "input_size": 224,
    "stages": [{"paradigm": "spatial", "spatial_granularity": g, "rate": 0.5} for g in (8, 4, 7, 1)],
}
MIXED = {
    "backbone": "resnet50",
    "input_size": 224,
    "stages": [
        {"paradigm": "spatial", "spatial_granularity": 8, "rate": 0.5},
        {"paradigm": "channel", "channel_granularity": 2, "rate": 0.5},
        {"paradigm": "layer", "rate": 0.5},
        {"paradigm": "static"},
    ],
}
LAYER = {"backbone": "resnet50", "input_size": 224, "stages": [{"paradigm": "layer", "rate": 0.6}] * 4}
STATIC = ArchConfig.static("resnet50").to_dict()
CONFIGS = [S_8471, MIXED, LAYER, STATIC]


def _prediction(cfg: dict, latency_ms: float) -> dict:
    """A stored prediction (Prediction.to_dict() minus config) with hand-chosen numbers.

    Stage i costs latency_ms / 5 (stem + head take the last fifth); a stage's expected FLOPs are
    its dense FLOPs times its activation rate (1 when static).
    """
    arch = ArchConfig.from_dict(cfg)
    stages = []
    for i, st in enumerate(arch.stages):
        lat = latency_ms / 5
        stages.append(
            {
                "stage": i,
                "choice": st.short(),
                "blocks": 3,
                "latency_ms": lat,
                "static_latency_ms": STATIC_MS / 5,
                "compute_ms": 0.5 * lat,
                "memory_ms": 0.4 * lat,
                "launch_ms": 0.1 * lat,
                "bound": "compute",
                "masker": "none",
                "dense_gflops": DENSE_STAGE_GFLOPS[i],
                "expected_gflops": DENSE_STAGE_GFLOPS[i] * st.rate,
                "ops": [],
            }
        )
    dense = sum(DENSE_STAGE_GFLOPS) + STEM_HEAD_GFLOPS
    expected = sum(s["expected_gflops"] for s in stages) + STEM_HEAD_GFLOPS
    return {
        "target": "v100",
        "batch_size": BATCH,
        "latency_ms": latency_ms,
        "latency_ms_per_image": latency_ms / BATCH,
        "static_latency_ms": STATIC_MS,
        "static_latency_ms_per_image": STATIC_MS / BATCH,
        "speedup": STATIC_MS / latency_ms,
        "latency_ratio": latency_ms / STATIC_MS,
        "stem_ms": latency_ms / 10,
        "head_ms": latency_ms / 10,
        "dense_gflops": dense,
        "expected_gflops": expected,
        "stages": stages,
        "input_size": [224, 224],
        "backbone": "resnet50",
        "flops": {"dense_gflops": dense, "expected_gflops": expected, "ratio": expected / dense},
    }


def _trial(latency_ms: float, top1: float, cfg: dict | None = None, constraint: float | None = None):
    cfg = cfg or MIXED
    pred = _prediction(cfg, latency_ms)
    attrs = {
        "config": cfg,
        "short": ArchConfig.from_dict(cfg).short(),
        "prediction": pred,
        "speedup": pred["speedup"],
        "flops_ratio": pred["flops"]["ratio"],
        "latency_ms_per_image": pred["latency_ms_per_image"],
        "latency_ratio": pred["latency_ratio"],
    }
    constraints = None if constraint is None else {"max_latency_ms": constraint}
    return create_trial(values=[latency_ms, top1], user_attrs=attrs, constraints=constraints)


def make_study(points, name: str = "toy", target: str = "v100") -> optuna.Study:
    """``points``: (latency_ms, top1) or (latency_ms, top1, cfg, constraint) or a TrialState."""
    study = optuna.create_study(directions=["minimize", "maximize"], study_name=name)
    attrs = {
        "backbone": "resnet50",
        "input_size": [224, 224],
        "target": target,
        "target_path": None,
        "target_spec": {"name": target},
        "batch_size": BATCH,
        "proxy": "prior",
        "search_space": {},
        "static_latency_ms": STATIC_MS,
        "static_top1": STATIC_TOP1,
        "dynas_version": "0.1.0",
    }
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    for p in points:
        study.add_trial(create_trial(state=p) if isinstance(p, TrialState) else _trial(*p))
    return study


# trial: 0       1          2        3             4           5 (FAIL)         6 (infeasible, dominates all)
POINTS = [
    (80.0, 75.0),
    (60.0, 74.0),
    (90.0, 73.0),
    (50.0, 72.0, LAYER),
    (120.0, 77.5, STATIC),
    TrialState.FAIL,
    (40.0, 78.0, S_8471, 5.0),
]


@pytest.fixture
def study():
    return make_study(POINTS)


# ----------------------------------------------------------------------------- tables


def test_pareto_table_is_optunas_front_sorted_by_latency(study):
    df = pareto_table(study)
    assert tuple(df.columns) == PARETO_COLUMNS
    assert set(df["trial"]) == {t.number for t in study.best_trials} == {0, 1, 3, 4}
    assert list(df["latency_ms"]) == sorted(df["latency_ms"])
    assert list(df["trial"]) == [3, 1, 0, 4]
    row = df[df["trial"] == 4].iloc[0]
    assert row["latency_ms_per_image"] == pytest.approx(120.0 / BATCH)
    assert row["speedup"] == pytest.approx(STATIC_MS / 120.0)
    assert row["top1"] == 77.5
    assert row["stages"] == "static | static | static | static"
    assert row["flops_ratio"] == pytest.approx(1.0)


def test_infeasible_trial_is_excluded_from_front(study):
    # trial 6 is fastest and most accurate, but violates its constraint
    assert 6 not in set(pareto_table(study)["trial"])
    feasible_only = make_study(POINTS[:5] + [(40.0, 78.0, S_8471, -1.0)])
    assert list(pareto_table(feasible_only)["trial"]) == [5]


def test_all_trials_table_flags(study):
    df = all_trials_table(study)
    assert tuple(df.columns) == (*PARETO_COLUMNS, "feasible", "pareto")
    assert set(df["trial"]) == {0, 1, 2, 3, 4, 6}  # the FAIL trial 5 is not a complete trial
    assert list(df["latency_ms"]) == sorted(df["latency_ms"])
    flags = df.set_index("trial")
    assert not flags.loc[6, "feasible"] and not flags.loc[6, "pareto"]
    assert flags.loc[2, "feasible"] and not flags.loc[2, "pareto"]
    assert set(df.loc[df["pareto"], "trial"]) == {t.number for t in study.best_trials}
    assert df["feasible"].dtype == bool and df["pareto"].dtype == bool


def test_write_csv_round_trip_and_atomicity(study, tmp_path):
    path = tmp_path / "front.csv"
    df = pareto_table(study)
    write_csv(df, path)
    back = pd.read_csv(path)
    assert list(back.columns) == list(df.columns)
    assert list(back["trial"]) == list(df["trial"])
    assert np.allclose(back["latency_ms"], df["latency_ms"])
    assert os.listdir(tmp_path) == ["front.csv"]  # no temp file left behind
    with pytest.raises(StudyError, match="does not exist"):
        write_csv(df, tmp_path / "missing" / "front.csv")


def test_wrong_directions_are_rejected():
    other = optuna.create_study(directions=["minimize", "minimize"])
    with pytest.raises(StudyError, match="directions"):
        pareto_table(other)


# ----------------------------------------------------------------------------- hypervolume


def test_hypervolume_hand_checked_rectangles():
    # reference (1.5, -(76 - 5)) = (1.5, -71) in (latency ratio, -top1)
    one = make_study([(50.0, 75.0)])  # (0.5, -75): 1.0 x 4 = 4
    assert hypervolume(one) == pytest.approx(4.0)
    two = make_study([(50.0, 75.0), (100.0, 77.0)])  # + (1.0, -77): 0.5 x 6 = 3, overlap 0.5 x 4 = 2
    assert hypervolume(two) == pytest.approx(5.0)
    # a custom reference (latency ratio, top1 in percent)
    assert hypervolume(two, reference=(2.0, 70.0)) == pytest.approx(1.5 * 5 + 1.0 * 7 - 1.0 * 5)


def test_hypervolume_grows_with_dominating_trial_and_ignores_outside_points():
    base = make_study([(50.0, 75.0), (100.0, 77.0)])
    before = hypervolume(base)
    base.add_trial(_trial(40.0, 76.0))  # dominates (50, 75)
    assert hypervolume(base) > before
    same = make_study([(50.0, 75.0), (100.0, 77.0), (160.0, 79.0), (20.0, 70.0), (10.0, 80.0, MIXED, 1.0)])
    # beyond ratio 1.5, below top-1 71 and infeasible: none adds area
    assert hypervolume(same) == pytest.approx(before)
    assert hypervolume(make_study([])) == 0.0


def test_hypervolume_rejects_bad_reference_and_missing_attrs(study):
    with pytest.raises(StudyError, match="reference"):
        hypervolume(study, reference=(1.5, -71.0))
    with pytest.raises(StudyError, match="reference"):
        hypervolume(study, reference=(1.5,))
    bare = optuna.create_study(directions=["minimize", "maximize"])
    bare.add_trial(create_trial(values=[1.0, 70.0]))
    with pytest.raises(StudyError, match="static_top1"):
        hypervolume(bare)


def test_hypervolume_history_matches_prefix_hypervolume():
    rng = np.random.default_rng(0)
    points: list = []
    for i in range(60):
        lat = float(rng.uniform(30, 170))
        top1 = float(rng.uniform(68, 79))
        points.append(TrialState.FAIL if i % 17 == 5 else (lat, top1, MIXED, float(rng.choice([-1.0, 1.0]))))
    full = make_study(points)
    history = hypervolume_history(full)
    complete = [p for p in points if not isinstance(p, TrialState)]
    assert len(history) == len(complete)
    assert all(b >= a for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(hypervolume(full))
    for k in (1, 7, 23, 41):
        assert history[k - 1] == pytest.approx(hypervolume(make_study(complete[:k])))
    assert history[-1] > 0


# ----------------------------------------------------------------------------- selection


def test_select_by_number_and_errors(study):
    assert select_trial(study, trial=2).number == 2
    with pytest.raises(StudyError, match=r"does not exist.*0-4, 6"):
        select_trial(study, trial=99)
    with pytest.raises(StudyError, match="is FAIL"):
        select_trial(study, trial=5)
    with pytest.raises(StudyError, match="not both"):
        select_trial(study, trial=1, min_top1=70.0)
    with pytest.warns(UserWarning, match="constraints"):
        assert select_trial(study, trial=6).number == 6


def test_select_latency_bound_whole_batch_and_per_image(study):
    # feasible trials with latency <= 85 ms: 0 (75.0), 1 (74.0), 3 (72.0) -> most accurate is 0
    assert select_trial(study, max_latency_ms=85.0).number == 0
    assert select_trial(study, max_latency_ms=60.0).number == 1
    assert select_trial(study, max_latency_ms_per_image=85.0 / BATCH).number == 0
    assert select_trial(study, max_latency_ms_per_image=60.0 / BATCH).number == 1
    with pytest.raises(StudyError, match=r"allowed: >= 50 ms.*trial 3"):
        select_trial(study, max_latency_ms=45.0)  # the infeasible 40 ms trial does not count
    with pytest.raises(StudyError, match="one latency bound"):
        select_trial(study, max_latency_ms=85.0, max_latency_ms_per_image=1.0)


def test_select_min_top1_and_combined(study):
    assert select_trial(study, min_top1=73.5).number == 1  # fastest with top1 >= 73.5
    assert select_trial(study, min_top1=77.0).number == 4
    with pytest.raises(StudyError, match=r"allowed: <= 77.5.*trial 4"):
        select_trial(study, min_top1=78.0)  # 78.0 only from the infeasible trial 6
    assert select_trial(study, max_latency_ms=95.0, min_top1=73.0).number == 0
    with pytest.raises(StudyError, match="within the latency bound"):
        select_trial(study, max_latency_ms=95.0, min_top1=76.0)


def test_select_default_rule():
    # Pareto trials reaching static top-1 76: 4 (120 ms) and 5 (90 ms) -> fastest is 5
    s = make_study(POINTS[:5] + [(90.0, 76.5)])
    assert select_trial(s).number == 5
    # nobody reaches 76 -> most accurate Pareto trial
    low = make_study([(80.0, 75.0), (60.0, 74.0), (50.0, 72.0)])
    assert select_trial(low).number == 0
    with pytest.raises(StudyError, match="no feasible"):
        select_trial(make_study([]))


# ----------------------------------------------------------------------------- export


def test_export_round_trip_through_load_config(study, tmp_path):
    path = tmp_path / "best.json"
    data = export_trial(study, 1, path)
    assert json.loads(path.read_text()) == data
    cfg = load_config(path)
    assert cfg == ArchConfig.from_dict(MIXED)
    assert {k: data[k] for k in ("backbone", "input_size", "stages")} == cfg.to_dict()
    assert data["trial"] == 1 and data["study"] == "toy" and data["batch_size"] == BATCH
    assert data["target"] == {"name": "v100", "path": None, "spec": {"name": "v100"}}
    assert data["proxy"] == {"name": "prior", "top1": 74.0, "static_top1": STATIC_TOP1}
    assert data["predictions"]["latency_ms"] == 60.0
    assert data["predictions"]["latency_ms_per_image"] == pytest.approx(60.0 / BATCH)
    assert data["predictions"]["speedup"] == pytest.approx(STATIC_MS / 60.0)

    training = data["training"]
    assert training["epochs"] == 100 and training["lr"] == 0.08 and training["batch_size"] == 1024
    assert training["optimizer"] == {"name": "SGD", "nesterov": True, "momentum": 0.9, "weight_decay": 5e-5}
    assert training["loss"]["sparsity"] == 10.0 and training["loss"]["distillation"]["temperature"] == 4.0
    assert training["gumbel_temperature"]["start"] == 5.0 and training["gumbel_temperature"]["end"] == 0.1
    ratios = [s["target_flops_ratio"] for s in training["stages"]]
    assert ratios == pytest.approx([0.5, 0.5, 0.5, 1.0])  # expected / dense of each stage
    assert [s["rate"] for s in training["stages"][:3]] == [0.5, 0.5, 0.5]
    expected_ratio = (0.5 + 1.0 + 1.5 + 2.0 + STEM_HEAD_GFLOPS) / (8.0 + STEM_HEAD_GFLOPS)
    assert training["target_flops_ratio"] == pytest.approx(expected_ratio)
    assert data["laudnet_args"]["target_rate"] == round(expected_ratio, 4)
    assert os.listdir(tmp_path) == ["best.json"]


def test_export_rejects_missing_trial(study, tmp_path):
    with pytest.raises(StudyError, match="allowed: a complete trial number"):
        export_trial(study, 42, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_laudnet_args_spatial_8471():
    args = laudnet_args(ArchConfig.from_dict(S_8471), 0.52)
    assert args["arch"] == "uni_resnet50"
    assert args["dyn_mode"] == "spatial-spatial-spatial-spatial"
    assert args["mask_spatial_granularity"] == "8-4-7-1"
    assert args["channel_dyn_granularity"] == "1-1-1-1"
    assert args["target_rate"] == 0.52
    assert args["exact"] is True
    assert "--mask_spatial_granularity 8-4-7-1" in args["command"]
    assert "--target_rate 0.52" in args["command"]
    assert any("one global FLOPs target" in x for x in args["lost"])


def test_laudnet_args_layer_channel_static_and_unsupported():
    layer = laudnet_args(ArchConfig.from_dict(LAYER), 0.6)
    assert layer["dyn_mode"] == "layer-layer-layer-layer"
    assert layer["mask_spatial_granularity"] == "56-28-14-7"
    mixed = laudnet_args(ArchConfig.from_dict(MIXED), 0.6)
    assert mixed["dyn_mode"].split("-")[:3] == ["spatial", "channel", "layer"]
    assert mixed["channel_dyn_granularity"] == "1-2-1-1"
    assert mixed["exact"] is False
    assert any(x.startswith("stage 3 (static)") for x in mixed["lost"])
    lc = {
        "backbone": "resnet101",
        "input_size": 224,
        "stages": [{"paradigm": "layer+channel", "channel_granularity": 2, "rate": 0.7, "channel_rate": 0.5}] * 4,
    }
    both = laudnet_args(ArchConfig.from_dict(lc), 0.4)
    assert both["arch"] == "uni_resnet101"
    assert both["dyn_mode"] == "both-both-both-both"
    assert any("no LAUDNet equivalent" in x for x in both["lost"])
    assert laudnet_args(ArchConfig.static("resnet18"), 1.0)["arch"] is None
    reg = ArchConfig.from_dict(
        {"backbone": "regnety_400mf", "input_size": 224, "stages": [{"paradigm": "layer", "rate": 0.5}] * 4}
    )
    reg_args = laudnet_args(reg, 0.5)
    assert reg_args["arch"] == "lad_regnet_y_400mf"
    assert reg_args["dyn_mode"] == "spatial-spatial-spatial-spatial"  # their RegNet has no layer mode
    assert reg_args["mask_spatial_granularity"] == "56-28-14-7"


# ----------------------------------------------------------------------------- HTML


def test_write_html_contains_every_trace(tmp_path):
    a = make_study(POINTS, name="a", target="v100")
    b = make_study([(70.0, 74.0), (30.0, 71.0, LAYER)], name="b", target="a100")
    path = tmp_path / "report.html"
    write_html([a, b], path, breakdown_trial=1)
    html = path.read_text()
    for name in (
        "v100: all trials",
        "v100: Pareto front",
        "v100: static",
        "a100: all trials",
        "a100: Pareto front",
        "a100: static",
        "compute",
        "memory",
        "launch",
    ):
        assert f'"name":"{name}"' in html
    assert '<script src="http' not in html  # nothing fetched: plotly.js is inlined
    assert len(html) > 1_000_000
    assert "S8@0.50 | C2@0.50 | L@0.50 | static" in html  # hover strings
    assert os.listdir(tmp_path) == ["report.html"]


def test_figure_front_and_breakdown_values():
    s = make_study(POINTS)
    fig = make_figure(s, breakdown_trial=3)
    by_name = {t.name: t for t in fig.data}
    front = pareto_table(s)
    assert list(by_name["v100: Pareto front"].x) == pytest.approx(list(front["latency_ms_per_image"]))
    assert list(by_name["v100: static"].x) == pytest.approx([STATIC_MS / BATCH])
    assert len(by_name["v100: all trials"].x) == 6
    # breakdown of trial 3 (50 ms): dynamic stage compute = 0.5 x 50 / 5 ms per batch
    compute = by_name["compute"]
    n = len(DENSE_STAGE_GFLOPS)
    assert list(compute.y[:n]) == pytest.approx([0.5 * 10.0 / BATCH] * n)
    assert all(v > 0 for v in compute.y[n:])  # static stages on the real v100 model
    with pytest.raises(StudyError, match="is FAIL"):
        make_figure(s, breakdown_trial=5)
    # default breakdown trial is the one select_trial picks
    assert f"trial {select_trial(s).number} (" in fig_title(make_figure(s))


def fig_title(fig) -> str:
    return " ".join(a.text for a in fig.layout.annotations)


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_real_search(tmp_path):
    from dynas.search.study import SearchOptions, load_study, run_search

    url = f"sqlite:///{tmp_path / 'search.db'}"
    run_search(
        SearchOptions(
            backbone="resnet50",
            target="v100",
            trials=30,
            storage=url,
            seed=0,
            max_latency_ratio=0.9,
            show_progress=False,
        )
    )
    study = load_study(url, None)  # everything below works on a study read back from storage
    front = pareto_table(study)
    assert len(front) >= 1
    assert set(front["trial"]) == {t.number for t in study.best_trials}
    table = all_trials_table(study)
    assert len(table) == 30
    by_number = {t.number: t for t in study.trials}
    for row in table.itertuples():
        t = by_number[row.trial]
        assert row.feasible == (t.user_attrs["latency_ratio"] <= 0.9)
        assert row.stages == ArchConfig.from_dict(t.user_attrs["config"]).short()
    assert front["latency_ms"].max() <= 0.9 * study.user_attrs["static_latency_ms"] + 1e-9

    history = hypervolume_history(study)
    assert len(history) == 30 and history[-1] == pytest.approx(hypervolume(study))

    chosen = select_trial(study)
    assert chosen.number in set(front["trial"])
    path = tmp_path / "export.json"
    data = export_trial(study, chosen, path)
    assert load_config(path) == ArchConfig.from_dict(chosen.user_attrs["config"])
    stages_pred = chosen.user_attrs["prediction"]["stages"]
    assert [s["target_flops_ratio"] for s in data["training"]["stages"]] == pytest.approx(
        [s["expected_gflops"] / s["dense_gflops"] for s in stages_pred]
    )
    assert data["laudnet_args"]["arch"] == "uni_resnet50"
    assert data["laudnet_args"]["target_rate"] == pytest.approx(chosen.user_attrs["flops_ratio"], abs=1e-4)

    html = tmp_path / "report.html"
    write_html(study, html)
    assert '"name":"v100: Pareto front"' in html.read_text()


def test_repeated_configs_appear_once_on_the_front(tmp_path):
    """A sampler may propose a config twice; the front, its table and the plot list it once."""
    from dynas.results import all_trials_table, front_trials, pareto_table
    from dynas.search.study import SearchOptions, run_search

    study = run_search(
        SearchOptions(
            backbone="resnet18",
            target="tx2",
            trials=12,
            sampler="random",
            seed=3,
            storage=f"sqlite:///{tmp_path / 's.db'}",
            show_progress=False,
        )
    )
    first = study.best_trials[0]
    study.enqueue_trial(dict(first.params))
    study = run_search(
        SearchOptions(
            backbone="resnet18",
            target="tx2",
            trials=13,
            sampler="random",
            seed=3,
            storage=f"sqlite:///{tmp_path / 's.db'}",
            show_progress=False,
        )
    )
    copy = study.trials[-1]
    assert copy.params == first.params and copy.values == first.values
    assert {first.number, copy.number} <= {t.number for t in study.best_trials}  # Optuna keeps both
    front = [t.number for t in front_trials(study)]
    assert first.number in front and copy.number not in front
    assert copy.number not in set(pareto_table(study)["trial"])
    table = all_trials_table(study)
    assert not table.loc[table["trial"] == copy.number, "pareto"].item()
