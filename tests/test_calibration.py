"""Calibration: measured target files, the design and the fit of the CPU costs, measuring."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dynas.cli import main
from dynas.errors import ConfigError, TargetError
from dynas.kernels.calibrate import measure, run_plan
from dynas.predictors import cpu
from dynas.predictors.calibration import compare, fit_target, per_sample_gated, retest_summary, round_spread
from dynas.predictors.latency import predict, predict_blocks
from dynas.predictors.targets import load_target, target_toml, write_target
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import PARADIGMS, ArchConfig, StageConfig, budget_count
from dynas.spaces.design import CALIBRATION_RATES, VALIDATION_RATES, PlanItem, calibration_plan, validation_plan
from tests.calibration_data import DATA
from tests.calibration_data import unit_target as _target

# ----------------------------------------------------------------------------- target files


def test_cpu_target_round_trips_through_toml(tmp_path):
    t = dataclasses.replace(_target(cpu.CpuCosts(*(0.5 + i for i in range(len(cpu.COST_FIELDS))))), column_block=4)
    path = write_target(t, tmp_path / "mine.toml")
    back = load_target(str(path))
    assert back.kind == "cpu" and back.cpu == t.cpu and back.threads == 2 and back.column_block == 4
    cfg = ArchConfig.static("resnet18", 64)
    assert predict(cfg, str(path), 1).latency_ms == pytest.approx(predict(cfg, t, 1).latency_ms)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("conv_call_us"), "cpu.conv_call_us is missing"),
        (lambda c: c.update(conv_call_us=-1.0), "cpu.conv_call_us=-1.0 is out of range"),
        (lambda c: c.update(bogus=1.0), "cpu.bogus is unknown"),
        (lambda c: c.update(threads=0), "cpu.threads=0 is out of range"),
        (lambda c: c.update(column_block=0), "cpu.column_block=0 is out of range"),
        (lambda c: c.update(column_block=2.5), "cpu.column_block=2.5 is not a positive integer"),
    ],
)
def test_cpu_target_file_errors_name_the_field(tmp_path, edit, message):
    import tomllib

    data = tomllib.loads(target_toml(_target()))
    edit(data["cpu"])
    lines = ['name = "bad"', 'kind = "cpu"', "[cpu]"] + [f"{k} = {v}" for k, v in data["cpu"].items()]
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TargetError, match=message.replace("(", r"\(")):
        load_target(str(path))


def test_write_target_into_missing_directory_writes_nothing(tmp_path):
    with pytest.raises(TargetError, match="does not exist"):
        write_target(_target(), tmp_path / "no" / "t.toml")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- design and fit


def test_calibration_plan_is_stratified_and_balanced():
    items = list(itertools.islice(calibration_plan(("resnet18", "resnet50"), 64, (1, 8), seed=3), 4 + 2 * 2 * 12))
    assert all(i.config.stages == ArchConfig.static(i.config.backbone, 64).stages for i in items[:4])
    rest = items[4:]
    assert [i.batch_size for i in rest[:4]] == [1, 8, 1, 8]
    for backbone in ("resnet18", "resnet50"):
        cfgs = [i.config for i in rest if i.config.backbone == backbone and i.batch_size == 1][:12]
        for s in range(4):
            seen = [c.stages[s].paradigm for c in cfgs]
            assert {p: seen.count(p) for p in PARADIGMS} == {p: 2 for p in PARADIGMS}
            rates = [c.stages[s].rate for c in cfgs if c.stages[s].paradigm != "static"]
            assert set(rates) <= set(CALIBRATION_RATES)


def test_validation_configs_never_use_a_calibration_rate():
    items = validation_plan(("resnet18", "regnety_400mf"), 64, (1,), count=20, seed=5)
    assert len(items) == 20 and {i.config.backbone for i in items} == {"resnet18", "regnety_400mf"}
    for i in items:
        for st in i.config.stages:
            if st.paradigm != "static":
                assert st.rate in VALIDATION_RATES and st.rate not in CALIBRATION_RATES
    again = validation_plan(("resnet18", "regnety_400mf"), 64, (1,), count=20, seed=5)
    assert [i.config for i in items] == [i.config for i in again]


def _synthetic_table(true: cpu.CpuCosts, batch_sizes: tuple[int, ...], count: int = 120) -> pd.DataFrame:
    """Calibration rows whose times are ``true``'s predictions of the calibration plan's networks."""
    plan = itertools.islice(calibration_plan(("resnet18", "resnet50", "regnety_400mf"), 64, batch_sizes, seed=0), count)
    rows = []
    for net, item in enumerate(plan):
        p = predict(item.config, _target(true), item.batch_size)
        parts = [("stem", -1, p.stem_ms), ("head", -1, p.head_ms)] + [
            (f"stage{s}", s, st.latency_ms) for s, st in enumerate(p.stages)
        ]
        for part, stage, ms in parts:
            rows.append(
                {
                    "network_id": net,
                    "config": item.config.to_json(indent=None),
                    "batch_size": item.batch_size,
                    "part": part,
                    "stage": stage,
                    "measured_ms": ms,
                }
            )
    return pd.DataFrame(rows)


def test_fit_recovers_the_costs_that_generated_the_measurements():
    true = cpu.CpuCosts(*(1.0 + (7 * i) % 11 for i in range(len(cpu.COST_FIELDS))))
    fitted = fit_target(_synthetic_table(true, (1, 4)), "synthetic", {"threads": 2})
    assert fitted.fit["parts_mape_pct"] < 1e-3 and fitted.fit["outlier_rows"] == 0
    cfg = ArchConfig("resnet50", (64, 64), (StageConfig("spatial", 0.35, spatial_granularity=2),) * 4)
    assert predict(cfg, fitted, 4).latency_ms == pytest.approx(predict(cfg, _target(true), 4).latency_ms, rel=1e-4)


def test_a_batch_1_calibration_prices_later_channel_parts_like_the_first():
    # at batch 1 a block never runs a second channel part: nothing measures those costs, so the
    # fit gives them the first part's instead of leaving them unexercised (an error at batch 8)
    true = cpu.CpuCosts(*(1.0 + (7 * i) % 11 for i in range(len(cpu.COST_FIELDS))))
    fitted = fit_target(_synthetic_table(true, (1,), 60), "batch1", {"threads": 2})
    assert fitted.unexercised == ()
    for later, first in cpu.LATER_PART_FIELDS.items():
        assert getattr(fitted.cpu, later) == getattr(fitted.cpu, first) == pytest.approx(getattr(true, first), rel=1e-4)
    cfg = ArchConfig("resnet18", (64, 64), (StageConfig("channel", 0.5, channel_granularity=4),) + (StageConfig(),) * 3)
    assert predict(cfg, fitted, 8).latency_ms > 0


def test_narrow_maps_cost_the_column_block_in_macs():
    # 2x2 spatial patches: conv2 of a bottleneck runs on [P, k, 4, 4] windows -> [P, k, 2, 2],
    # two output columns; with a column block of 4 its MACs count 2x, wide maps' not at all.
    b = get_backbone("resnet50", (224, 224)).stage_blocks(2)[1]  # 14 x 14
    patches = StageConfig("spatial", 0.5, spatial_granularity=2)
    work = {cb: cpu.block_work(b, patches, 1, 1.0, cb) for cb in (1, 4)}
    small = cpu.TERMS.index("smallmap_gmac")
    conv2_gmac = budget_count(0.5, 49) * 4 * b.width * b.width * 9 * 1e-9  # [P, k, 4, 4] -> [P, k, 2, 2]
    assert work[4][small] - work[1][small] == pytest.approx(conv2_gmac)
    others = np.arange(len(cpu.TERMS)) != small
    assert np.array_equal(work[4][others], work[1][others])
    static = StageConfig()
    assert np.array_equal(cpu.block_work(b, static, 1, 1.0, 4), cpu.block_work(b, static, 1, 1.0, 1))  # 14 columns
    # 1x1 patches: conv2 is a matrix product of window rows, which has no columns
    one = StageConfig("spatial", 0.5, spatial_granularity=1)
    assert np.array_equal(cpu.block_work(b, one, 1, 1.0, 4), cpu.block_work(b, one, 1, 1.0, 1))


def test_the_model_folds_row_products_where_the_kernels_do(request):
    from dynas.kernels import blocks

    assert (cpu.FOLD_MIN_ROWS, cpu.FOLD_MIN_MACS) == (blocks.FOLD_MIN_ROWS, blocks.FOLD_MIN_MACS)
    # a channel-gated bottleneck: conv1 / conv3 are row products on the selected channels
    gated = StageConfig("channel", 0.5, channel_granularity=64)
    mm, pw = cpu.TERMS.index("mm_gmac"), cpu.TERMS.index("pointwise_gmac")
    vec = cpu.TERMS.index("vec_gmac")
    big = get_backbone("resnet50", (224, 224)).stage_blocks(2)[1]  # 1024 -> 256 -> 1024 on 14 x 14
    small = get_backbone("resnet50", (224, 224)).stage_blocks(3)[1]  # 2048 -> 512 -> 2048 on 7 x 7
    k_big, k = budget_count(0.5, 4) * 64, budget_count(0.5, 8) * 64  # of 256 and 512 channels
    big_gmac = 196 * k_big * 1024 * 1e-9  # conv1 [196, 1024] -> [196, k], and conv3 [196, k] -> [196, 1024]
    rows_gmac = 49 * k * (2048 + 2048) * 1e-9  # conv1 [49, 2048] -> [49, k], conv3 [49, k] -> [49, 2048]
    # this host's rule (4,096 rows): batch-1 products stay BLAS products
    w_big, w_small = cpu.block_work(big, gated, 1, 1.0, 1), cpu.block_work(small, gated, 1, 1.0, 1)
    assert w_big[pw] == 0 and w_big[mm] == pytest.approx(2 * big_gmac, rel=1e-2)
    assert w_small[mm] == pytest.approx(rows_gmac, rel=1e-2)
    # folding from 64 rows (a host where oneDNN's 1x1 convolution is faster): conv1 on 196 rows
    # folds; conv3 on selected inputs is a product with a transposed operand, which never folds
    request.getfixturevalue("fold_from_64_rows")
    w_big, w_small = cpu.block_work(big, gated, 1, 1.0, 1), cpu.block_work(small, gated, 1, 1.0, 1)
    assert 0 < w_big[vec] < 1e-3  # only the masker's small layers stay BLAS
    assert w_big[pw] == pytest.approx(big_gmac) and w_big[mm] == pytest.approx(big_gmac, rel=1e-2)
    assert w_small[mm] == pytest.approx(rows_gmac, rel=1e-2)  # 49 rows: too few to fold


def test_old_target_files_keep_their_meaning(tmp_path):
    # files written before row products and indexed rows had their own costs load as they fitted
    costs = cpu.CpuCosts(*(0.5 + i for i in range(len(cpu.COST_FIELDS))))
    text = target_toml(_target(costs))
    later = ("mm_ms_per_gmac", "vec_ms_per_gmac", "index_ms_per_mrow", "masker_call_us", "dynamic_stage_us")
    old = "\n".join(line for line in text.splitlines() if not line.startswith(later))
    (tmp_path / "old.toml").write_text(old)
    back = load_target(str(tmp_path / "old.toml")).cpu
    assert back.mm_ms_per_gmac == back.vec_ms_per_gmac == costs.pointwise_ms_per_gmac and back.index_ms_per_mrow == 0.0
    assert back.masker_call_us == back.dynamic_stage_us == 0.0  # no gate cost beyond the counted operators
    assert back._replace(**{f: getattr(costs, f) for f in later}) == costs
    # a file with row products but no per-sample products priced them alike
    (tmp_path / "mid.toml").write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith("vec_ms_per_gmac"))
    )
    assert load_target(str(tmp_path / "mid.toml")).cpu.vec_ms_per_gmac == costs.mm_ms_per_gmac


@pytest.mark.parametrize("true_block", [1, 4])
@pytest.mark.parametrize("whole", [False, True], ids=["stages", "whole-networks"])
def test_fit_picks_the_column_block_that_generated_the_measurements(true_block, whole):
    true = cpu.CpuCosts(*(1.0 + (7 * i) % 11 for i in range(len(cpu.COST_FIELDS))))
    gen = dataclasses.replace(_target(true), column_block=true_block)
    plan = itertools.islice(calibration_plan(("resnet50",), 224, (1,), seed=0), 60)
    rows = []
    for net, item in enumerate(plan):
        p = predict(item.config, gen, item.batch_size)
        parts = [(f"stage{s}", s, st.latency_ms) for s, st in enumerate(p.stages)]
        if whole:  # every part and the network: the block is chosen by cross-validated networks
            parts += [("stem", -1, p.stem_ms), ("head", -1, p.head_ms), ("network", -1, p.latency_ms)]
        for part, stage, ms in parts:
            rows.append(
                {
                    "network_id": net,
                    "config": item.config.to_json(indent=None),
                    "batch_size": item.batch_size,
                    "part": part,
                    "stage": stage,
                    "measured_ms": ms,
                }
            )
    fitted = fit_target(pd.DataFrame(rows), "synthetic", {"threads": 2})
    assert fitted.column_block == true_block and fitted.fit["parts_mape_pct"] < 1e-3
    cv = fitted.fit["column_block_network_cv_mape_pct"]
    assert (cv != "") == whole and (not whole or f"{true_block}: 0.00" in cv)


def test_the_column_block_is_the_one_that_predicts_held_out_networks_best(monkeypatch):
    from dynas.predictors import calibration as cal

    data = DATA / "cpu-2core-dec01-pairs"
    table = pd.read_csv(data / "cpu-2core-dec01-pairs.csv")
    table = table[table["network_id"] < 120]
    fitted = fit_target(table, "t")
    cv = {
        int(k): float(v)
        for k, v in (kv.split(": ") for kv in fitted.fit["column_block_network_cv_mape_pct"].split(", "))
    }
    assert set(cv) == set(cpu.COLUMN_BLOCKS) and fitted.column_block == min(cv, key=cv.get)
    # too few whole networks to cross-validate: the part rows' median error decides
    monkeypatch.setattr(cal, "CV_MIN_NETWORKS", 10_000)
    few = fit_target(table, "t")
    med = {int(k): float(v) for k, v in (kv.split(": ") for kv in few.fit["column_block_median_err_pct"].split(", "))}
    assert few.fit["column_block_network_cv_mape_pct"] == "" and few.column_block == min(med, key=med.get)


def test_fit_rejects_tables_it_cannot_use():
    with pytest.raises(ConfigError, match="column 'measured_ms' is missing"):
        fit_target(pd.DataFrame({"config": ["{}"], "batch_size": [1], "part": ["stem"], "stage": [-1]}), "x")
    with pytest.raises(ConfigError, match="measured_ms=-1.0 is out of range"):
        fit_target(
            pd.DataFrame({"config": ["{}"], "batch_size": [1], "part": ["stem"], "stage": [-1], "measured_ms": [-1.0]}),
            "x",
        )


# ----------------------------------------------------------------------------- measuring


def test_measure_splits_a_pass_into_its_parts():
    cfg = ArchConfig("resnet18", (32, 32), (StageConfig("layer", 0.5),) + (StageConfig(),) * 3)
    m = measure(cfg, 2, repeats=2, warmup=0)
    assert len(m.stages_ms) == 4 and min(m.stages_ms) > 0 and m.stem_ms > 0 and m.head_ms > 0
    assert m.stem_ms + sum(m.stages_ms) + m.head_ms <= m.network_ms * 1.5  # medians of parts of the same passes


def test_measure_times_every_block_in_passes_of_their_own():
    cfg = ArchConfig("resnet18", (32, 32), (StageConfig("channel", 0.5, channel_granularity=8),) + (StageConfig(),) * 3)
    assert measure(cfg, 1, repeats=1, warmup=0).blocks_ms == ()
    m = measure(cfg, 2, repeats=3, warmup=1, blocks=True)
    assert [len(b) for b in m.blocks_ms] == [cfg.spec.stage_depth(s) for s in range(4)]
    assert min(min(b) for b in m.blocks_ms) > 0
    rows = pd.DataFrame(run_plan([PlanItem(cfg, 1)], repeats=1, warmup=0, blocks=True))
    blocks = rows[rows["part"].str.startswith("block")]
    assert list(blocks["part"]) == [f"block{s}.{i}" for s in range(4) for i in range(cfg.spec.stage_depth(s))]
    assert (blocks["stage"] == blocks["part"].str[5].astype(int)).all() and (blocks["measured_ms"] > 0).all()
    assert blocks["choice"].iloc[0] == cfg.stages[0].short()


def test_the_fit_and_the_scores_keep_block_rows_apart():
    data = DATA / "cpu-2core-dec01-late"
    cal = pd.read_csv(data / "cpu-2core-dec01-late.csv")
    cal = cal[cal["network_id"] < 60]
    first = cal[cal["part"] == "stage0"]
    junk = first.assign(part="block0.0", measured_ms=first["measured_ms"] * 50)  # would wreck a fit that used them
    assert fit_target(pd.concat([cal, junk]), "t").cpu == fit_target(cal, "t").cpu
    scored = compare(pd.concat([cal, junk]), str(data / "cpu-2core-dec01-late.toml"))
    blocks = scored[scored["part"] == "block0.0"]
    want = [
        predict_blocks(c, str(data / "cpu-2core-dec01-late.toml"), int(n))[0][0]
        for c, n in zip(blocks["config"], blocks["batch_size"])
    ]
    np.testing.assert_allclose(blocks["predicted_ms"], want, rtol=1e-12)
    gated = per_sample_gated(blocks)
    assert gated.any() and not gated.all()  # the calibration design has stage-0 layer gates and others
    with pytest.raises(
        ConfigError, match=r"part='block0\.9' is not a block of resnet18; allowed: block<stage>\.<index>"
    ):
        compare(junk.assign(part="block0.9").head(1), str(data / "cpu-2core-dec01-late.toml"))


def test_run_plan_rows_carry_the_environment_and_stop_at_max_items():
    rows = run_plan(validation_plan(("resnet18",), 32, (1,), count=3, seed=0), repeats=1, warmup=0, max_items=2)
    df = pd.DataFrame(rows)
    assert df["network_id"].nunique() == 2
    assert set(df["part"]) == {"stem", "stage0", "stage1", "stage2", "stage3", "head", "network"}
    for col in ("device", "device_name", "torch_version", "threads", "date", "gate_mode"):
        assert df[col].notna().all()


def test_run_rounds_keeps_each_networks_fastest_round(monkeypatch):
    import dynas.kernels.calibrate as cal

    items = validation_plan(("resnet18",), 32, (1,), count=3, seed=0)
    slow = {(0, 0), (1, 2)}  # (round, network) pairs disturbed by "other load"
    calls = []

    def fake_measure(config, n, device, repeats, warmup, seed, blocks=False, reference=None):
        net = [i.config for i in items].index(config)
        rnd = sum(1 for c in calls if c == net)
        calls.append(net)
        t = (10.0 + net) * (3.0 if (rnd, net) in slow else 1.0)
        return cal.Measurement(1.0, (t / 4,) * 4, 1.0, t, repeats)

    monkeypatch.setattr(cal, "measure", fake_measure)
    rows = pd.DataFrame(cal.run_rounds(items, 2, repeats=1, seed=7))
    net = rows[rows["part"] == "network"].set_index("network_id")["measured_ms"]
    assert net.to_dict() == {0: 10.0, 1: 11.0, 2: 12.0}
    assert calls == [0, 1, 2, 2, 1, 0]  # the second round runs in reverse order
    assert (rows["rounds"] == 2).all() and len(rows) == 3 * 7
    # how much longer each network's slower round took: the machine's noise
    spread = rows.groupby("network_id")["round_spread"].agg(["min", "max"])
    assert (spread["min"] == spread["max"]).all() and spread["max"].tolist() == pytest.approx([2.0, 0.0, 2.0])
    assert round_spread(rows) == pytest.approx({"count": 3, "median_pct": 200.0, "p90_pct": 200.0})
    assert round_spread(rows.drop(columns="round_spread")) is None


def test_run_rounds_on_an_endless_plan_remeasures_the_first_rounds_networks(monkeypatch):
    import dynas.kernels.calibrate as cal

    seen = []

    def fake_measure(config, n, device, repeats, warmup, seed, blocks=False, reference=None):
        seen.append((config, n, seed))
        return cal.Measurement(1.0, (1.0,) * 4, 1.0, 7.0 + len(seen), repeats)

    monkeypatch.setattr(cal, "measure", fake_measure)
    rows = pd.DataFrame(
        cal.run_rounds(calibration_plan(("resnet18",), 32, (1,), seed=0), 2, repeats=1, seed=3, max_items=4)
    )
    assert sorted(rows["network_id"].unique()) == [0, 1, 2, 3]
    assert len(seen) == 8 and seen[4:] == seen[:4][::-1]  # the same networks and seeds, reversed
    assert [s for _, _, s in seen[:4]] == [3, 4, 5, 6]
    first = rows[rows["part"] == "network"]["measured_ms"].tolist()
    assert first == [8.0, 9.0, 10.0, 11.0]  # each keeps its faster (first) round


def _rescore(target: Path, tmp_path: Path) -> None:
    """``dynas validate`` re-scoring ``tmp_path/m.csv`` against ``target``; it must succeed."""
    out = ["--csv", str(tmp_path / "out.csv"), "--html", str(tmp_path / "out.html"), "-q"]
    assert main(["validate", "--target", str(target), "--measurements", str(tmp_path / "m.csv"), *out]) == 0


@pytest.mark.parametrize("spread, busy", [(0.089, True), (0.03, False)])
def test_a_busy_machine_is_named_next_to_the_scores(tmp_path, capsys, spread, busy):
    # seed 23 of the late calibration was measured while the host was busy (rounds a median 8.9 % apart)
    data = DATA / "cpu-2core-dec01-late"
    val = pd.read_csv(data / "validation-seed23.csv")
    val["round_spread"] = spread
    val.to_csv(tmp_path / "m.csv", index=False)
    _rescore(data / "cpu-2core-dec01-late.toml", tmp_path)
    captured = capsys.readouterr()
    assert f"a median {100 * spread:.1f}% longer" in captured.out
    assert ("the machine was busy: a median round spread of 8.9% is more than 5%" in captured.err) == busy
    assert ("busy" in captured.err) == busy
    assert ("--host-check pairs" in captured.err) == busy


@pytest.mark.parametrize("paired, busy", [(0.021, False), (0.083, True)])
def test_pairs_that_held_the_drift_silence_the_busy_warning(tmp_path, capsys, paired, busy):
    data = DATA / "cpu-2core-dec01-pairs"
    val = pd.read_csv(data / "validation-seed28.csv")
    val = val[val["network_id"] < 8].assign(round_spread=0.171, paired_spread=paired)
    val.to_csv(tmp_path / "m.csv", index=False)
    _rescore(data / "cpu-2core-dec01-pairs.toml", tmp_path)
    captured = capsys.readouterr()
    assert "a median 17.1% longer" in captured.out and f"a median {100 * paired:.1f}% longer" in captured.out
    assert "networks x host" in captured.out and "timed pass by pass alongside it" in captured.out
    assert ("the machine was busy even for pairs" in captured.err) == busy and ("round spread" not in captured.err)


def test_host_speed_times_the_recorded_static_networks_again(monkeypatch):
    from dynas.kernels import calibrate as kc

    timed = []

    def fake_measure(cfg, n, device="cpu", repeats=5, warmup=1, seed=0):
        timed.append((cfg.backbone, n))
        return kc.Measurement(0.0, (), 0.0, 12.0 if n == 1 else 30.0, repeats)

    monkeypatch.setattr(kc, "measure", fake_measure)
    recorded = {"resnet18-64x64-b1": 10.0, "resnet18-64x64-b8": 40.0, "resnet50-64x64-b1": 5.0}
    rows = kc.host_speed(
        recorded,
        [("resnet18", 64, 1), ("resnet18", 64, 1), ("resnet18", 64, 8), ("resnet18", 64, 2), ("resnet34", 64, 1)],
    )
    # each recorded network once; unrecorded ones (batch 2, resnet34) are skipped
    assert timed == [("resnet18", 1), ("resnet18", 8)]
    assert [(r["key"], r["ratio"]) for r in rows] == [("resnet18-64x64-b1", 1.2), ("resnet18-64x64-b8", 0.75)]


def test_run_plan_times_the_reference_after_each_item(monkeypatch):
    from dynas.kernels import calibrate as kc

    order = []
    monkeypatch.setattr(
        kc,
        "measure",
        lambda cfg, n, *a, **k: (
            order.append(("net", n)) or kc.Measurement(1.0, tuple(1.0 for _ in cfg.stages), 1.0, 6.0, 1)
        ),
    )
    items = list(itertools.islice(calibration_plan(["resnet18"], 32, (1, 2), seed=0), 3))
    rows = kc.run_plan(items, reference=lambda item: order.append(("ref", item.batch_size)) or 2.0 * item.batch_size)
    assert order == [("net", 1), ("ref", 1), ("net", 2), ("ref", 2), ("net", 1), ("ref", 1)]
    assert [r["reference_ms"] for r in rows if r["part"] == "network"] == [2.0, 4.0, 2.0]


def test_measure_runs_a_reference_pass_after_every_pass():
    import torch

    cfg = ArchConfig("resnet18", (32, 32), (StageConfig("layer", 0.5),) + (StageConfig(),) * 3)

    class Reference(torch.nn.Module):
        def forward(self, x):
            return x

    order = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: (
            order.append(type(mod).__name__) if type(mod).__name__ in ("DynamicNet", "Reference") else None
        )
    )
    try:
        m = measure(cfg, 2, repeats=3, warmup=2, reference=Reference())
    finally:
        hook.remove()
    assert order == ["DynamicNet", "Reference"] * 5  # after each of 2 warm-up and 3 timed passes
    assert m.reference_ms > 0
    assert math.isnan(measure(cfg, 1, repeats=1, warmup=0).reference_ms)


def test_run_plan_pairs_each_network_with_its_static_network(monkeypatch):
    from dynas.kernels import calibrate as kc
    from dynas.kernels import model as km

    built = []
    real_build = km.build_model
    monkeypatch.setattr(km, "build_model", lambda cfg: built.append(cfg) or real_build(cfg))
    items = validation_plan(("resnet18",), 32, (1, 2), count=2, seed=0)
    rows = pd.DataFrame(kc.run_plan(items, repeats=1, warmup=0, paired=True))
    nets = rows[rows["part"] == "network"]
    assert len(nets) == 4 and (nets["reference_ms"] > 0).all() and (rows["host_check"] == "pairs").all()
    # one static model serves every network of its backbone and input size, at every batch size
    assert [c for c in built if c == ArchConfig.static("resnet18", 32)] == [ArchConfig.static("resnet18", 32)]
    with pytest.raises(ConfigError, match=r"paired=True with a reference is out of range"):
        kc.run_plan(items, paired=True, reference=lambda item: 1.0)


def test_paired_times_are_fitted_in_units_of_the_quiet_host():
    from dynas.predictors.calibration import host_normalized

    true = cpu.CpuCosts(*(1.0 + (7 * i) % 11 for i in range(len(cpu.COST_FIELDS))))
    plan = list(itertools.islice(calibration_plan(("resnet18", "regnety_400mf"), 64, (1, 4), seed=0), 100))
    assert all(all(st.paradigm == "static" for st in i.config.stages) for i in plan[:4])  # static ones come first
    rng = random.Random(0)
    rows, quiet_ms = [], []
    for net, item in enumerate(plan):
        slow = 1.0 if net < 4 else 1.0 + 0.6 * rng.random()  # other load slowed the host while it ran
        p = predict(item.config, _target(true), item.batch_size)
        ref = predict(ArchConfig.static(item.config.backbone, 64), _target(true), item.batch_size).latency_ms
        parts = [("stem", -1, p.stem_ms), ("head", -1, p.head_ms), ("network", -1, p.latency_ms)]
        parts += [(f"stage{s}", s, st.latency_ms) for s, st in enumerate(p.stages)]
        for part, stage, ms in parts:
            rows.append(
                {
                    "network_id": net,
                    "backbone": item.config.backbone,
                    "input_h": 64,
                    "input_w": 64,
                    "config": item.config.to_json(indent=None),
                    "batch_size": item.batch_size,
                    "part": part,
                    "stage": stage,
                    "measured_ms": ms * slow,
                    "reference_ms": ref * slow,
                    "host_check": "pairs",
                }
            )
            quiet_ms.append(ms)
    df = pd.DataFrame(rows)
    norm = host_normalized(df)
    np.testing.assert_allclose(norm["raw_measured_ms"], df["measured_ms"])
    np.testing.assert_allclose(norm["measured_ms"], quiet_ms)  # the slow-down divided out
    unpaired = df.assign(host_check="each")
    pd.testing.assert_frame_equal(host_normalized(unpaired), unpaired)
    fitted = fit_target(df, "paired", {"threads": 2})
    assert fitted.fit["parts_mape_pct"] < 1e-3 and fitted.fit["host_normalized_networks"] == len(plan)
    cfg = ArchConfig("resnet18", (64, 64), (StageConfig("spatial", 0.35, spatial_granularity=2),) * 4)
    assert predict(cfg, fitted, 4).latency_ms == pytest.approx(predict(cfg, _target(true), 4).latency_ms, rel=1e-4)
    static = ArchConfig.static("regnety_400mf", 64)
    assert fitted.static_ms["regnety_400mf-64x64-b4"] == pytest.approx(predict(static, _target(true), 4).latency_ms)
    # the same times without their pairs: the host's drift lands in the fit
    assert fit_target(df.drop(columns="host_check"), "raw").fit["parts_mape_pct"] > 1.0


def test_static_ms_round_trips_and_bad_values_name_the_field(tmp_path):
    t = dataclasses.replace(_target(), static_ms={"resnet50-224x224-b1": 31.5})
    back = load_target(str(write_target(t, tmp_path / "t.toml")))
    assert back.static_ms == {"resnet50-224x224-b1": 31.5}
    bad = target_toml(t).replace("= 31.5", "= -2.0")
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(TargetError, match=r"static_ms.resnet50-224x224-b1=-2.0 is out of range"):
        load_target(str(tmp_path / "bad.toml"))


def test_measuring_keeps_freed_memory_and_records_it():
    import platform

    from dynas.kernels.calibrate import environment, keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first  # set once per process
    assert environment()["malloc"] == first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first.startswith("glibc: trim off")
    else:
        assert first == "default"


def test_retest_separates_the_hosts_noise_from_the_models_error():
    data = DATA / "cpu-2core-dec01-pairs"
    first = pd.read_csv(data / "validation-seed32.csv")
    first = first[first["network_id"] < 12]  # 12 networks: 6 configs at batch 1 and 8
    # the same networks "measured again": 10 % slower, alongside a static network 10 % slower
    # (the host's drift, divided out), and one network 21 % slower (noise)
    second = first.assign(measured_ms=first["measured_ms"] * 1.1, reference_ms=first["reference_ms"] * 1.1)
    second.loc[second["network_id"] == 0, "measured_ms"] *= 1.1
    target = str(data / "cpu-2core-dec01-pairs.toml")
    same = retest_summary(first, first, target)
    assert same["networks"].sum() == 12
    # a table against itself: no noise, errors correlate fully (to the 2 decimals benchmarks/retest.py prints)
    assert same.set_index("batch_size")["noise_pct"].round(2).to_dict() == {1: 0.0, 8: 0.0}
    assert (same["error_corr"].round(2) == 1.0).all()
    moved = retest_summary(first, second, target).set_index("batch_size")["noise_pct"].round(2)
    n0 = int(first.loc[first["network_id"] == 0, "batch_size"].iloc[0])
    other = ({1, 8} - {n0}).pop()
    assert moved[n0] > 0 and moved[other] == 0  # network 0 moved, the rest only with the host
    # a table without pairs is refused in one line
    with pytest.raises(ConfigError, match=r"^second table: column 'reference_ms' is empty; allowed: .*pairs$"):
        retest_summary(first, first.drop(columns="reference_ms"), target)
    with pytest.raises(ConfigError, match=r"^second table: no network of the first table; allowed: .*--seed"):
        retest_summary(first, first.assign(batch_size=first["batch_size"] * 2), target)
