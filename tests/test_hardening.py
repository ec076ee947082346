"""Input hardening: every kind of bad input ends in one line, exit status 2, and nothing written.

What other test files already cover is not repeated here: config errors through the API
(test_spaces), the search options and a first set of CLI cases (test_cli, test_search), target
files through the API (test_predictor, test_calibration), missing studies and trials
(test_cli, test_results).
This file adds the CLI side of config and target-file errors for every command that reads
them, study commands with a malformed storage URL, output paths in missing and read-only
folders for every command and writer that writes, numeric options given text or NaN, and the
console script.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import dynas.files
from dynas.cli import build_parser, common, main
from dynas.errors import ConfigError, DynasError, StudyError, TargetError
from dynas.files import atomic_write_bytes, atomic_write_text
from dynas.predictors import cpu, cpu_terms
from dynas.predictors.latency import predict
from dynas.predictors.targets import _REQUIRED, BUILTIN_DIR, HardwareTarget, list_targets, write_target
from dynas.spaces.backbones import get_backbone, list_backbones
from dynas.spaces.config import ArchConfig, channel_granularities, spatial_granularities

DATA = Path(__file__).resolve().parent / "data"  # trimmed copies of benchmark measurements (tests/data/README.md)
CPU_TARGET = DATA / "cpu-2core-dec02-padonce" / "cpu-2core-dec02-padonce.toml"
CALIBRATION_CSV = DATA / "cpu-2core-dec01-late" / "cpu-2core-dec01-late.csv"
VALIDATION_CSV = DATA / "cpu-2core-dec01-ops" / "validation-seed18.csv"

GOOD = {
    "backbone": "resnet18",
    "input_size": 224,
    "stages": [{"paradigm": "layer", "rate": 0.5}] + [{"paradigm": "static"}] * 3,
}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynas: error: "), err
    return lines[0]


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _with_stage0(**stage0) -> str:
    data = json.loads(json.dumps(GOOD))
    data["stages"][0] = stage0
    return json.dumps(data)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


#: sub-commands that read a CONFIG argument (predict, bench, train, ...), from the parser
CONFIG_COMMANDS = sorted(name for name, p in _subcommands().items() if any(a.dest == "config" for a in p._actions))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small finished study, run through the CLI."""
    folder = tmp_path_factory.mktemp("study")
    url = f"sqlite:///{folder / 'runs.db'}"
    code = main(
        [
            "-q",
            "search",
            "--backbone",
            "resnet18",
            "--trials",
            "3",
            "--sampler",
            "random",
            "--storage",
            url,
            "--no-progress",
            "--study-name",
            "small",
            "--html",
            str(folder / "r.html"),
            "--export",
            str(folder / "e.json"),
        ]
    )
    assert code == 0
    return {"folder": folder, "url": url, "name": "small"}


# ----------------------------------------------------------------------------- configs, every command that reads one

BAD_CONFIGS = [
    # (config text, or "FILE:" + text to pass it as a file; fragment of the message)
    ("FILE:" + json.dumps(GOOD)[:-7], "not valid JSON"),
    (json.dumps(GOOD)[:-7], "not valid JSON"),
    ("FILE:", "not valid JSON: Expecting value at line 1 column 1"),
    ("FILE:[1, 2]", "is not an object"),
    ('{"backbone": "vgg16", "stages": []}', "backbone='vgg16' is unknown; allowed: "),
    (_with_stage0(paradigm="wormhole", rate=0.5), "paradigm='wormhole' is unknown; allowed: static, spatial"),
    (
        _with_stage0(paradigm="spatial", spatial_granularity=5, rate=0.5),
        "spatial_granularity=5 does not divide the stage's 56x56 output map; allowed: 1, 2, 4, 7, 8, 14, 28, 56",
    ),
    (_with_stage0(paradigm="layer", rate=0), "rate=0 is out of range; allowed: a number in (0, 1]"),
    (_with_stage0(paradigm="layer", rate=-0.5), "rate=-0.5 is out of range"),
    (_with_stage0(paradigm="layer", rate=1.5), "rate=1.5 is out of range"),
    ("FILE:" + _with_stage0(paradigm="layer", rate=float("nan")), "rate=nan is out of range"),  # JSON's NaN literal
    ("FILE:" + _with_stage0(paradigm="layer", rate=float("inf")), "rate=inf is out of range"),
    (_with_stage0(paradigm="layer", rate="0.5"), "rate='0.5' is not a number"),
    (
        "FILE:" + _with_stage0(paradigm="layer+channel", channel_granularity=2, rate=0.5, channel_rate=float("nan")),
        "channel_rate=nan is out of range",
    ),
    (_with_stage0(paradigm="spatial", spatial_granularity="8", rate=0.5), "spatial_granularity='8' is not an integer"),
    ('{"backbone": "resnet18", "input_size": "224", "stages": []}', "input_size='224' is not a size"),
]


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("text, fragment", BAD_CONFIGS, ids=[f[:30] for _, f in BAD_CONFIGS])
def test_bad_config_is_one_line_for_every_command_that_reads_one(
    capsys, tmp_path, monkeypatch, command, text, fragment
):
    monkeypatch.chdir(tmp_path)
    source = text
    if text.startswith("FILE:"):
        (tmp_path / "cfg.json").write_text(text[5:])
        source = "cfg.json"
    extra = {"train": ["-o", "out.pt"], "exits": ["--weights", "w.pt", "--budget-ms", "1"]}.get(command, [])
    before = _listing(tmp_path)
    code, out, err = _run(capsys, command, source, *extra)
    line = _one_line_error(code, err)
    assert fragment in line
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("backbone", list_backbones())
def test_granularity_that_does_not_divide_names_the_allowed_ones_on_the_cli(capsys, backbone):
    spec = get_backbone(backbone, 224)
    h, w = spec.stage_out_hw(0)
    s_ok = spatial_granularities(spec, 0)
    s_bad = next(g for g in range(2, h + 2) if g not in s_ok)
    c_ok = channel_granularities(spec, 0)
    c_bad = next(g for g in range(2, spec.stage_width(0) + 1) if g not in c_ok)
    for stage, name, value, allowed in (
        ({"paradigm": "spatial", "spatial_granularity": s_bad, "rate": 0.5}, "spatial_granularity", s_bad, s_ok),
        ({"paradigm": "channel", "channel_granularity": c_bad, "rate": 0.5}, "channel_granularity", c_bad, c_ok),
    ):
        if stage["paradigm"] not in spec.paradigms:  # refused before its granularity is read (tests/test_spaces.py)
            continue
        cfg = {"backbone": backbone, "stages": [stage] + [{"paradigm": "static"}] * (spec.num_stages - 1)}
        code, _, err = _run(capsys, "predict", json.dumps(cfg))
        line = _one_line_error(code, err)
        assert f"stage 0: {name}={value} " in line
        assert line.endswith("allowed: " + ", ".join(map(str, allowed)))


# ----------------------------------------------------------------------------- targets


def test_unknown_target_lists_every_builtin(capsys):
    code, _, err = _run(capsys, "predict", json.dumps(GOOD), "--target", "k80")
    line = _one_line_error(code, err)
    assert "target='k80' is unknown; allowed: " + ", ".join(list_targets()) in line


def test_empty_target_name_is_not_the_default(capsys):
    code, _, err = _run(capsys, "predict", json.dumps(GOOD), "--target", "")
    assert "target=''" in _one_line_error(code, err)


@pytest.mark.parametrize("value", [5, None, 1.5, ["v100"]])
def test_target_of_the_wrong_type_is_a_target_error(value):
    with pytest.raises(TargetError, match="is not a target name or path") as info:
        predict(GOOD, value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("batch", ["8", 2.5, True, -1, float("nan")])
@pytest.mark.parametrize("target", [*list_targets(), str(CPU_TARGET)], ids=lambda t: Path(t).stem)
def test_predict_api_batch_size_must_be_a_positive_integer(target, batch):
    with pytest.raises(ConfigError, match=r"batch_size=.* is not allowed; allowed: a positive integer") as info:
        predict(GOOD, target, batch)
    assert "\n" not in str(info.value)


def _gpu_file_cases():
    text = (BUILTIN_DIR / "v100.toml").read_text()
    lines = text.splitlines()
    for field in _REQUIRED:
        i = next(i for i, line in enumerate(lines) if line.split("=")[0].strip() == field)
        yield pytest.param(
            "\n".join(lines[:i] + lines[i + 1 :]) + "\n", f"hardware.{field} is missing", id=f"gpu-{field}-missing"
        )
        integer = field in ("n_sm", "lanes_per_sm")
        for value, fragment in (
            ("-4", "-4 is out of range"),
            ("0", "0 is out of range"),
            ('"8"', "'8' is not a positive"),
            ("nan", "nan is not a positive integer" if integer else "nan is out of range"),
        ):
            edited = "\n".join(lines[:i] + [f"{field} = {value}"] + lines[i + 1 :]) + "\n"
            yield pytest.param(edited, f"hardware.{field}={fragment}", id=f"gpu-{field}={value}")
    yield pytest.param(text[: len(text) // 2] + "\n[hardware\n", "is not valid TOML", id="gpu-truncated")


def _cpu_file_cases():
    text = CPU_TARGET.read_text()
    lines = text.splitlines()
    for field in cpu.COST_FIELDS:
        i = next(i for i, line in enumerate(lines) if line.split("=")[0].strip() == field)
        if (
            field not in cpu_terms.ABSENT_FIELDS
        ):  # those may be missing (test_calibration: old files keep their meaning)
            yield pytest.param(
                "\n".join(lines[:i] + lines[i + 1 :]) + "\n", f"cpu.{field} is missing", id=f"cpu-{field}-missing"
            )
        yield pytest.param(
            "\n".join(lines[:i] + [f"{field} = -1.5"] + lines[i + 1 :]) + "\n",
            f"cpu.{field}=-1.5 is out of range; allowed: a number >= 0",
            id=f"cpu-{field}-negative",
        )


@pytest.mark.parametrize("body, fragment", [*_gpu_file_cases(), *_cpu_file_cases()])
def test_target_file_with_a_missing_or_bad_field_on_the_cli(capsys, tmp_path, body, fragment):
    path = tmp_path / "t.toml"
    path.write_text(body)
    code, _, err = _run(capsys, "predict", json.dumps(GOOD), "--target", path)
    assert fragment in _one_line_error(code, err)


def test_calibrated_target_refuses_uncalibrated_work_in_one_line(capsys, tmp_path):
    text = CPU_TARGET.read_text().replace('unexercised = ""', 'unexercised = "grouped_ms_per_gmac"')
    assert "grouped_ms_per_gmac" in text
    path = tmp_path / "partial.toml"
    path.write_text(text)
    regnet = ArchConfig.static("regnety_400mf", 64).to_json()
    code, _, err = _run(capsys, "predict", regnet, "--target", path)
    assert "never calibrated on grouped_gmac work" in _one_line_error(code, err)
    code, out, err = _run(capsys, "predict", ArchConfig.static("resnet18", 64).to_json(), "--target", path)
    assert code == 0, err


@pytest.mark.parametrize(
    "hint, fragment",
    [
        ({"batch_size": "8"}, "config batch_size='8' is not allowed; allowed: a positive integer"),
        ({"batch_size": 0}, "config batch_size=0"),
        ({"batch_size": 2.5}, "config batch_size=2.5"),
        ({"target": 5}, "config target=5 is not a target name"),
        ({"target": "k80"}, "target='k80' is unknown"),
    ],
)
def test_exported_file_with_a_bad_target_or_batch_size(capsys, tmp_path, hint, fragment):
    path = tmp_path / "exported.json"
    path.write_text(json.dumps({**GOOD, **hint}))
    code, _, err = _run(capsys, "predict", path)
    assert fragment in _one_line_error(code, err)


# ----------------------------------------------------------------------------- numeric options


def _numeric_options():
    floats = {common.number, common.positive_number}
    numeric = floats | {common.positive_int, common.nonneg_int, common.int_list, common.image_size}
    for name, p in _subcommands().items():
        for a in p._actions:
            if a.option_strings and a.type in numeric:
                yield name, a.option_strings[-1], a.type in floats


def _required_args(command: str, study) -> list[str]:
    return {
        "predict": ["cfg.json"],
        "bench": ["cfg.json"],
        "train": ["cfg.json"],
        "exits": ["cfg.json", "--weights", "w.pt"],
        "calibrate": ["-o", "t.toml"],
        "validate": ["--target", "v100"],
        "pareto": ["--storage", study["url"], "--study-name", study["name"]],
        "export": ["--storage", study["url"], "--study-name", study["name"]],
    }.get(command, [])


@pytest.mark.parametrize("command, option", [(c, o) for c, o, _ in _numeric_options()])
def test_text_where_a_number_belongs(capsys, tmp_path, monkeypatch, study, command, option):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, command, *_required_args(command, study), option, "abc")
    line = _one_line_error(code, err)
    assert f"argument {option}" in line and "'abc'" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, option", [(c, o) for c, o, is_float in _numeric_options() if is_float])
def test_nan_for_a_number_is_refused(capsys, tmp_path, monkeypatch, study, command, option):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(GOOD))
    before = _listing(tmp_path)
    code, _, err = _run(capsys, command, *_required_args(command, study), option, "nan")
    assert "nan" in _one_line_error(code, err).lower()
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_calibrate_budget_must_be_finite_and_positive(capsys, tmp_path, monkeypatch, value):
    # a NaN budget used to measure forever; a negative one measured, wrote the CSV, then failed
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "calibrate", "-o", "t.toml", "--budget-s", value)
    assert "argument --budget-s" in _one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0, 0, "300"])
def test_measuring_api_rejects_a_budget_that_never_runs_out(budget):
    from dynas.kernels.calibrate import run_plan, run_rounds

    for fn in (run_plan, run_rounds):
        with pytest.raises(ConfigError, match=r"budget_s=.* is out of range; allowed: a finite number of seconds > 0"):
            fn(iter(()), budget_s=budget)


# ----------------------------------------------------------------------------- storages and studies


@pytest.mark.parametrize("command", ["pareto", "export"])
@pytest.mark.parametrize(
    "url, fragment",
    [
        ("not a url", "is not a database URL"),
        ("::::", "is not a database URL"),
        ("sqlite:///{tmp}/missing/x.db", "does not exist"),
        ("sqlite:///{tmp}/notadb.db", "cannot be opened"),
    ],
)
def test_study_commands_with_a_malformed_storage(capsys, tmp_path, monkeypatch, command, url, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notadb.db").write_text("this is not SQLite\n")
    before = _listing(tmp_path)
    code, _, err = _run(capsys, command, "--storage", url.format(tmp=tmp_path))
    line = _one_line_error(code, err)
    assert "storage=" in line and fragment in line
    assert _listing(tmp_path) == before


# ----------------------------------------------------------------------------- output paths


def _writing_commands(study, out: Path) -> dict[str, list[str]]:
    """argv of every command that writes, all of its outputs in folder ``out``."""
    return {
        "export": ["export", "--storage", study["url"], "--study-name", study["name"], "-o", out / "e.json"],
        "pareto-csv": ["pareto", "--storage", study["url"], "--study-name", study["name"], "--csv", out / "f.csv"],
        "pareto-html": ["pareto", "--storage", study["url"], "--study-name", study["name"], "--html", out / "f.html"],
        "calibrate": ["calibrate", "-o", out / "t.toml", "--measurements", CALIBRATION_CSV],
        "validate": [
            "validate",
            "--target",
            CPU_TARGET,
            "--measurements",
            VALIDATION_CSV,
            "--csv",
            out / "v.csv",
            "--html",
            out / "v.html",
        ],
        "train": [
            "train",
            ArchConfig.static("resnet18", 32).to_json(),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--input-size",
            "32",
            "--log-every",
            "1",
            "-o",
            out / "w.pt",
        ],
    }


WRITERS = ["export", "pareto-csv", "pareto-html", "calibrate", "validate", "train"]


@pytest.mark.parametrize("which", [w for w in WRITERS if w not in ("calibrate",)])  # calibrate: test_calibration
def test_output_in_a_missing_folder(capsys, tmp_path, study, which):
    before = _listing(study["folder"])
    code, _, err = _run(capsys, *_writing_commands(study, tmp_path / "missing")[which])
    assert "does not exist" in _one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []
    assert _listing(study["folder"]) == before


def _read_only(monkeypatch, folder: Path) -> None:
    """Make every write into ``folder`` fail as in a read-only folder (root ignores chmod, so the
    temporary file the atomic writer creates is refused instead)."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or ".").resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(dynas.files.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("which", WRITERS)
def test_output_in_a_read_only_folder_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch, study, which):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "keep.txt").write_text("untouched\n")
    _read_only(monkeypatch, out)
    code, _, err = _run(capsys, *_writing_commands(study, out)[which])
    line = _one_line_error(code, err)
    assert "cannot be written: Permission denied" in line and str(out) in line
    assert _listing(out) == {"keep.txt": b"untouched\n"}


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores chmod; the read-only case runs through the patched writer above",
)
@pytest.mark.parametrize("which", WRITERS)
def test_output_in_a_chmod_read_only_folder(capsys, tmp_path, study, which):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = _run(capsys, *_writing_commands(study, out)[which])
        assert "not writable" in _one_line_error(code, err)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def _api_writers():
    target = HardwareTarget(
        name="t",
        description="",
        kind="cpu",
        default_batch_size=1,
        cpu=cpu.CpuCosts(*([1.0] * len(cpu.COST_FIELDS))),
        threads=1,
    )

    def csv(path):
        import pandas as pd

        from dynas.results import write_csv

        return write_csv(pd.DataFrame({"a": [1.0]}), path)

    return {
        "atomic_write_text": (lambda p: atomic_write_text(p, "x\n"), DynasError),
        "atomic_write_bytes": (lambda p: atomic_write_bytes(p, b"x", StudyError), StudyError),
        "write_csv": (csv, StudyError),
        "write_target": (lambda p: write_target(target, p), TargetError),
    }


@pytest.mark.parametrize("name", list(_api_writers()))
def test_api_writers_in_a_read_only_folder(tmp_path, monkeypatch, name):
    write, error = _api_writers()[name]
    _read_only(monkeypatch, tmp_path)
    with pytest.raises(error, match="cannot be written: Permission denied") as info:
        write(tmp_path / "out.txt")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", list(_api_writers()))
def test_failed_replace_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, name):
    write, error = _api_writers()[name]
    old = tmp_path / "out.txt"
    old.write_text("old\n")

    def refuse(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dynas.files.os, "replace", refuse)
    with pytest.raises(error, match="cannot be written: No space left on device"):
        write(old)
    assert _listing(tmp_path) == {"out.txt": b"old\n"}


def test_write_target_refuses_text_toml_cannot_hold(tmp_path):
    bad = HardwareTarget(
        name="cpu\udcff",
        description="",
        kind="cpu",
        default_batch_size=1,
        cpu=cpu.CpuCosts(*([1.0] * len(cpu.COST_FIELDS))),
        threads=1,
    )
    with pytest.raises(TargetError, match="lone surrogate") as info:
        write_target(bad, tmp_path / "t.toml")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the installed console script


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("dynas")
    if script.is_file():
        return [str(script)]
    found = shutil.which("dynas")
    if found is None:
        pytest.fail(f"no dynas console script next to {sys.executable} or on PATH")
    return [found]


@pytest.mark.parametrize("case", ["truncated-config", "negative-target-field", "output-folder-is-a-file"])
def test_console_script_prints_one_line_and_no_traceback(tmp_path, study, case):
    (tmp_path / "cut.json").write_text(json.dumps(GOOD)[:-4])
    (tmp_path / "bad.toml").write_text((BUILTIN_DIR / "v100.toml").read_text().replace("n_sm = 80", "n_sm = -80"))
    argv, expected = {
        "truncated-config": (["predict", "cut.json"], "dynas: error: config is not valid JSON"),
        "negative-target-field": (
            ["predict", json.dumps(GOOD), "--target", "bad.toml"],
            "dynas: error: bad.toml: hardware.n_sm=-80 is out of range",
        ),
        # a regular file as the output's folder: refused before any work, by any user
        "output-folder-is-a-file": (
            ["export", "--storage", study["url"], "-o", "cut.json/e.json"],
            "dynas: error: --output='cut.json/e.json': directory 'cut.json' does not exist",
        ),
    }[case]
    before = _listing(tmp_path)
    proc = subprocess.run(_console_script() + argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(expected), proc.stderr
    assert _listing(tmp_path) == before
