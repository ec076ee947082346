"""Energy budgets for early exits: per-exit energy, dynas search --budgets-mj, the budget policy's budget_mj.

The searches use the deterministic test proxy and options of :mod:`tests.test_search_exits`
(every exit's top-1 known by formula), so each trial's score at each energy budget is recomputed
by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from dynas.cli import main
from dynas.errors import ConfigError, StudyError
from dynas.kernels import build_model
from dynas.predictors.latency import predict
from dynas.predictors.targets import load_target
from dynas.results import export_trial, pareto_table
from dynas.search.budgets import score_budgets, study_budgets
from dynas.search.study import plan_search, run_search
from dynas.spaces.config import ArchConfig
from tests.test_search_exits import BACKBONE, BATCH, CHANCE, PROXY, SIZE, TARGET, ExitProxy, budget_options, by_hand

CPU_TARGET = str(Path(__file__).resolve().parent / "data" / "cpu-2core-dec01-late" / "cpu-2core-dec01-late.toml")
STATIC = ArchConfig.static(BACKBONE, SIZE)
DYNAMIC = (
    {"paradigm": "spatial", "spatial_granularity": 1, "rate": 0.5},
    {"paradigm": "layer", "rate": 0.5},
    {"paradigm": "channel", "channel_granularity": 8, "rate": 0.5},
    {"paradigm": "static"},
)


def _exits(exits=(0, 1, 2), head="light", stages=None) -> ArchConfig:
    stages = list(stages) if stages is not None else [s.to_dict() for s in STATIC.stages]
    return ArchConfig.from_dict(
        {"backbone": BACKBONE, "input_size": SIZE, "stages": stages, "exits": list(exits), "exit_head": head}
    )


# ----------------------------------------------------------------------------- per-exit energy


@pytest.mark.parametrize("target", ["v100", "orin", "nano"])
@pytest.mark.parametrize("head", ["light", "conv"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_exit_energy_invariants(target, head, dynamic):
    cfg = _exits(head=head, stages=DYNAMIC if dynamic else None)
    pred = predict(cfg, target, 4)
    power_w = load_target(target).energy.static_power_w
    exits = pred.exits
    last = exits[-1]
    assert last.energy_mj == pytest.approx(pred.energy_mj, rel=1e-12)  # the last exit is the network
    assert last.head_energy_mj == pytest.approx(pred.head_energy_mj, rel=1e-12)
    heads_before = 0.0
    for e in exits:
        assert e.energy_mj > 0 and e.head_energy_mj > 0
        assert e.energy_mj >= power_w * e.latency_ms * (1 - 1e-12)  # constant power over the exit's latency
        assert e.energy_mj_per_image == pytest.approx(e.energy_mj / 4)
        assert e.anytime_energy_mj == pytest.approx(e.energy_mj + heads_before)
        assert e.anytime_energy_mj_per_image == pytest.approx(e.anytime_energy_mj / 4)
        heads_before += e.head_energy_mj
    # straight to an exit: the stem's, its stages' and its head's energies
    for e in exits[:-1]:
        body = pred.stem_energy_mj + sum(s.energy_mj for s in pred.stages[: e.after_stage + 1])
        assert e.energy_mj == pytest.approx(body + e.head_energy_mj)
    energies = [e.energy_mj for e in exits]
    assert energies == sorted(energies)  # non-decreasing along the exits


def test_exits_do_not_change_the_network_energy():
    plain, with_exits = predict(STATIC, "orin", 4), predict(_exits(), "orin", 4)
    assert with_exits.energy_mj == plain.energy_mj and with_exits.stages == plain.stages


def test_no_energy_target_leaves_exit_energy_unknown(capsys):
    pred = predict(_exits(), CPU_TARGET, 2)
    assert all(e.energy_mj is None and e.anytime_energy_mj is None for e in pred.exits)
    assert main(["predict", _exits().to_json(), "--target", CPU_TARGET, "--batch-size", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["exits"]
    assert all(e["energy_mj"] is None and e["energy_mj_per_image"] is None for e in shown)  # null, not 0


def test_predict_json_shows_exit_energy(capsys):
    assert main(["predict", _exits().to_json(), "--target", "orin", "--batch-size", "4", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    pred = predict(_exits(), "orin", 4)
    assert [e["energy_mj"] for e in shown["exits"]] == pytest.approx([e.energy_mj for e in pred.exits])
    assert shown["exits"][-1]["energy_mj"] == pytest.approx(shown["energy_mj"])
    assert all("anytime_energy_mj_per_image" in e for e in shown["exits"])


# ----------------------------------------------------------------------------- search with energy budgets


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("energy-budgets")
    mj = [e.energy_mj for e in predict(_exits(), TARGET, BATCH).exits]  # static, exits after 0, 1, 2, own head
    budgets = ((mj[0] + mj[1]) / 2, (mj[2] + mj[3]) / 2, mj[3] * 1.01)
    plan = plan_search(budget_options(tmp, budgets_mj=budgets, trials=8))
    storage = optuna.storages.RDBStorage(plan.storage_url)
    study = optuna.create_study(storage=storage, study_name=plan.study_name, directions=["minimize", "maximize"])
    for k, v in plan.study_attrs().items():  # as run_search creates it, so that it resumes it
        study.set_user_attr(k, v)
    study.enqueue_trial(plan.space.params_of(_exits((0, 1))))
    return {"study": run_search(plan), "plan": plan, "budgets": tuple(sorted(budgets)), "tmp": tmp, "mj": mj}


def test_energy_budget_search_scores_the_deepest_exit_whose_energy_fits(searched):
    study, plan, budgets = searched["study"], searched["plan"], searched["budgets"]
    assert plan.options.objective == "energy" and plan.budget_unit == "mj" and plan.budgets_ms is None
    assert plan.study_name.endswith("-energy-budgets")
    assert study.user_attrs["budgets_mj"] == list(budgets) and study.user_attrs["budgets_ms"] is None
    assert study.user_attrs["objectives"] == ["energy_mj", "top1"]
    assert study_budgets(study.user_attrs) == (budgets, "mj")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 8
    for t in trials:
        cfg = ArchConfig.from_dict(t.user_attrs["config"])
        top1, used = by_hand(cfg, budgets, "energy_mj")
        assert t.user_attrs["budget_exit"] == used
        assert t.user_attrs["budget_top1"] == pytest.approx(top1)
        assert t.values[1] == pytest.approx(sum(top1) / len(top1))
        assert t.values[0] == pytest.approx(predict(cfg, TARGET, BATCH).energy_mj)  # the whole network's
    first = study.trials[0]  # static, exits after 0 and 1: exit 0, then exit 1 (exit 2 not placed), then own head
    assert first.user_attrs["budget_exit"] == [0, 1, 3]
    assert first.user_attrs["budget_top1"] == pytest.approx([40.0, 55.0, 85.0])


def test_energy_budget_columns_and_export(searched, tmp_path):
    study, budgets = searched["study"], searched["budgets"]
    df = pareto_table(study)
    columns = [f"top1@{b:.4g}mj" for b in budgets]
    assert list(df.columns[df.columns.get_loc("top1") + 1 :][: len(columns) + 1]) == [*columns, "top1_own"]
    best = study.best_trials[0]
    data = export_trial(study, best, tmp_path / "e.json")
    assert data["budgets"]["budgets_mj"] == list(budgets) and "budgets_ms" not in data["budgets"]
    assert data["budgets"]["exits"] == best.user_attrs["budget_exit"]


def test_resume_with_other_budgets_or_units_is_refused(searched):
    name, tmp, mj = searched["plan"].study_name, searched["tmp"], searched["mj"]
    with pytest.raises(StudyError, match="budgets_mj"):
        run_search(budget_options(tmp, budgets_mj=(mj[3],), study_name=name))
    ms = predict(STATIC, TARGET, BATCH).latency_ms
    with pytest.raises(StudyError, match="objective"):
        run_search(budget_options(tmp, budgets_ms=(ms,), study_name=name))


def test_energy_ratios_are_of_the_static_energy(tmp_path):
    plan = plan_search(budget_options(tmp_path, objective="energy", budget_ratios=(1.0, 0.5)))
    static_mj = predict(STATIC, TARGET, BATCH).energy_mj
    assert plan.budget_unit == "mj" and plan.budgets == pytest.approx((0.5 * static_mj, static_mj))
    latency = plan_search(budget_options(tmp_path, budget_ratios=(1.0,)))
    assert latency.budget_unit == "ms" and latency.budgets_ms == pytest.approx(
        (predict(STATIC, TARGET, BATCH).latency_ms,)
    )


def test_score_budgets_in_mj_compares_energy_not_latency():
    cfg = _exits((0, 1))
    pred = predict(cfg, TARGET, BATCH)
    exit_top1 = [{"after_stage": s, "top1": ExitProxy.exit_top1(cfg, s)} for s in (0, 1, 3)]
    mj = pred.exits[1].energy_mj
    scored = score_budgets(pred, 85.0, exit_top1, [mj], CHANCE, "mj")
    assert scored.exits == (1,) and scored.unit == "mj"  # a budget equal to an exit's energy fits it
    assert score_budgets(pred, 85.0, exit_top1, [mj * (1 - 1e-9)], CHANCE, "mj").exits == (0,)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(target=CPU_TARGET), r"budgets_mj=\[40.0\] is not allowed on target .* no \[energy\] table"),
        (dict(budgets_ms=(1.0,)), r"budgets_mj=\[40.0\] is given with budgets_ms; allowed: one of the two"),
        (
            dict(objective="latency"),
            r"objective='latency' is not supported with budgets_mj; allowed: objective='energy'",
        ),
        (dict(budgets_mj=(1e-6, 40.0)), r"budgets_mj=1e-06 is below every exit's cost: at least .* mJ"),
    ],
)
def test_bad_energy_budgets_are_refused_in_one_line(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        plan_search(budget_options(tmp_path, **{"budgets_mj": (40.0,), **kw}))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs.db").exists()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--budgets-mj", "40", "--budgets-ms", "2"], "is given with budgets_ms"),
        (["--budgets-mj", "40", "--target", CPU_TARGET], "no [energy] table"),
    ],
)
def test_cli_refuses_bad_energy_budgets_with_exit_2(tmp_path, capsys, monkeypatch, flags, says):
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--backbone", BACKBONE, "--proxy", PROXY, "--storage", "sqlite:///x.db", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0 and says in err
    assert list(tmp_path.iterdir()) == []  # nothing written


# ----------------------------------------------------------------------------- the budget policy at run time


def test_budget_policy_halts_at_the_deepest_exit_whose_energy_fits():
    cfg = _exits()
    torch.manual_seed(0)
    model = build_model(cfg).set_num_classes(10).eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    exits = predict(cfg, "orin", 3).exits
    with torch.no_grad():
        ref = model.set_exit_policy("all")(x)
        for e in exits:
            out = model.set_exit_policy("budget", budget_mj=e.energy_mj * 1.0001, target="orin")(x)
            assert model.last_exit.tolist() == [e.exit] * 3
            torch.testing.assert_close(out, ref[e.exit])
        with pytest.raises(ConfigError, match=r"budget_mj=.* below the first exit's cost .* mJ predicted on orin"):
            model.set_exit_policy("budget", budget_mj=exits[0].energy_mj * 0.5, target="orin")(x)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(budget_ms=1.0, budget_mj=1.0, target="orin"), "both of budget_ms and budget_mj given"),
        (dict(target="orin"), "neither of budget_ms and budget_mj given"),
        (
            dict(budget_mj=-1.0, target="orin"),
            r"budget_mj=-1.0 is not allowed; allowed: a positive number of millijoules",
        ),
        (dict(budget_mj=1.0, target=CPU_TARGET), r"budget_mj=1.0 is not allowed on target .* no \[energy\] table"),
    ],
)
def test_budget_policy_refuses_bad_energy_budgets(options, match):
    model = build_model(_exits())
    with pytest.raises(ConfigError, match=match) as err:
        model.set_exit_policy("budget", **options)
    assert "\n" not in str(err.value)
