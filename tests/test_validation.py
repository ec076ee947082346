"""Tests of dynas.results.validation: the scores ``dynas validate`` prints (per part and batch
size, scaled by the host's speed), the machine's round noise and the worst networks, on recorded
validation CSVs of tests/data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

DATA = Path(__file__).resolve().parent / "data"


def _compared(folder: str, csv: str, networks: int, **columns):
    """The first ``networks`` networks of a recorded validation CSV, compared with its target."""
    from dynas.predictors.calibration import compare

    target = str(DATA / folder / f"{folder}.toml")
    df = pd.read_csv(DATA / folder / csv)
    return compare(df[df["network_id"] < networks].assign(**columns), target), target


def test_validation_scores_are_summarize_per_part_and_batch_size():
    from dynas.predictors.calibration import summarize
    from dynas.results.validation import SCORE_COLUMNS, score_validation

    df, target = _compared(
        "cpu-2core-dec01-ops", "validation-seed18.csv", 6, host_ratio_before=float("nan"), host_ratio_after=float("nan")
    )
    scores = score_validation(df, target)
    assert list(scores.table.columns) == list(SCORE_COLUMNS)
    assert [(r.part, r.batch_size) for r in scores.table.itertuples()] == [
        ("networks", 1),
        ("networks", 8),
        ("stages", 1),
        ("stages", 8),
    ]  # no block rows measured
    stages_8 = df[df["part"].str.startswith("stage") & (df["batch_size"] == 8)]
    assert scores.table.iloc[3].drop(["part", "batch_size"]).to_dict() == pytest.approx(
        summarize(stages_8), nan_ok=True
    )
    assert scores.host_ratios == () and scores.steady_ratio is None and scores.host_scaling == ""


@pytest.mark.parametrize("before, after, steady", [(0.95, 0.96, True), (0.90, 1.00, False)])
def test_validation_scales_networks_by_a_steady_host_ratio_only(before, after, steady):
    from dynas.predictors.calibration import summarize
    from dynas.results.validation import score_validation

    df, target = _compared(
        "cpu-2core-dec01-ops", "validation-seed18.csv", 6, host_ratio_before=before, host_ratio_after=after
    )
    scores = score_validation(df, target)
    assert scores.host_ratios == (before, after)
    scaled = scores.table[scores.table["part"].str.endswith(" x host")]
    if not steady:
        assert scores.steady_ratio is None and scores.host_scaling == "" and scaled.empty
        return
    ratio = (before * after) ** 0.5
    assert scores.steady_ratio == pytest.approx(ratio) and scores.host_scaling == "steady"
    assert list(scaled["part"]) == ["networks x host"] * 2  # stages are not scaled by the before/after ratio
    nets = df[(df["part"] == "network") & (df["batch_size"] == 1)]
    by_hand = summarize(nets.assign(rel_err=nets["predicted_ms"] * ratio / nets["measured_ms"] - 1))
    assert scaled.iloc[0]["mape_pct"] == pytest.approx(by_hand["mape_pct"])


def test_validation_scales_every_part_by_its_paired_static_network():
    from dynas.predictors.calibration import calibrated_static_ms, per_sample_gated
    from dynas.predictors.targets import load_target
    from dynas.results.validation import host_factors, score_validation, scored_parts

    df, target = _compared("cpu-2core-dec01-pairs", "validation-seed28.csv", 8)
    scores = score_validation(df, target)
    assert scores.host_scaling == "pairs"
    assert {"networks x host", "stages x host", "blocks x host"} <= set(scores.table["part"])
    factors, how = host_factors(df, load_target(target))
    assert how == "pairs"
    pd.testing.assert_series_equal(
        factors, df["reference_ms"] / calibrated_static_ms(df, load_target(target)), check_names=False
    )
    assert host_factors(df.drop(columns="host_check"), load_target(target))[1] == "each"
    blocks = df["part"].str.startswith("block")
    gated = per_sample_gated(df)
    assert scores.blocks == int((blocks & ~gated).sum()) == int(scored_parts(df)["blocks"].sum())
    assert scores.gated_blocks == int((blocks & gated).sum()) > 0


def test_round_noise_is_busy_above_the_quiet_spread():
    from dynas.results.validation import QUIET_SPREAD_PCT, round_noise

    df = pd.DataFrame({"part": ["network", "network", "stage0"], "round_spread": [0.02, 0.08, 0.5]})
    noise = round_noise(df)
    assert noise.spread == {"count": 2, "median_pct": pytest.approx(5.0), "p90_pct": pytest.approx(7.4)}
    assert noise.paired is None and not noise.busy  # a median of exactly QUIET_SPREAD_PCT is not busy
    assert QUIET_SPREAD_PCT == 5.0 and round_noise(df.assign(round_spread=[0.06, 0.08, 0.0])).busy
    paired = round_noise(df.assign(round_spread=[0.2, 0.3, 0.0], paired_spread=[0.01, 0.02, 0.0]))
    assert paired.paired["median_pct"] == pytest.approx(1.5) and not paired.busy  # the pairs held the drift
    assert round_noise(df.drop(columns="round_spread")) is None


def test_host_ratio_and_worst_networks():
    from dynas.results.validation import host_ratio, worst_networks

    assert host_ratio([{"ratio": 1.0}, {"ratio": 3.0}, {"ratio": 1.2}]) == 1.2
    assert host_ratio([]) is None
    df = pd.DataFrame({"part": ["network", "stage0", "network", "network"], "rel_err": [0.1, -0.9, -0.3, 0.2]})
    assert list(worst_networks(df, 2)["rel_err"]) == [-0.3, 0.2]
