"""The Optuna search space: every suggestion valid, restrictions respected, reproducible."""

from __future__ import annotations

import itertools
import json
import math

import optuna
import pytest

from dynas.errors import ConfigError
from dynas.spaces.backbones import get_backbone, list_backbones
from dynas.spaces.config import (
    PARADIGMS,
    ArchConfig,
    channel_granularities,
    load_config,
    spatial_granularities,
    uses_channel,
    uses_spatial,
)
from dynas.spaces.searchspace import SearchSpace, param_name

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_TRIALS = 200


def _sample(space: SearchSpace, seed: int, n: int = N_TRIALS) -> tuple[list[ArchConfig], optuna.Study]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return configs, study


def _on_grid(rate: float, space: SearchSpace) -> bool:
    k = (rate - space.rate_min) / space.rate_step
    return space.rate_min <= rate <= space.rate_max and abs(k - round(k)) < 1e-6 and round(rate, 4) == rate


def _check_in_space(cfg: ArchConfig, space: SearchSpace) -> None:
    spec = get_backbone(space.backbone, space.input_size)
    assert load_config(cfg.to_json()) == cfg  # passes full validation again
    assert (cfg.backbone, cfg.input_size) == (space.backbone, space.input_size)
    for i, st in enumerate(cfg.stages):
        assert st.paradigm in space.paradigms
        if st.paradigm == "static":
            continue
        assert _on_grid(st.rate, space)
        if uses_spatial(st.paradigm):
            assert st.spatial_granularity in spatial_granularities(spec, i)
            assert space.spatial_granularities is None or st.spatial_granularity in space.spatial_granularities
        if uses_channel(st.paradigm):
            assert st.channel_granularity in channel_granularities(spec, i)
            assert space.channel_granularities is None or st.channel_granularity in space.channel_granularities
        if st.paradigm in ("spatial+channel", "layer+channel"):
            assert _on_grid(st.channel_rate, space)


@pytest.mark.parametrize("name", list_backbones())
def test_default_space_suggests_valid_configs(name):
    space = SearchSpace(name)
    configs, study = _sample(space, seed=0)
    for cfg in configs:
        _check_in_space(cfg, space)
    # the space is derived from the spec and not degenerate: every paradigm the backbone offers
    # shows up somewhere, and no other
    assert space.paradigms == get_backbone(name).paradigms
    assert {st.paradigm for cfg in configs for st in cfg.stages} == set(space.paradigms)
    # Optuna requires one distribution per parameter name across the study
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for t in study.trials:
        for k, d in t.distributions.items():
            assert dists.setdefault(k, d) == d, k
    assert set(dists) <= {
        param_name(i, f)
        for i in range(space.num_stages)
        for f in ("paradigm", "rate", "spatial_granularity", "channel_granularity", "channel_rate")
    }


def test_restricted_space_respects_restrictions():
    space = SearchSpace(
        "resnet50",
        input_size=[97, 113],
        paradigms=["layer+channel", "static", "spatial"],
        spatial_granularities=[2, 4, 7, 8],
        channel_granularities=[2, 4, 5],
        rate_min=0.2,
        rate_max=0.8,
        rate_step=0.1,
    )
    configs, _ = _sample(space, seed=3)
    for cfg in configs:
        _check_in_space(cfg, space)
    seen = {st.paradigm for cfg in configs for st in cfg.stages}
    assert seen == {"static", "spatial", "layer+channel"}
    rates = {st.rate for cfg in configs for st in cfg.stages if st.paradigm != "static"}
    assert rates == {0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}


def test_same_seed_same_configs_and_other_seed_differs():
    space = SearchSpace("regnety_400mf", rate_step=0.1)
    a, _ = _sample(space, seed=7)
    b, _ = _sample(space, seed=7)
    c, _ = _sample(space, seed=8)
    assert a == b
    assert a != c


def test_params_round_trip_and_enqueue():
    space = SearchSpace("resnet18")
    configs, study = _sample(space, seed=1, n=50)
    for cfg, trial in zip(configs, study.trials):
        assert space.config_from_params(trial.params) == cfg
        params = space.params_of(cfg)
        assert set(params) == set(trial.params)
        assert space.config_from_params(params) == cfg
    # an enqueued config is suggested back exactly
    target = configs[5]
    study2 = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study2.enqueue_trial(space.params_of(target))
    study2.enqueue_trial(space.params_of(ArchConfig.static("resnet18")))
    assert space.suggest(study2.ask()) == target
    assert space.suggest(study2.ask()) == ArchConfig.static("resnet18")


def test_params_outside_the_space_are_rejected():
    space = SearchSpace("resnet50", paradigms=["static", "spatial"], spatial_granularities=[4, 7], rate_step=0.1)
    cfg = load_config(
        {"backbone": "resnet50", "stages": [{"paradigm": "spatial", "spatial_granularity": 8, "rate": 0.5}, {}, {}, {}]}
    )
    with pytest.raises(ConfigError, match=r"s0_spatial_granularity=8 is not in the search space; allowed: 4, 7"):
        space.params_of(cfg)
    cfg = load_config(
        {
            "backbone": "resnet50",
            "stages": [{"paradigm": "spatial", "spatial_granularity": 4, "rate": 0.55}, {}, {}, {}],
        }
    )
    with pytest.raises(ConfigError, match=r"s0_rate=0.55 is not on the rate grid; allowed: 0.1 .. 1 in steps of 0.1"):
        space.params_of(cfg)
    cfg = load_config({"backbone": "resnet50", "stages": [{"paradigm": "layer", "rate": 0.5}, {}, {}, {}]})
    with pytest.raises(ConfigError, match=r"s0_paradigm='layer' is not in the search space; allowed: static, spatial"):
        space.params_of(cfg)
    with pytest.raises(ConfigError, match=r"config is for resnet18"):
        space.params_of(ArchConfig.static("resnet18"))
    with pytest.raises(ConfigError, match=r"params: 's1_paradigm' is missing"):
        space.config_from_params({"s0_paradigm": "static"})


def test_restriction_empty_at_a_stage_drops_spatial_there():
    # 8 divides only the 56x56 map of resnet50 at 224 (28, 14, 7 are not multiples of 8)
    space = SearchSpace("resnet50", spatial_granularities=[8])
    assert space.stage_options(0).spatial_granularities == (8,)
    assert "spatial" in space.stage_options(0).paradigms
    for s in (1, 2, 3):
        opts = space.stage_options(s)
        assert opts.spatial_granularities == ()
        assert not any(uses_spatial(p) for p in opts.paradigms)
        assert "channel" in opts.paradigms
    configs, _ = _sample(space, seed=0, n=100)
    for cfg in configs:
        _check_in_space(cfg, space)
        assert not any(uses_spatial(st.paradigm) for st in cfg.stages[1:])


def test_no_paradigm_left_names_the_stage():
    with pytest.raises(ConfigError, match=r"^stage 1: no paradigm left of spatial .*28x28"):
        SearchSpace("resnet50", paradigms=["spatial"], spatial_granularities=[8])


def test_paradigm_possible_nowhere_warns():
    with pytest.warns(UserWarning, match=r"spatial, spatial\+channel are possible at no stage"):
        space = SearchSpace("resnet50", spatial_granularities=[3])
    assert all(not any(uses_spatial(p) for p in space.stage_options(s).paradigms) for s in range(4))


BAD_OPTIONS = [
    (dict(backbone="vgg16"), r"backbone='vgg16' is unknown"),
    (dict(input_size=8), r"input_size=8 is too small"),
    (dict(rate_min=0), r"rate_min=0 is out of range; allowed: a number in \(0, 1\]"),
    (dict(rate_min=-0.5), r"rate_min=-0.5 is out of range"),
    (dict(rate_min=1.5), r"rate_min=1.5 is out of range"),
    (dict(rate_min=float("nan")), r"rate_min=nan is not finite"),
    (dict(rate_min="0.1"), r"rate_min='0.1' is not a number"),
    (dict(rate_max=1.2), r"rate_max=1.2 is out of range; allowed: a number in \[rate_min=0.1, 1\]"),
    (dict(rate_min=0.5, rate_max=0.4), r"rate_max=0.4 is out of range"),
    (dict(rate_step=0), r"rate_step=0 is not positive"),
    (dict(rate_step=-0.1), r"rate_step=-0.1 is not positive"),
    (dict(rate_step=float("inf")), r"rate_step=inf is not finite"),
    (dict(rate_step=0.07), r"rate_step=0.07 does not divide rate_max - rate_min = 0.9"),
    (dict(rate_step=0.00005), r"rate_step=5e-05 has more than 4 decimals"),
    (dict(paradigms=[]), r"paradigms=\[\] is empty"),
    (dict(paradigms="spatial"), r"paradigms='spatial' is not a list"),
    (dict(paradigms=["static", "token"]), r"paradigms: 'token' is unknown; allowed: static, spatial"),
    (dict(spatial_granularities=[]), r"spatial_granularities=\[\] is empty"),
    (dict(spatial_granularities=[4, 0]), r"spatial_granularities: 0 is not a positive integer"),
    (dict(spatial_granularities=[2.0]), r"spatial_granularities: 2.0 is not a positive integer"),
    (dict(channel_granularities=[True]), r"channel_granularities: True is not a positive integer"),
    (dict(channel_granularities=4), r"channel_granularities=4 is not a list"),
]


def test_space_offers_only_what_the_backbone_allows():
    assert "layer" not in SearchSpace("regnetx_800mf").paradigms
    assert not any(map(uses_spatial, SearchSpace("densenet121").paradigms))
    assert SearchSpace("resnet50").paradigms == PARADIGMS
    with pytest.raises(
        ConfigError, match=r"paradigm='layer' is not offered on regnety_1_6gf .*allowed: static, spatial"
    ):
        SearchSpace("regnety_1_6gf", paradigms=["static", "layer"])
    with pytest.raises(ConfigError, match=r"paradigm='spatial' is not offered on densenet201"):
        SearchSpace("densenet201", paradigms=["spatial"])


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[m[:40] for _, m in BAD_OPTIONS])
def test_bad_options_raise_one_line_config_error(options, message):
    options = {"backbone": "resnet50", **options}
    with pytest.raises(ConfigError, match=message) as info:
        SearchSpace(**options)
    assert "\n" not in str(info.value)


def test_options_are_normalised_and_round_trip():
    a = SearchSpace(
        "resnet50",
        input_size=[224, 224],
        paradigms=("layer", "static", "layer"),
        spatial_granularities=[7, 2, 7],
        rate_min=1,
        rate_max=1,
        rate_step=0.5,
    )
    b = SearchSpace(
        "resnet50",
        input_size=224,
        paradigms=["static", "layer"],
        spatial_granularities=[2, 7],
        rate_min=1.0,
        rate_max=1.0,
        rate_step=0.5,
    )
    assert a == b
    assert a.paradigms == ("static", "layer") and a.spatial_granularities == (2, 7)
    assert a.rates == (1.0,)
    for space in (a, SearchSpace("regnety_800mf", input_size=[97, 113], channel_granularities=[2, 4])):
        d = json.loads(json.dumps(space.to_dict()))
        assert SearchSpace.from_dict(d) == space
        assert SearchSpace.from_dict(d).to_dict() == space.to_dict()
    with pytest.raises(ConfigError, match=r"search space key 'rate' is unknown"):
        SearchSpace.from_dict({"backbone": "resnet50", "rate": 0.5})
    with pytest.raises(ConfigError, match=r"search space key 'backbone' is missing"):
        SearchSpace.from_dict({"rate_min": 0.5})


def test_num_configs_counts_the_enumerated_space():
    space = SearchSpace(
        "resnet18",
        paradigms=["static", "spatial", "layer+channel"],
        spatial_granularities=[7, 14],
        channel_granularities=[256],
        rate_min=0.5,
        rate_max=1.0,
        rate_step=0.5,
    )
    # Enumerate every parameter assignment independently of the space's own bookkeeping.
    spec = get_backbone("resnet18")
    per_stage = []
    for i in range(4):
        choices = [{param_name(i, "paradigm"): "static"}]
        for s, r in itertools.product([7, 14], space.rates):
            if s in spatial_granularities(spec, i):
                choices.append(
                    {
                        param_name(i, "paradigm"): "spatial",
                        param_name(i, "spatial_granularity"): s,
                        param_name(i, "rate"): r,
                    }
                )
        if 256 in channel_granularities(spec, i):  # only stage 3 (width 512) allows groups of 256
            for r, cr in itertools.product(space.rates, space.rates):
                choices.append(
                    {
                        param_name(i, "paradigm"): "layer+channel",
                        param_name(i, "channel_granularity"): 256,
                        param_name(i, "rate"): r,
                        param_name(i, "channel_rate"): cr,
                    }
                )
        per_stage.append(choices)
    configs = {
        space.config_from_params({k: v for d in combo for k, v in d.items()}) for combo in itertools.product(*per_stage)
    }
    assert len(configs) == space.num_configs() == 5 * 5 * 5 * (3 + 4)
    assert f"{space.num_configs():.3g} configs" in space.describe()


def test_describe_is_one_line():
    text = SearchSpace("resnet50", paradigms=["static", "spatial"], spatial_granularities=[4, 7]).describe()
    assert "\n" not in text
    assert text.startswith("resnet50 @ 224x224, 4 stages; paradigms static, spatial; rates 0.1 .. 1 in steps of 0.05")
    assert "S per stage 4, 7 / 4, 7 / 7 / 7" in text
    assert "G per stage" not in text
    assert math.isfinite(float(text.rsplit("; ", 1)[1].split()[0]))
