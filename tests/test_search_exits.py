"""Searching early exits for latency budgets (dynas search --budgets-ms / --budget-ratios).

The searches here use :class:`ExitProxy` (``--proxy tests.test_search_exits:exit_proxy``): a
deterministic proxy that reports every exit's top-1 the way the finetune proxy does
(``attrs["exit_top1"]``), so each trial's budget score can be recomputed by hand.
"""

from __future__ import annotations

import json
import math

import optuna
import pytest

from dynas.cli import main
from dynas.errors import ConfigError, StudyError
from dynas.predictors.latency import predict
from dynas.predictors.proxy import AccuracyProxy, ProxyResult, Reporter
from dynas.results import export_trial, pareto_table, write_html
from dynas.search.budgets import score_budgets
from dynas.search.study import SearchOptions, plan_search, run_search
from dynas.spaces.config import ArchConfig, StageConfig, load_config
from dynas.spaces.searchspace import SearchSpace

PROXY = "tests.test_search_exits:exit_proxy"
BACKBONE, SIZE, TARGET, BATCH = "resnet18", 64, "v100", 8
CHANCE = 10.0


class ExitProxy(AccuracyProxy):
    """Exit after stage ``s`` scores ``40 + 15 s`` minus 5 points per unit of skipped rate."""

    scores_exits = True
    description = "test proxy: top-1 rising with the exit's depth"

    @staticmethod
    def exit_top1(config: ArchConfig, stage: int) -> float:
        skipped = sum(1.0 - st.rate for st in config.stages if st.paradigm != "static")
        return 40.0 + 15.0 * stage - 5.0 * skipped

    def static_top1(self, backbone: str) -> float:
        return 85.0

    def reference_top1(self, config: ArchConfig) -> float:
        return CHANCE

    def chance_top1(self, config: ArchConfig) -> float:
        return CHANCE

    def score(self, config: ArchConfig) -> float:
        return self.exit_top1(config, config.spec.num_stages - 1)

    def evaluate(self, config: ArchConfig, reporter: Reporter | None = None) -> ProxyResult:
        stages = [*config.exits, config.spec.num_stages - 1]
        attrs = {"exit_top1": [{"after_stage": s, "top1": self.exit_top1(config, s)} for s in stages]}
        return ProxyResult(self.score(config), attrs=attrs if config.exits else {})


def exit_proxy() -> ExitProxy:
    return ExitProxy()


def budget_options(tmp_path, **kw) -> SearchOptions:
    base = dict(
        backbone=BACKBONE,
        input_size=SIZE,
        target=TARGET,
        batch_size=BATCH,
        proxy=PROXY,
        trials=12,
        storage=f"sqlite:///{tmp_path / 'runs.db'}",
        show_progress=False,
        paradigms=("static", "layer"),
        rate_min=0.5,
        rate_step=0.25,
    )
    return SearchOptions(**{**base, **kw})


def _static_exit_ms() -> list[float]:
    """Predicted latency straight to each exit of static ResNet-18 with exits after 0, 1, 2."""
    static = ArchConfig.static(BACKBONE, SIZE)
    cfg = ArchConfig(BACKBONE, static.input_size, static.stages, (0, 1, 2))
    return [e.latency_ms for e in predict(cfg, TARGET, BATCH).exits]


def by_hand(cfg: ArchConfig, budgets, cost: str = "latency_ms") -> tuple[list[float], list[int | None]]:
    """Each budget's top-1 and exit: the deepest exit whose ``cost`` (latency_ms or energy_mj) fits,
    chance if none."""
    pred = predict(cfg, TARGET, BATCH)
    points = [(e.after_stage, getattr(e, cost)) for e in pred.exits] if cfg.exits else [(3, getattr(pred, cost))]
    top1, used = [], []
    for b in budgets:
        fitting = [s for s, c in points if c <= b]
        used.append(max(fitting) if fitting else None)
        top1.append(ExitProxy.exit_top1(cfg, used[-1]) if fitting else CHANCE)
    return top1, used


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 12-trial budget search with one known config enqueued first."""
    tmp = tmp_path_factory.mktemp("budgets")
    ms = _static_exit_ms()  # [exit 0, exit 1, exit 2, own head], static
    budgets = (ms[0] * 0.5, (ms[0] + ms[1]) / 2, (ms[2] + ms[3]) / 2, ms[3] * 1.01)
    options = budget_options(tmp, budgets_ms=budgets)
    with pytest.warns(UserWarning, match="below the static network's first exit"):  # budgets[0]: half of it
        plan = plan_search(options)
    static = ArchConfig.static(BACKBONE, SIZE)
    known = ArchConfig(BACKBONE, static.input_size, static.stages, (0, 1))
    storage = optuna.storages.RDBStorage(plan.storage_url)
    study = optuna.create_study(storage=storage, study_name=plan.study_name, directions=["minimize", "maximize"])
    for k, v in plan.study_attrs().items():  # as run_search creates it, so that it resumes it
        study.set_user_attr(k, v)
    study.enqueue_trial(plan.space.params_of(known))
    study = run_search(plan)
    return {"study": study, "plan": plan, "budgets": tuple(sorted(budgets)), "known": known, "tmp": tmp, "ms": ms}


def test_every_trial_is_scored_at_every_budget_by_the_deepest_fitting_exit(searched):
    study, budgets = searched["study"], searched["budgets"]
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 12
    assert study.user_attrs["budgets_ms"] == list(budgets)
    assert any(t.user_attrs["config"].get("exits") for t in trials)  # exits are searched
    for t in trials:
        cfg = ArchConfig.from_dict(t.user_attrs["config"])
        top1, used = by_hand(cfg, budgets)
        assert t.user_attrs["budget_top1"] == pytest.approx(top1)
        assert t.user_attrs["budget_exit"] == used
        assert t.values[1] == pytest.approx(sum(top1) / len(top1))
        assert t.user_attrs["top1_own"] == pytest.approx(ExitProxy.exit_top1(cfg, 3))
        assert t.values[0] == pytest.approx(predict(cfg, TARGET, BATCH).latency_ms)  # the whole network


def test_known_config_hand_computed(searched):
    # static ResNet-18 with exits after stages 0 and 1; budgets: below exit 0, between exits 0 and 1,
    # between exit 2's place and the own head (exit 1 is the deepest that fits), just above the own head
    study, known = searched["study"], searched["known"]
    first = study.trials[0]
    assert first.user_attrs["config"] == known.to_dict()
    ms = [e.latency_ms for e in predict(known, TARGET, BATCH).exits]
    assert ms[0] < searched["budgets"][1] < ms[1]  # the rule is decided by these, not by the static network's
    assert first.user_attrs["budget_exit"] == [None, 0, 1, 3]
    assert first.user_attrs["budget_top1"] == pytest.approx([CHANCE, 40.0, 55.0, 85.0])
    assert first.values[1] == pytest.approx((10.0 + 40.0 + 55.0 + 85.0) / 4)
    direct = score_budgets(predict(known, TARGET, BATCH), 85.0, first.user_attrs["exit_top1"], [ms[1]], CHANCE)
    assert direct.exits == (1,) and direct.top1 == (55.0,)  # a budget equal to an exit's cost fits it


def test_table_html_and_export_carry_the_budgets(searched, tmp_path):
    study, budgets = searched["study"], searched["budgets"]
    df = pareto_table(study)
    columns = [f"top1@{b:.4g}ms" for b in budgets]
    assert list(df.columns[df.columns.get_loc("top1") + 1 :][: len(columns) + 1]) == [*columns, "top1_own"]
    for _, row in df.iterrows():
        assert row["top1"] == pytest.approx(sum(row[c] for c in columns) / len(columns))
    assert write_html(study, tmp_path / "r.html").stat().st_size > 1000
    with_exits = next(t for t in study.best_trials if t.user_attrs["config"].get("exits"))
    data = export_trial(study, with_exits, tmp_path / "e.json")
    assert data["exits"] == with_exits.user_attrs["config"]["exits"] and data["exit_head"] == "light"
    assert data["budgets"]["budgets_ms"] == list(budgets)
    assert data["budgets"]["top1"] == with_exits.user_attrs["budget_top1"]
    assert load_config(tmp_path / "e.json").exits == tuple(data["exits"])  # still a config file
    assert json.loads((tmp_path / "e.json").read_text())["budgets"]["exits"] == with_exits.user_attrs["budget_exit"]


def test_resume_with_other_budgets_is_refused(searched):
    plan = searched["plan"]
    other = budget_options(searched["tmp"], budgets_ms=(searched["ms"][3],), study_name=plan.study_name)
    with pytest.raises(StudyError, match="budgets_ms"):
        run_search(other)


def test_budget_ratios_are_of_the_static_latency(tmp_path):
    plan = plan_search(budget_options(tmp_path, budget_ratios=(1.0, 0.5)))
    static_ms = predict(ArchConfig.static(BACKBONE, SIZE), TARGET, BATCH).latency_ms
    assert plan.budgets_ms == pytest.approx((0.5 * static_ms, static_ms))
    assert plan.space.exit_heads == ("light",) and plan.stop_rule.name == "none"
    assert plan.study_name.endswith("-budgets")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(proxy="prior"), r"proxy='prior' cannot score early exits.*--proxy finetune"),
        (dict(budgets_ms=(1.0, 1.0)), r"budgets_ms=\[1.0, 1.0\] lists 1 twice"),
        (dict(budgets_ms=(1.0, -2.0)), r"budgets_ms: -2.0 is not a positive number"),
        (dict(budget_ratios=(0.5,)), r"budget_ratios=\[0.5\] is given with budgets_ms; allowed: one of the two"),
        (dict(objective="energy"), r"objective='energy' is not supported with budgets_ms"),
        (dict(early_stop="halving"), r"early_stop='halving' is not allowed with budgets_ms"),
        (dict(budgets_ms=(0.001, 1.0)), r"budgets_ms=0.001 is below every exit's cost: at least 0.05\d* ms"),
        (dict(exit_heads=("big",)), r"exit_heads='big' is unknown; allowed: light, conv"),
        (dict(backbone="densenet121"), r"early exits are not built for DenseNet"),
    ],
)
def test_bad_budget_options_are_refused_in_one_line(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        plan_search(budget_options(tmp_path, **{"budgets_ms": (1.0,), **kw}))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs.db").exists()


def test_exit_heads_need_budgets(tmp_path):
    with pytest.raises(ConfigError, match="exit_heads=\\('conv',\\) needs budgets"):
        budget_options(tmp_path, exit_heads=("conv",))


def test_low_budget_warns_with_the_static_first_exit(tmp_path):
    ms = _static_exit_ms()[0]
    with pytest.warns(UserWarning, match="below the static network's first exit"):
        plan_search(budget_options(tmp_path, budgets_ms=(ms * 0.6,)))


def test_cli_refuses_prior_with_budgets(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--backbone", BACKBONE, "--budgets-ms", "1,2", "--storage", "sqlite:///x.db"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "--proxy finetune" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_space_places_exits_and_keeps_old_spaces_unchanged():
    plain = SearchSpace(BACKBONE, SIZE, paradigms=("static",))
    assert "exit_heads" not in plain.to_dict() and plain.num_configs() == 1
    space = SearchSpace(BACKBONE, SIZE, paradigms=("static",), exit_heads=("light", "conv"))
    assert space.exit_stages == (0, 1, 2)
    assert space.num_configs() == 1 + 7 * 2  # no exit, or one of 7 non-empty placements with one of 2 heads
    assert SearchSpace.from_dict(space.to_dict()) == space
    static = ArchConfig.static(BACKBONE, SIZE)
    cfg = ArchConfig(BACKBONE, static.input_size, (StageConfig(),) * 4, (1, 2), "conv")
    params = space.params_of(cfg)
    assert params["s0_exit"] is False and params["s1_exit"] is True and params["exit_head"] == "conv"
    assert space.config_from_params(params) == cfg
    with pytest.raises(ConfigError, match="this space has no exits"):
        plain.params_of(cfg)
    assert not math.isnan(space.num_configs())


def test_budget_columns_stay_distinct():
    from dynas.search.budgets import budget_columns

    assert budget_columns([2.0, 4.5]) == ("top1@2ms", "top1@4.5ms")
    close = budget_columns([1.00001, 1.00002])
    assert len(set(close)) == 2
