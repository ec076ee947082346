"""The dynas command line, run in-process through main(argv) (plus one real subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynas.cli import main
from dynas.predictors.latency import predict
from dynas.predictors.targets import list_targets, load_target
from dynas.search.study import load_study
from dynas.spaces.config import ArchConfig, StageConfig


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynas: error: "), err


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One finished 30-trial search, run through `dynas search` with default output names."""
    folder = tmp_path_factory.mktemp("searched")
    url = f"sqlite:///{folder / 'runs.db'}"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = main(
            [
                "-q",
                "search",
                "--backbone",
                "resnet50",
                "--trials",
                "30",
                "--storage",
                url,
                "--no-progress",
                "--seed",
                "1",
            ]
        )
    finally:
        os.chdir(cwd)
    assert code == 0
    name = "resnet50-v100-b128-224x224-prior"
    return {"folder": folder, "url": url, "name": name}


def test_search_writes_report_and_export_with_default_names(searched):
    folder, name = searched["folder"], searched["name"]
    assert (folder / f"dynas-{name}.html").stat().st_size > 1000
    exported = json.loads((folder / f"dynas-{name}-export.json").read_text())
    study = load_study(searched["url"], name)
    assert len(study.trials) == 30
    # default rule: the fastest Pareto trial at least as accurate as the static network, else the most accurate
    front = study.best_trials
    good = [t for t in front if t.values[1] >= study.user_attrs["static_top1"]]
    expected = min(good, key=lambda t: t.values[0]) if good else max(front, key=lambda t: t.values[1])
    assert exported["trial"] == expected.number


def test_exported_config_predicts_the_trial_latency(searched, capsys):
    folder, name = searched["folder"], searched["name"]
    export = folder / f"dynas-{name}-export.json"
    trial_number = json.loads(export.read_text())["trial"]
    trial = load_study(searched["url"], name).trials[trial_number]
    code, out, err = _run(capsys, "predict", str(export), "--json")
    assert code == 0, err
    assert json.loads(out)["latency_ms"] == pytest.approx(trial.values[0], rel=1e-12)
    # the same with the target and batch named explicitly
    code, out, _ = _run(capsys, "predict", str(export), "--target", "v100", "--batch-size", "128", "--json")
    assert json.loads(out)["latency_ms"] == pytest.approx(trial.values[0], rel=1e-12)


def test_search_again_resumes_and_adds_only_missing_trials(searched, capsys, tmp_path):
    args = [
        "search",
        "--backbone",
        "resnet50",
        "--storage",
        searched["url"],
        "--no-progress",
        "--seed",
        "1",
        "--html",
        str(tmp_path / "r.html"),
        "--export",
        str(tmp_path / "e.json"),
        "--csv",
        str(tmp_path / "f.csv"),
    ]
    code, out, err = _run(capsys, *args, "--trials", "30")
    assert code == 0, err
    assert "nothing to run" in err
    assert len(load_study(searched["url"], searched["name"]).trials) == 30
    code, out, err = _run(capsys, *args, "--trials", "33")
    assert code == 0, err
    assert "30/33 complete trials, running 3 more" in err
    assert len(load_study(searched["url"], searched["name"]).trials) == 33
    assert "Pareto front" in out and (tmp_path / "f.csv").read_text().startswith("trial,")
    # same study name, other batch size: refused, naming the field
    code, out, err = _run(capsys, *args, "--trials", "40", "--batch-size", "8", "--study-name", searched["name"])
    _one_line_error(code, err)
    assert "batch_size" in err


def test_pareto_prints_front_and_writes_files(searched, capsys, tmp_path):
    csv, html = tmp_path / "front.csv", tmp_path / "front.html"
    code, out, err = _run(
        capsys,
        "pareto",
        "--storage",
        searched["url"],
        "--study-name",
        searched["name"],
        "--csv",
        str(csv),
        "--html",
        str(html),
        "--top",
        "0",
    )
    assert code == 0, err
    study = load_study(searched["url"], searched["name"])
    rows = csv.read_text().strip().splitlines()
    assert len(rows) == 1 + len({tuple(sorted(t.params.items())) for t in study.best_trials})
    for t in study.best_trials:
        assert t.user_attrs["short"] in out
    assert html.stat().st_size > 1000


def test_front_lists_each_config_once(capsys, tmp_path):
    # A space of one config (layer@0.5 everywhere): every trial repeats it, all tie on the front.
    url = f"sqlite:///{tmp_path / 'small.db'}"
    code, out, err = _run(
        capsys,
        "-q",
        "search",
        "--backbone",
        "resnet18",
        "--paradigms",
        "layer",
        "--rate-min",
        "0.5",
        "--rate-max",
        "0.5",
        "--trials",
        "4",
        "--sampler",
        "random",
        "--storage",
        url,
        "--no-progress",
        "--top",
        "0",
        "--csv",
        str(tmp_path / "f.csv"),
        "--html",
        str(tmp_path / "r.html"),
        "--export",
        str(tmp_path / "e.json"),
    )
    assert code == 0, err
    study = load_study(url, None)
    keys = [tuple(sorted(t.params.items())) for t in study.best_trials]
    assert len(keys) == 4 and len(set(keys)) == 1
    rows = (tmp_path / "f.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith("0,")
    assert "1 distinct configs on the Pareto front" in out


def test_search_accepts_hxw_input_size_and_flags_after_the_command(capsys, tmp_path):
    url = f"sqlite:///{tmp_path / 'hw.db'}"
    code, out, err = _run(
        capsys,
        "search",
        "-q",
        "--backbone",
        "resnet18",
        "--input-size",
        "160x192",
        "--trials",
        "2",
        "--sampler",
        "random",
        "--storage",
        url,
        "--no-progress",
        "--html",
        str(tmp_path / "r.html"),
        "--export",
        str(tmp_path / "e.json"),
    )
    assert code == 0, err
    assert err == ""  # -q: no log lines
    study = load_study(url, None)
    assert study.study_name == "resnet18-v100-b128-160x192-prior"
    assert study.user_attrs["input_size"] == [160, 192]
    assert json.loads((tmp_path / "e.json").read_text())["input_size"] == [160, 192]


def test_search_with_unmet_constraint_says_how_close_it_got(capsys, tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    code, out, err = _run(
        capsys,
        "-q",
        "search",
        "--backbone",
        "resnet18",
        "--trials",
        "3",
        "--sampler",
        "random",
        "--max-latency-ms",
        "0.001",
        "--storage",
        url,
        "--no-progress",
        "--html",
        str(tmp_path / "r.html"),
        "--export",
        str(tmp_path / "e.json"),
    )
    _one_line_error(code, err)
    fastest = min(t.values[0] for t in load_study(url, None).trials)
    assert "--max-latency-ms 0.001" in err and f"{fastest:.4g} ms" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.db"]


def test_pareto_compares_studies(searched, capsys, tmp_path):
    url = f"sqlite:///{tmp_path / 'two.db'}"
    for target in ("v100", "tx2"):
        code, _, err = _run(
            capsys,
            "-q",
            "search",
            "--backbone",
            "resnet18",
            "--target",
            target,
            "--trials",
            "6",
            "--sampler",
            "random",
            "--storage",
            url,
            "--no-progress",
            "--study-name",
            target,
            "--html",
            str(tmp_path / f"{target}.html"),
            "--export",
            str(tmp_path / f"{target}.json"),
        )
        assert code == 0, err
    code, out, err = _run(
        capsys,
        "pareto",
        "--storage",
        url,
        "--study-name",
        "v100",
        "--compare",
        "tx2",
        "--html",
        str(tmp_path / "both.html"),
    )
    assert code == 0, err
    assert "hypervolume" in out and "tx2" in out
    assert (tmp_path / "both.html").is_file()


def test_export_by_trial_latency_and_top1(searched, capsys, tmp_path):
    study = load_study(searched["url"], searched["name"])
    base = ["export", "--storage", searched["url"], "--study-name", searched["name"]]
    code, out, err = _run(capsys, *base, "--trial", "5", "-o", str(tmp_path / "t5.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "t5.json").read_text())["trial"] == 5
    fastest = min(study.best_trials, key=lambda t: t.values[0])
    code, out, err = _run(
        capsys, *base, "--max-latency-ms", str(fastest.values[0] * 1.0000001), "-o", str(tmp_path / "fast.json")
    )
    assert code == 0, err
    assert json.loads((tmp_path / "fast.json").read_text())["trial"] == fastest.number
    best = max(study.best_trials, key=lambda t: t.values[1])
    code, out, err = _run(capsys, *base, "--min-top1", str(best.values[1]), "-o", str(tmp_path / "acc.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "acc.json").read_text())["trial"] == best.number
    code, out, err = _run(capsys, *base, "--trial", "999", "-o", str(tmp_path / "none.json"))
    _one_line_error(code, err)
    assert not (tmp_path / "none.json").exists()


def test_targets_lists_every_builtin(capsys):
    code, out, _ = _run(capsys, "targets")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["name", "SMs", "lanes/SM"]
    for name in list_targets():
        row = next(line for line in lines[1:] if line.split()[0] == name)
        assert row.split()[1] == str(load_target(name).n_sm)


def test_predict_table_and_json(capsys, tmp_path):
    cfg = ArchConfig(
        "resnet50",
        (224, 224),
        (
            StageConfig("spatial", 0.5, spatial_granularity=8),
            StageConfig("channel", 0.5, channel_granularity=2),
            StageConfig("layer", 0.5),
            StageConfig(),
        ),
    )
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    expected = predict(cfg, "rtx3090", 32)
    code, out, err = _run(capsys, "predict", str(path), "--target", "rtx3090", "--batch-size", "32", "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads(json.dumps(expected.to_dict()))
    code, out, err = _run(capsys, "predict", cfg.to_json(indent=None), "--target", "rtx3090", "--batch-size", "32")
    assert code == 0, err
    assert "rtx3090, batch 32" in out
    for st in expected.stages:
        assert st.choice in out and st.bound in out


def test_help_shows_defaults(capsys):
    code, out, _ = _run(capsys, "search", "--help")
    assert code == 0
    out = " ".join(out.split())  # argparse wraps long help lines (the backbone list) anywhere
    assert "(default: resnet101)" in out and "(default: 500)" in out and "sqlite:///dynas.db" in out


def test_defaults_restated_for_torch_are_the_librarys():
    # TORCH_DEFAULTS restates defaults of functions whose modules import torch; each must match
    import importlib

    from dynas.cli.common import TORCH_DEFAULTS, default_of

    for (owner, name), value in TORCH_DEFAULTS.items():
        module, attr = owner.split(":")
        assert default_of(getattr(importlib.import_module(module), attr), name) == value, (owner, name)


def test_building_the_parser_does_not_import_torch():
    code = "import sys; from dynas.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_default_of_reads_dataclass_fields_and_parameters():
    from dynas.cli.common import default_of
    from dynas.search.study import SearchOptions
    from dynas.spaces.design import validation_plan

    assert default_of(SearchOptions, "trials") == SearchOptions().trials
    assert default_of(validation_plan, "count") == 24
    with pytest.raises(LookupError):
        default_of(SearchOptions, "no_such_option")
    with pytest.raises(LookupError):
        default_of(validation_plan, "backbones_typo")


@pytest.mark.parametrize(
    "argv, word",
    [
        (["search", "--backbone", "vgg16"], "vgg16"),
        (["search", "--target", "tpu9000"], "tpu9000"),
        (["search", "--sampler", "annealing"], "annealing"),
        (["search", "--paradigms", "spatial,wormhole"], "wormhole"),
        (["search", "--storage", "not a url"], "storage"),
        (["search", "--input-size", "224x"], "--input-size"),
        (["search", "--input-size", "16"], "input_size"),
        (["search", "--trials", "0"], "--trials"),
        (["search", "--html", "{tmp}/missing/report.html"], "--html"),
        (["search", "--export", "{tmp}/missing/e.json"], "--export"),
        (["search", "--storage", "sqlite:///{tmp}/missing/x.db", "--trials", "1"], "does not exist"),
        (["pareto", "--storage", "sqlite:///{tmp}/nothing.db"], "does not exist"),
        (["pareto", "--storage", "{url}", "--study-name", "nope"], "resnet50-v100-b128-224x224-prior"),
        (["export", "--storage", "{url}", "--study-name", "nope", "-o", "{tmp}/x.json"], "nope"),
        (["export", "--storage", "{url}", "--trial", "1", "--max-latency-ms", "3"], "not allowed with"),
        (["predict", "{tmp}/nothing.json"], "nothing.json"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(searched, capsys, tmp_path, monkeypatch, argv, word):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(tmp=tmp_path, url=searched["url"]) for a in argv]
    before = sorted(p.name for p in searched["folder"].iterdir())
    code, out, err = _run(capsys, *argv)
    _one_line_error(code, err)
    assert word in err
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in searched["folder"].iterdir()) == before


def test_console_script_reports_errors_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("dynas")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "dynas"]
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
        pytest.fail(f"no dynas entry point at {cmd[0]}")
    proc = subprocess.run(
        cmd + ["search", "--backbone", "vgg16"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("dynas: error: backbone='vgg16' is unknown")
    assert list(tmp_path.iterdir()) == []
