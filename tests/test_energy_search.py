"""dynas search --objective energy: the study, its resume check, tables, HTML, export and CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dynas.cli import main
from dynas.errors import ConfigError, StudyError
from dynas.predictors.latency import predict
from dynas.results import all_trials_table, export_trial, hypervolume, pareto_table, write_html
from dynas.search.study import SearchOptions, load_study, plan_search, run_search
from dynas.spaces.config import ArchConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

CPU_TARGET = Path(__file__).resolve().parent / "data" / "cpu-2core-dec02-padonce" / "cpu-2core-dec02-padonce.toml"


def _opts(tmp_path, **kw):
    kw.setdefault("backbone", "resnet50")
    kw.setdefault("target", "orin")
    kw.setdefault("trials", 10)
    kw.setdefault("sampler", "random")
    kw.setdefault("storage", f"sqlite:///{tmp_path / 'search.db'}")
    kw.setdefault("show_progress", False)
    return SearchOptions(**kw)


def _complete(study):
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


@pytest.fixture(scope="module")
def energy_study(tmp_path_factory):
    return run_search(_opts(tmp_path_factory.mktemp("energy"), objective="energy"))


def test_energy_study_minimises_energy_and_records_both(energy_study):
    a = energy_study.user_attrs
    assert energy_study.study_name == "resnet50-orin-b1-224x224-prior-energy"
    assert a["objective"] == "energy" and a["objectives"] == ["energy_mj", "top1"]
    static = predict(ArchConfig.static("resnet50"), "orin", 1)
    assert a["static_energy_mj"] == pytest.approx(static.static_energy_mj)
    assert a["static_latency_ms"] == pytest.approx(static.latency_ms)
    for t in _complete(energy_study):
        pred = predict(ArchConfig.from_dict(t.user_attrs["config"]), "orin", 1)
        assert t.values[0] == pytest.approx(pred.energy_mj)
        assert t.user_attrs["energy_mj"] == pytest.approx(pred.energy_mj)
        assert t.user_attrs["latency_ms"] == pytest.approx(pred.latency_ms)
        assert t.user_attrs["energy_mj_per_image"] == pytest.approx(pred.energy_mj_per_image)


def test_energy_front_is_non_dominated_in_energy_and_top1(energy_study):
    table = all_trials_table(energy_study)
    front = table[table["pareto"]]
    assert len(front) >= 1
    assert list(front["energy_mj"]) == sorted(front["energy_mj"])
    for _, f in front.iterrows():
        dominated = table[
            (table["energy_mj"] <= f["energy_mj"])
            & (table["top1"] >= f["top1"])
            & ((table["energy_mj"] < f["energy_mj"]) | (table["top1"] > f["top1"]))
        ]
        assert dominated.empty, f"trial {f['trial']} is dominated"
    for _, t in table[~table["pareto"]].iterrows():  # every trial off the front is dominated by one on it
        assert ((front["energy_mj"] <= t["energy_mj"]) & (front["top1"] >= t["top1"])).any()


def test_energy_tables_lead_with_energy_and_keep_latency(energy_study):
    df = pareto_table(energy_study)
    assert list(df.columns[:5]) == ["trial", "energy_mj", "energy_mj_per_image", "latency_ms", "latency_ms_per_image"]
    assert df["latency_ms"].notna().all() and (df["latency_ms"] > 0).all()
    assert hypervolume(energy_study) > 0.0


def test_latency_study_is_unchanged_but_shows_energy(tmp_path):
    study = run_search(_opts(tmp_path))
    assert study.study_name == "resnet50-orin-b1-224x224-prior"
    assert study.user_attrs["objectives"] == ["latency_ms", "top1"]
    for t in _complete(study):
        pred = predict(ArchConfig.from_dict(t.user_attrs["config"]), "orin", 1)
        assert t.values[0] == pytest.approx(pred.latency_ms)
        assert t.user_attrs["energy_mj"] == pytest.approx(pred.energy_mj)
    df = pareto_table(study)
    assert list(df.columns[:5]) == ["trial", "latency_ms", "latency_ms_per_image", "energy_mj", "energy_mj_per_image"]
    assert list(df["latency_ms"]) == sorted(df["latency_ms"])


def test_latency_study_on_a_cpu_target_has_no_energy_columns(tmp_path):
    study = run_search(_opts(tmp_path, target=str(CPU_TARGET), trials=3))
    t = _complete(study)[0]
    assert "energy_mj" not in t.user_attrs and study.user_attrs["static_energy_mj"] is None
    assert "energy_mj" not in pareto_table(study).columns


def test_energy_objective_refused_on_a_target_without_energy(tmp_path):
    with pytest.raises(ConfigError) as info:
        plan_search(_opts(tmp_path, target=str(CPU_TARGET), objective="energy"))
    msg = str(info.value)
    assert "objective='energy'" in msg and "[energy]" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="objective='watts'"):
        SearchOptions(objective="watts")


def test_resume_with_another_objective_is_refused(tmp_path):
    run_search(_opts(tmp_path, trials=2, study_name="s"))
    with pytest.raises(StudyError) as info:
        run_search(_opts(tmp_path, trials=4, study_name="s", objective="energy"))
    msg = str(info.value)
    assert "objective='latency'" in msg and "objective='energy'" in msg and "\n" not in msg
    assert len(load_study(f"sqlite:///{tmp_path / 'search.db'}", "s").trials) == 2


def test_latency_constraint_holds_under_the_energy_objective(tmp_path):
    static_ms = predict(ArchConfig.static("resnet50"), "orin", 1).latency_ms
    study = run_search(_opts(tmp_path, objective="energy", trials=12, max_latency_ms=0.8 * static_ms))
    assert study.best_trials
    for t in study.best_trials:
        assert t.user_attrs["latency_ms"] <= 0.8 * static_ms
    for t in _complete(study):
        assert t.constraints["max_latency_ms"] == pytest.approx(t.user_attrs["latency_ms"] - 0.8 * static_ms)


def test_html_and_export_use_energy(energy_study, tmp_path):
    html = write_html(energy_study, tmp_path / "r.html").read_text()
    assert "energy (mJ per batch)" in html
    data = export_trial(energy_study, int(pareto_table(energy_study)["trial"].iloc[0]), tmp_path / "e.json")
    p = data["predictions"]
    assert p["objective"] == "energy_mj"
    assert p["energy_mj"] > 0 and p["latency_ms"] > 0 and p["static_energy_mj"] > 0


def test_cli_energy_on_a_cpu_target_exits_2_and_writes_nothing(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(
            [
                "search",
                "--backbone",
                "resnet50",
                "--target",
                str(CPU_TARGET),
                "--objective",
                "energy",
                "--trials",
                "3",
                "--storage",
                f"sqlite:///{tmp_path / 'x.db'}",
                "--no-progress",
            ]
        )
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynas: error: objective='energy' is not allowed"), err
    assert list(tmp_path.iterdir()) == []


def test_cli_energy_search_prints_and_exports_both(tmp_path, capsys):
    export = tmp_path / "e.json"
    code = main(
        [
            "-q",
            "search",
            "--backbone",
            "resnet50",
            "--target",
            "orin",
            "--objective",
            "energy",
            "--trials",
            "8",
            "--sampler",
            "random",
            "--storage",
            f"sqlite:///{tmp_path / 'e.db'}",
            "--no-progress",
            "--html",
            str(tmp_path / "r.html"),
            "--csv",
            str(tmp_path / "f.csv"),
            "--export",
            str(export),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "minimising energy" in out and "energy_mj" in out
    assert (tmp_path / "f.csv").read_text().splitlines()[0].startswith("trial,energy_mj,energy_mj_per_image,latency_ms")
    data = json.loads(export.read_text())
    assert data["predictions"]["objective"] == "energy_mj" and data["predictions"]["latency_ms"] > 0
    assert " ms, " in out and " mJ per batch" in out
