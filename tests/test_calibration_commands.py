"""dynas calibrate / validate / predict / search end to end on a calibrated target (small, time-budgeted runs: the two with 3-4 s budgets are here, side by side)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dynas.cli import main
from dynas.predictors.calibration import fit_target
from dynas.predictors.targets import load_target
from dynas.spaces.config import ArchConfig
from tests.calibration_data import DATA

#: the small calibration the commands' tests share (time budget 4 s: under heavy host load its
#: plan may not finish in time)
_CALIBRATE = (
    "calibrate -o mine.toml --backbones resnet18 --input-size 32 --batch-size 1,2 --budget-s 4 --rounds 2 "
    "--repeats 1 --threads 1 -q"
)
#: validation of ``mine.toml`` on ResNet-18 at 32 x 32, one timing per round
_VALIDATE = "validate --target mine.toml --backbones resnet18 --input-size 32 --repeats 1"


def _cli(args: str) -> None:
    """Run one dynas command line (split on spaces); it must succeed."""
    assert main(args.split()) == 0


def _in(directory: Path, args: str) -> str:
    """Run ``args`` in ``directory`` outside any test's fixtures; what it printed."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(directory)
        _cli(args)
    return out.getvalue()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, str]:
    """A directory holding one small calibration (mine.toml, mine.csv), and what it printed."""
    d = tmp_path_factory.mktemp("calibrated")
    return d, _in(d, _CALIBRATE)


@pytest.fixture(scope="module")
def validated(calibrated) -> tuple[Path, str]:
    """The calibration's directory after one validation (validate-mine.csv / .html), and what it printed."""
    d, _ = calibrated
    return d, _in(d, _VALIDATE + " --count 2 --batch-size 1 --rounds 2 -q")


def test_calibrate_writes_the_target_and_its_measurements(calibrated, monkeypatch):
    d, out = calibrated
    monkeypatch.chdir(d)
    assert "fit on" in out and Path("mine.toml").is_file() and Path("mine.csv").is_file()
    assert "\nrounds: " in out and "longer than its fastest" in out
    t = load_target("./mine.toml")
    assert t.kind == "cpu" and t.threads == 1 and t.environment["backbones"] == "resnet18"
    assert t.fit["round_spread_median_pct"] >= 0 and t.fit["round_spread_p90_pct"] >= t.fit["round_spread_median_pct"]
    assert set(t.static_ms) == {"resnet18-32x32-b1", "resnet18-32x32-b2"}  # the plan's static networks
    cal = pd.read_csv("mine.csv")
    assert {"measured_ms", "device_name", "torch_version", "threads", "date", "batch_size"} <= set(cal.columns)
    # refit from the CSV gives the same target
    _cli("calibrate -o again.toml --measurements mine.csv -q")
    assert load_target("./again.toml").cpu == t.cpu


def test_validate_scores_networks_stages_and_blocks(validated, monkeypatch):
    d, out = validated
    monkeypatch.chdir(d)
    assert "networks" in out and "Spearman" in out and "host speed:" in out and "\nrounds: 2 networks" in out
    val = pd.read_csv("validate-mine.csv")
    before, after = val["host_ratio_before"].iloc[0], val["host_ratio_after"].iloc[0]
    assert before > 0 and after > 0 and val["host_ratio_before"].nunique() == val["host_ratio_after"].nunique() == 1
    assert ("networks x host" in out) == (abs(before / after - 1) <= 0.03)
    assert set(val["part"]) >= {"network", "stage0", "block0.0", "block3.1"} and np.isfinite(val["predicted_ms"]).all()
    assert "\nblocks " in out
    html = Path("validate-mine.html").read_text()
    assert "plotly" in html[:100000] and all(t in html for t in ("whole networks", "single stages", "single blocks"))


def test_validate_rescores_its_measurements_without_measuring(validated, capsys, monkeypatch):
    d, _ = validated
    monkeypatch.chdir(d)
    _cli("validate --target mine.toml --measurements validate-mine.csv --csv re.csv --html re.html -q")
    np.testing.assert_allclose(pd.read_csv("re.csv")["predicted_ms"], pd.read_csv("validate-mine.csv")["predicted_ms"])
    assert "host speed:" in capsys.readouterr().out  # the recorded ratio is scored again


def test_validate_with_each_network_followed_by_its_static_network(calibrated, capsys, monkeypatch):
    # per-network host factors
    monkeypatch.chdir(calibrated[0])
    _cli(_VALIDATE + " --count 1 --batch-size 2 --rounds 1 --host-check each --csv each.csv --html each.html -q")
    out = capsys.readouterr().out
    assert "networks x host" in out and "each prediction scaled by its static network" in out
    assert (pd.read_csv("each.csv")["reference_ms"] > 0).all()


def test_validate_without_host_check_or_blocks(calibrated, capsys, monkeypatch):
    monkeypatch.chdir(calibrated[0])
    _cli(
        _VALIDATE
        + " --count 1 --batch-size 1 --rounds 1 --host-check none --csv none.csv --html none.html --no-blocks -q"
    )
    out = capsys.readouterr().out
    assert "host" not in out and "\nblocks " not in out and "\nrounds: " not in out  # one round
    none = pd.read_csv("none.csv")
    assert "host_ratio_before" not in none and not none["part"].str.startswith("block").any()


def test_predict_and_search_on_the_calibrated_target(calibrated, tmp_path, monkeypatch):
    monkeypatch.chdir(calibrated[0])
    assert (
        main(
            ["predict", json.dumps(ArchConfig.static("resnet18", 32).to_dict()), "--target", "./mine.toml"]
            + ["--batch-size", "2"]
        )
        == 0
    )
    _cli(
        "search --backbone resnet18 --input-size 32 --target ./mine.toml --trials 6 --batch-size 1 "
        f"--storage sqlite:///{tmp_path / 's.db'} -q"
    )


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


def test_calibrate_and_validate_in_pairs(tmp_path, capsys, monkeypatch):
    # time budget 8 s: at 3 s a loaded host measured too few networks to fit (22 part rows needed)
    monkeypatch.chdir(tmp_path)
    _cli(
        "calibrate -o p.toml --backbones resnet18 --input-size 32 --batch-size 1 --budget-s 8 --rounds 2 "
        "--repeats 1 --threads 1 --host-check pairs -q"
    )
    out = capsys.readouterr().out
    t = load_target("./p.toml")
    n = t.fit["host_normalized_networks"]
    assert n >= 1 and f"pairs: {n} networks fitted in units of the quietest host seen" in out
    assert "relative to its static network" in out and t.fit["paired_spread_median_pct"] >= 0
    cal = pd.read_csv("p.csv")
    assert (cal["host_check"] == "pairs").all() and (cal["reference_ms"] > 0).all()
    validate = (
        "validate --target p.toml --backbones resnet18 --input-size 32 --count 1 --batch-size 1 --repeats 1 --rounds 1"
    )
    _cli(validate + " --host-check pairs --csv v.csv --html v.html -q")
    out = capsys.readouterr().out
    assert all(f"{part} x host" in out for part in ("networks", "stages", "blocks"))
    assert "timed pass by pass alongside it" in out
    assert (pd.read_csv("v.csv")["host_check"] == "pairs").all()
    # a target calibrated in pairs is validated in pairs unless told otherwise
    _cli(validate + " --no-blocks --csv d.csv --html d.html -q")
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
