"""Training helpers: schedules, per-stage sparsity loss, distillation."""

from __future__ import annotations

import math

import pytest
import torch

from dynas.errors import ConfigError
from dynas.kernels.recipe import (
    TrainingRecipe,
    distillation_loss,
    gumbel_temperature,
    relaxation,
    sparsity_loss,
    stage_flops_ratios,
)


def readout(ratios, dense=(100.0, 100.0, 300.0), stages=(0, 0, 1), requires_grad=False):
    """Blocks with the given per-sample FLOPs ratios (a list per block)."""
    out = []
    for r, d, s in zip(ratios, dense, stages):
        t = torch.tensor(r, dtype=torch.float32) * d
        out.append({"stage": s, "executed_flops": t.requires_grad_(requires_grad), "dense_flops": d})
    return out


def test_gumbel_schedule_is_exponential_from_5_to_0_1():
    assert gumbel_temperature(0, 100) == pytest.approx(5.0)
    assert gumbel_temperature(100, 100) == pytest.approx(0.1)
    assert gumbel_temperature(50, 100) == pytest.approx(math.sqrt(5.0 * 0.1))
    assert gumbel_temperature(500, 100) == pytest.approx(0.1)  # clamped after the end


def test_relaxation_is_cosine_squared_over_the_first_third():
    assert relaxation(0, 90) == pytest.approx(1.0)
    assert relaxation(15, 90) == pytest.approx(0.5)  # halfway through the first third
    assert relaxation(30, 90) == pytest.approx(0.0)
    assert relaxation(60, 90) == pytest.approx(0.0)


def test_sparsity_loss_is_zero_on_target_and_grows_away_from_it():
    on = readout([[0.5, 0.5], [0.5, 0.5], [0.3, 0.3]])
    assert sparsity_loss(on, [0.5, 0.3], step=0, total_steps=10).item() == pytest.approx(0.0, abs=1e-12)
    off = readout([[0.9, 0.9], [0.9, 0.9], [0.3, 0.3]])
    further = readout([[1.0, 1.0], [1.0, 1.0], [0.3, 0.3]])
    a = sparsity_loss(off, [0.5, 0.3], 0, 10).item()
    b = sparsity_loss(further, [0.5, 0.3], 0, 10).item()
    assert 0 < a < b


def test_block_bounds_relax_but_stage_target_still_pulls():
    """Late in training a block may leave its stage's target, but the stage mean may not."""
    spread = readout([[0.2, 0.2], [0.8, 0.8], [0.3, 0.3]])  # stage 0 mean = 0.5 on target
    early = sparsity_loss(spread, [0.5, 0.3], 0, 90).item()
    late = sparsity_loss(spread, [0.5, 0.3], 60, 90).item()
    assert early > 0 and late == pytest.approx(0.0, abs=1e-12)
    drifted = readout([[0.8, 0.8], [0.8, 0.8], [0.3, 0.3]])  # stage 0 mean = 0.8 off target
    assert sparsity_loss(drifted, [0.5, 0.3], 60, 90).item() > 0


def test_sparsity_loss_gradient_pushes_towards_target():
    r = readout([[0.9, 0.7], [0.5, 0.5], [0.3, 0.3]], requires_grad=True)
    loss = sparsity_loss(r, [0.5, 0.3], 0, 10)
    loss.backward()
    assert (r[0]["executed_flops"].grad > 0).all()  # too many FLOPs: gradient says reduce


def test_stage_ratios_weight_blocks_by_dense_flops():
    r = readout([[1.0], [0.0], [0.5]], dense=(100.0, 300.0, 50.0), stages=(0, 0, 1))
    ratios = stage_flops_ratios(r)
    assert ratios[0].item() == pytest.approx(0.25) and ratios[1].item() == pytest.approx(0.5)


def test_fixed_flops_dilute_the_global_term():
    r = readout([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    late = dict(step=90, total_steps=90)  # bounds fully relaxed: only the stage and global terms
    small = sparsity_loss(r, [0.5, 0.5], fixed_flops=0.0, **late).item()
    big = sparsity_loss(r, [0.5, 0.5], fixed_flops=1e6, **late).item()
    assert big < small


@pytest.mark.parametrize(
    "targets,match",
    [
        ([0.5], "stage_targets has 1 entries"),
        ([0.5, 1.5], r"stage_targets\[1\]=1.5"),
        ([0.5, float("nan")], "out of range"),
    ],
)
def test_bad_targets(targets, match):
    with pytest.raises(ConfigError, match=match):
        sparsity_loss(readout([[0.5], [0.5], [0.5]]), targets, 0, 10)


def test_distillation_is_zero_for_equal_logits_and_positive_otherwise():
    s = torch.randn(4, 10)
    assert distillation_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(s, torch.randn(4, 10)).item() > 0
    with pytest.raises(ConfigError, match="differ"):
        distillation_loss(torch.randn(4, 10), torch.randn(4, 9))


def test_recipe_validation():
    assert TrainingRecipe().lambda_act == 10.0 and TrainingRecipe().alpha_kd == 0.5
    with pytest.raises(ConfigError, match="gumbel_end"):
        TrainingRecipe(gumbel_end=0)


def test_rate_term_pins_sampled_and_adaptive_rates_to_the_configured_ones():
    # FLOPs on target, rates off target: only the rate term sees it, for both kinds of rate
    r = readout([[0.5, 0.5], [0.5, 0.5], [0.3, 0.3]])
    sampled = torch.tensor([0.5, 0.5], requires_grad=True)
    adaptive = torch.tensor([0.9, 0.9], requires_grad=True)
    for block in r[:2]:
        block["rates"] = {"primary": sampled, "primary_adaptive": adaptive}
    r[2]["rates"] = {"primary": torch.tensor([0.4, 0.4])}
    base = sparsity_loss(r, [0.5, 0.3], 0, 10).item()
    with_rates = sparsity_loss(r, [0.5, 0.3], 0, 10, rate_targets=[0.5, 0.4])
    assert base == pytest.approx(0.0, abs=1e-12) and with_rates.item() > 0
    with_rates.backward()
    assert float(sampled.grad.abs().sum()) == 0.0  # on target
    assert (adaptive.grad > 0).all()  # the inference rate is too high: gradient says lower it
    with pytest.raises(ConfigError, match="rate_targets has 1"):
        sparsity_loss(r, [0.5, 0.3], 0, 10, rate_targets=[0.5])
