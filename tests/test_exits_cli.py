"""Early exits from the user's side: training with exits (``dynas train``, the finetune loop),
``dynas evaluate`` per exit, ``dynas exits`` (thresholds for a budget) and the export.

One tiny model (ResNet-18 at 32 x 32, a layer-gated first stage, exits after stages 1 and 2) is
trained for a few steps by :func:`run_training` and shared by the CLI tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dynas.cli import main
from dynas.kernels.evaluate import trained_model
from dynas.kernels.exits import exit_outputs
from dynas.kernels.fulltrain import TrainOptions, run_training
from dynas.kernels.model import build_model
from dynas.kernels.recipe import TrainingRecipe, distillation_loss, exit_loss, recipe_loss
from dynas.kernels.trainer import finetune
from dynas.predictors.latency import predict
from dynas.predictors.thresholds import exit_at
from dynas.spaces.config import ArchConfig, load_config

DATA = "synthetic-hard:64"  # 64 training images, 256 held out
CONFIG = {
    "backbone": "resnet18",
    "input_size": 32,
    "stages": [{"paradigm": "layer", "rate": 0.5}, {}, {}, {}],
    "exits": [1, 2],
}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynas: error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("exits")
    cfg_path = root / "cfg.json"
    cfg_path.write_text(json.dumps(CONFIG))
    run_dir = root / "run"
    opts = TrainOptions(
        data=DATA, output_dir=str(run_dir), epochs=1, batch_size=32, workers=0, device="cpu", threads=2, target="v100"
    )
    result = run_training(str(cfg_path), opts)
    return {"root": root, "cfg": cfg_path, "run": run_dir, "result": result}


# ----------------------------------------------------------------------------- training


def test_recipe_loss_on_exit_outputs_is_exit_loss_plus_the_final_exits_distillation():
    torch.manual_seed(0)
    outs = [torch.randn(6, 8, requires_grad=True) for _ in range(3)]
    y, teacher = torch.randint(0, 8, (6,)), torch.randn(6, 8)
    recipe = TrainingRecipe()
    loss, parts = recipe_loss(outs, y, [], 0, 10, [1.0] * 4, [1.0] * 4, recipe)
    assert torch.allclose(parts["ce"], exit_loss(outs, y)) and torch.allclose(loss, exit_loss(outs, y))
    assert float(parts["kd"]) == 0.0
    loss, parts = recipe_loss(outs, y, [], 0, 10, [1.0] * 4, [1.0] * 4, recipe, teacher)
    early = exit_loss(outs, y, teacher_logits=teacher)  # early exits distil from the static teacher
    final_kd = distillation_loss(outs[-1], teacher, recipe.kd_temperature)
    assert torch.allclose(parts["ce"], early) and torch.allclose(parts["kd"], final_kd)
    assert torch.allclose(loss, early + recipe.alpha_kd * final_kd)
    loss.backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outs)


def test_the_finetune_loop_trains_every_exit_head():
    torch.manual_seed(0)
    model = build_model({**CONFIG, "input_size": 32}).set_num_classes(8)
    before = [h.fc.weight.detach().clone() for h in model.exit_heads]

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 8, (8,), generator=g)

    hist = finetune(model, batches(), 2, lr=0.1)
    assert len(hist.ce) == 2 and all(torch.isfinite(torch.tensor(hist.ce)))
    assert all(not torch.equal(b, h.fc.weight) for b, h in zip(before, model.exit_heads))


def test_training_with_exits_records_each_exits_top1_and_model_pt_loads_back(trained):
    lines = [json.loads(t) for t in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    for line in lines:
        assert [e["after_stage"] for e in line["exit_top1"]] == [1, 2, 3]
        assert line["exit_top1"][-1]["top1"] == pytest.approx(line["top1"])
    summary = trained["result"].summary
    assert [e["after_stage"] for e in summary["exits"]] == [1, 2, 3]
    assert [e["top1"] for e in summary["exits"]] == pytest.approx([e["top1"] for e in lines[-1]["exit_top1"]])
    latencies = [e["latency_ms"] for e in summary["exits"]]
    assert latencies == sorted(latencies) and latencies[-1] == pytest.approx(summary["latency_ms"])
    cfg = load_config(trained["run"] / "config.json")
    assert cfg.exits == (1, 2)
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    assert any(k.startswith("exit_heads.1.") for k in state)
    model = trained_model(cfg, str(trained["run"] / "model.pt"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = trained["result"].model.set_exit_policy("all")(x)
        got = model.set_exit_policy("all")(x)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, got))


def test_evaluate_prints_each_exit(trained, capsys):
    args = ("evaluate", trained["run"] / "config.json", "--weights", trained["run"] / "model.pt", "--data", DATA)
    code, out, err = _run(capsys, *args, "--json", "--workers", "0", "--target", "v100")
    assert code == 0, err
    summary = json.loads(out)
    assert [e["top1"] for e in summary["exits"]] == pytest.approx(
        [e["top1"] for e in trained["result"].summary["exits"]]
    )
    code, out, err = _run(capsys, *args, "--workers", "0", "--target", "v100")
    assert code == 0, err
    assert "exit 0 after stage 1: top-1" in out and "exit 2 after stage 3: top-1" in out


def test_forward_to_runs_one_exit_as_the_reference_computes_it():
    from dynas.errors import ConfigError
    from dynas.kernels.exits import forward_exits, forward_to

    torch.manual_seed(0)
    model = build_model({**CONFIG, "stages": [{}] * 4}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = forward_exits(model, x)
        for k in range(3):
            assert torch.allclose(forward_to(model, k, x), ref[k], atol=1e-6)
    with pytest.raises(ConfigError, match=r"exit=3 does not exist; allowed: 0..2"):
        forward_to(model, 3, x)


# ----------------------------------------------------------------------------- dynas exits


def _costs(cfg: ArchConfig, target: str = "v100") -> list[float]:
    return [e.anytime_latency_ms_per_image for e in predict(cfg, target).exits]


def test_exits_fits_thresholds_writes_them_and_meets_the_budget(trained, capsys, tmp_path):
    cfg = load_config(trained["cfg"])
    costs = _costs(cfg)
    budget = (costs[0] + costs[-1]) / 2
    curve = [costs[0], budget, costs[-1] * 1.01]
    out_cfg, html = tmp_path / "with-thresholds.json", tmp_path / "curve.html"
    code, out, err = _run(
        capsys,
        "exits",
        trained["cfg"],
        "--weights",
        trained["run"] / "model.pt",
        "--data",
        DATA,
        "--target",
        "v100",
        "--budget-ms",
        budget,
        "--budgets-ms",
        ",".join(str(b) for b in curve),
        "-o",
        out_cfg,
        "--html",
        html,
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    chosen = result["chosen"]
    written = load_config(out_cfg)
    assert written.exits == cfg.exits and written.exit_thresholds == pytest.approx(chosen["thresholds"])
    assert chosen["mean_latency_ms"] <= budget * (1 + 1e-9)
    # the confidence policy run with the written thresholds agrees with the fit on the same split
    assert chosen["measured_top1"] == pytest.approx(100 * chosen["accuracy"], abs=100 / result["images"] + 1e-9)
    assert chosen["measured_mean_latency_ms"] == pytest.approx(chosen["mean_latency_ms"], rel=0.05)
    # the fit's numbers, recomputed here from the trained model's outputs
    model = trained_model(cfg, str(trained["run"] / "model.pt"))
    from dynas.kernels.data import load_datasets

    val = load_datasets(DATA, cfg.input_size, splits=("val",)).val
    conf, correct = exit_outputs(model, torch.utils.data.DataLoader(val, batch_size=128))
    at = exit_at(conf.double().numpy(), chosen["thresholds"])
    assert chosen["accuracy"] == pytest.approx(float(correct[at, range(len(at))].float().mean()))
    top1 = [100 * float(v) for v in correct.float().mean(dim=1)]
    assert [e["top1"] for e in result["exits"]] == pytest.approx(top1)
    rows = result["curve"]
    assert [r["budget_ms"] for r in rows] == pytest.approx(curve)
    assert rows[0]["budget_exit"] == 0 and rows[0]["budget_top1"] == pytest.approx(top1[0])
    assert rows[-1]["budget_exit"] == 2 and rows[-1]["deadline_exit"] == 2
    assert rows[0]["confidence_top1"] == pytest.approx(top1[0])  # only the first exit fits
    assert "plotly" in html.read_text()[:100_000].lower()
    assert result["written"] == str(out_cfg) and result["html"] == str(html)


def test_exits_writes_into_the_config_by_default_and_prints_a_table(trained, capsys, tmp_path):
    cfg_path = tmp_path / "export.json"
    cfg_path.write_text(json.dumps({**CONFIG, "batch_size": 8, "notes": ["kept"]}))
    costs = _costs(load_config(cfg_path))
    args = ("exits", cfg_path, "--weights", trained["run"] / "model.pt", "--data", DATA, "--target", "v100")
    code, out, err = _run(capsys, *args, "--budget-ms", costs[-1], "--budgets-ms", f"{costs[0]},{costs[-1]}")
    assert code == 0, err
    assert f"written: {cfg_path}" in out and "confidence_top1" in out and "confidence policy top-1" in out
    data = json.loads(cfg_path.read_text())
    assert data["notes"] == ["kept"] and len(data["exit_thresholds"]) == 2
    # re-fitting a config that has thresholds replaces them
    code, out, err = _run(capsys, *args, "--budget-ms", costs[0])
    assert code == 0, err
    assert load_config(cfg_path).exit_thresholds == (0.0, 0.0)  # only the first exit fits: everything leaves there


def _bad_cases(trained, tmp: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    weights = trained["run"] / "model.pt"
    cfg = load_config(trained["cfg"])
    first = _costs(cfg)[0]
    no_exits = tmp / "static.json"
    no_exits.write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "exits"}))
    elsewhere = tmp / "elsewhere.json"
    elsewhere.write_text(json.dumps({**CONFIG, "exits": [0, 2]}))
    wrong_t = tmp / "wrong-thresholds.json"
    wrong_t.write_text(json.dumps({**CONFIG, "exit_thresholds": [0.9, 0.8, 0.7]}))
    good = str(trained["cfg"])
    return {
        "no exits": ([no_exits, "--weights", weights, "--budget-ms", 1.0], ("has no exits",)),
        "budget below the first exit": (
            [good, "--weights", weights, "--budget-ms", first / 2],
            ("budget_ms=", "below the first exit's cost", f"{first:.4g} ms per image"),
        ),
        "weights of another config": ([elsewhere, "--weights", weights, "--budget-ms", 1.0], ("--weights=",)),
        "thresholds of another config": ([wrong_t, "--weights", weights, "--budget-ms", 1.0], ("exit_thresholds",)),
        "unknown target": ([good, "--weights", weights, "--budget-ms", 1.0, "--target", "nope"], ("target='nope'",)),
        "missing weights file": ([good, "--weights", tmp / "none.pt", "--budget-ms", 1.0], ("--weights=",)),
        "no budget": ([good, "--weights", weights], ("--budget-ms",)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "no exits",
        "budget below the first exit",
        "weights of another config",
        "thresholds of another config",
        "unknown target",
        "missing weights file",
        "no budget",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(trained, capsys, tmp_path, case):
    argv, words = _bad_cases(trained, tmp_path)[case]
    before = {p: p.read_bytes() for p in tmp_path.iterdir()} | {trained["cfg"]: trained["cfg"].read_bytes()}
    out = tmp_path / "out.json"
    code, _, err = _run(capsys, "exits", "--target", "v100", "--data", DATA, "-o", out, *argv)  # the case's flags last
    _one_line_error(code, err, *words)
    assert not out.exists()
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in before if p.parent == tmp_path)


# ----------------------------------------------------------------------------- export


def test_export_carries_exits_head_width_and_thresholds(tmp_path):
    import optuna
    from optuna.trial import create_trial

    from dynas.results import export_trial

    cfg = ArchConfig.from_dict(
        {**CONFIG, "exits": [0, 2], "exit_head": "conv", "exit_width": 64, "exit_thresholds": [0.9, 0.75]}
    )
    pred = predict(cfg, "v100").to_dict()
    pred.pop("config", None)
    study = optuna.create_study(directions=["minimize", "maximize"], study_name="exits")
    for k, v in {"target": "v100", "batch_size": pred["batch_size"], "proxy": "finetune", "static_top1": 50.0}.items():
        study.set_user_attr(k, v)
    study.add_trial(
        create_trial(
            values=[pred["latency_ms"], 40.0],
            user_attrs={"config": cfg.to_dict(), "short": cfg.short(), "prediction": pred},
        )
    )
    data = export_trial(study, 0, tmp_path / "export.json")
    assert (data["exits"], data["exit_head"], data["exit_width"], data["exit_thresholds"]) == (
        [0, 2],
        "conv",
        64,
        [0.9, 0.75],
    )
    assert load_config(tmp_path / "export.json") == cfg
    build_model(tmp_path / "export.json")  # the exported file builds the model with its exit heads
