"""dynas bench and dynas train: the measuring harness and the CPU fine-tuning demo."""

from __future__ import annotations

import json

import pytest
import torch

from dynas.cli import main
from dynas.errors import ConfigError
from dynas.kernels.bench import bench
from dynas.kernels.trainer import synthetic_images, train

CFG = {
    "backbone": "resnet18",
    "input_size": 32,
    "stages": [
        {"paradigm": "spatial", "spatial_granularity": 2, "rate": 0.5},
        {"paradigm": "channel", "channel_granularity": 4, "rate": 0.5},
        {"paradigm": "layer", "rate": 0.5},
        {"paradigm": "static"},
    ],
}


def test_bench_reports_both_latencies_and_the_fast_path_error():
    r = bench(CFG, batch_size=2, threads=1, repeats=3, warmup=1)
    assert r.static_ms > 0 and r.dynamic_ms > 0
    assert r.speedup == pytest.approx(r.static_ms / r.dynamic_ms)
    assert r.max_abs_err < 1e-4  # fast path agrees with the dense-masked reference
    assert r.threads == 1 and r.batch_size == 2 and r.device == "cpu"
    assert r.config == "S2@0.50 | C4@0.50 | L@0.50 | static"


@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
def test_bench_runs_in_either_memory_format(fmt):
    r = bench(CFG, batch_size=2, threads=1, repeats=2, warmup=0, memory_format=fmt)
    assert r.memory_format == fmt and r.max_abs_err < 1e-4


def test_bench_in_random_gate_mode(capsys, tmp_path):
    r = bench(CFG, batch_size=4, threads=1, repeats=2, warmup=0, gate_mode="random")
    assert r.gate_mode == "random" and r.max_abs_err < 1e-4  # the reference path sees the same draws
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CFG))
    assert main(["bench", str(path), "--repeats", "1", "--warmup", "0", "--threads", "1", "--gates", "random"]) == 0
    assert "random gate mode" in capsys.readouterr().out


def test_bench_on_the_thread_clock_reports_the_flops_limit():
    r = bench(CFG, batch_size=2, threads=1, repeats=2, warmup=0, clock="thread")
    assert r.clock == "thread" and r.static_ms > 0 and r.dynamic_ms > 0
    assert 1.0 < r.flops_limit < 4.0  # every dynamic stage at rate 0.5 skips some work, none all of it


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"device": "tpu"}, "device='tpu'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"clock": "cycles"}, "clock='cycles'"),
        ({"threads": 0}, "threads=0"),
        ({"memory_format": "nchw"}, "memory_format='nchw'"),
        ({"gate_mode": "adaptive"}, "gate_mode='adaptive'"),
    ],
)
def test_bench_rejects_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bench(CFG, **kwargs)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine; the CPU path is tested above"
)
def test_bench_on_cuda():
    r = bench(CFG, device="cuda", batch_size=2, repeats=3, warmup=1)
    assert r.max_abs_err < 1e-3


def test_cli_bench_json(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CFG))
    assert main(["bench", str(path), "--repeats", "2", "--warmup", "0", "--threads", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in (
        "static_ms",
        "dynamic_ms",
        "speedup",
        "max_abs_err",
        "device",
        "threads",
        "batch_size",
        "memory_format",
    ):
        assert key in d


def test_cli_bench_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynas: error:")


def test_synthetic_images_are_seeded_and_mostly_background():
    x1, y1 = synthetic_images(8, (32, 32), seed=3)
    x2, y2 = synthetic_images(8, (32, 32), seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (8, 3, 32, 32) and int(y1.max()) < 10
    bright = (x1.abs().amax(dim=1) > 1.5).float().mean().item()  # share of object pixels
    assert 0.05 < bright < 0.2
    with pytest.raises(ConfigError, match="num_classes=1"):
        synthetic_images(2, (32, 32), num_classes=1)


def test_train_lowers_the_loss_and_tracks_every_dynamic_stage():
    model, hist = train(CFG, steps=40, batch_size=16, train_size=256, val_size=64, lr=0.05)
    first, last = sum(hist.ce[:8]) / 8, sum(hist.ce[-8:]) / 8
    assert last < first
    assert set(hist.stage_targets) == {0, 1, 2} and set(hist.final_rates) == {0, 1, 2}
    assert all(0.0 < t <= 1.0 for t in hist.flops_targets)
    assert 0.0 <= hist.final_accuracy <= 1.0
    with pytest.raises(ConfigError, match="steps=0"):
        train(CFG, steps=0)
