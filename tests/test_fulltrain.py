"""dynas train / dynas evaluate on a tiny generated image folder (CPU): learning, run files, resume
after SIGKILL (one process and torchrun with 2), bad data, pretrained weights.

Every run here is resnet18 at 32x32 on 4 classes of noisy single-colour PNGs (32 train and 8 val
images per class), 2 epochs of 8 steps of 16 images, so each takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynas.cli import main
from dynas.kernels.model import build_model

CONFIG = {
    "backbone": "resnet18",
    "input_size": 32,
    "stages": [
        {"paradigm": "spatial", "spatial_granularity": 2, "rate": 0.25},
        {"paradigm": "channel", "channel_granularity": 4, "rate": 0.25},
        {"paradigm": "layer", "rate": 0.25},
        {"paradigm": "static"},
    ],
}
COLOURS = [(200, 30, 30), (30, 180, 30), (30, 30, 200), (200, 200, 30)]
#: 2 epochs x 8 steps of 16; lr is given per 1024 images: 1.28 -> 0.02 at 16
ARGS = [
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--lr",
    "1.28",
    "--workers",
    "0",
    "--threads",
    "1",
    "--log-every",
    "4",
    "--checkpoint-every",
    "3",
]


def make_folder(root: Path, classes: int = 4, n_train: int = 32, n_val: int = 8, side: int = 24) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.array(COLOURS[c], float) + rng.normal(0, 40, (side, side, 3))  # [H, W, 3]
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fulltrain")
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    return {"root": root, "cfg": str(cfg), "data": str(make_folder(root / "data"))}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted run through the CLI, in this process."""
    run = setup["root"] / "reference"
    capture = pytest.MonkeyPatch()
    import io

    out, err = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", out)
    capture.setattr(sys, "stderr", err)
    try:
        code = main(["train", setup["cfg"], "--data", setup["data"], "--output-dir", str(run), *ARGS])
    finally:
        capture.undo()
    assert code == 0, err.getvalue()
    return {"run": run, "out": out.getvalue(), "err": err.getvalue()}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = torch.load(a), torch.load(b)
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


def _untrained_deviation(setup) -> float:
    from dynas.kernels.data import load_datasets
    from dynas.kernels.distributed import DistEnv
    from dynas.kernels.evaluate import eval_loader, evaluate_model

    torch.manual_seed(0)  # the run's seed: the same initial network
    model = build_model(CONFIG, num_classes=4)
    data = load_datasets(setup["data"], (32, 32), splits=("val",))
    result = evaluate_model(model, eval_loader(data.val, 16, 0, DistEnv()), DistEnv())
    return float(np.mean([abs(r["rate"] - 0.25) for r in result.rates.values()]))


# ----------------------------------------------------------------------------- one process


def test_training_learns_and_writes_the_run(setup, reference):
    run = reference["run"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.pt"]
    lines = _metrics(run)
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["steps"] == 16
    for m in lines:
        assert {
            "loss",
            "ce",
            "sparsity",
            "kd",
            "lr",
            "temperature",
            "top1",
            "top5",
            "val_images",
            "realised_rates",
            "train_rates",
            "images_per_s",
            "time_s",
        } <= set(m)
        assert set(m["realised_rates"]) == {"0", "1", "2"} and m["val_images"] == 32 and m["images_per_s"] > 0
    assert lines[1]["loss"] < lines[0]["loss"] and lines[1]["ce"] < lines[0]["ce"]
    assert lines[1]["top1"] > 25.0 + 20  # chance is 25 % (4 classes)
    final = lines[-1]["realised_rates"]
    deviation = np.mean([abs(r["rate"] - 0.25) for r in final.values()])
    assert deviation < _untrained_deviation(setup)  # the gates moved toward the configured rates
    saved = json.loads((run / "config.json").read_text())
    assert {k: saved[k] for k in CONFIG} == CONFIG
    trained = saved["trained"]
    assert trained["classes"] == ["class0", "class1", "class2", "class3"] and trained["num_classes"] == 4
    assert trained["train_images"] == 128 and trained["steps"] == 16 and trained["processes"] == 1
    assert trained["recipe"]["lambda_act"] == 10.0 and trained["recipe"]["lr_effective"] == pytest.approx(0.02)
    assert trained["final"]["top1"] == lines[-1]["top1"]
    model = build_model(run / "config.json")  # the classifier width comes from trained.num_classes
    model.load_state_dict(torch.load(run / "model.pt"))
    assert "no --weights: training from scratch" in reference["err"]
    assert "top-1" in reference["out"] and "predicted on v100" in reference["out"]


def test_evaluate_reports_what_training_ended_with(setup, reference, capsys):
    run = reference["run"]
    code, out, err = _run(
        capsys,
        "evaluate",
        run / "config.json",
        "--weights",
        run / "model.pt",
        "--data",
        setup["data"],
        "--json",
        "--workers",
        "0",
        "--bench",
        "--threads",
        "1",
    )
    assert code == 0, err
    s = json.loads(out)
    assert {"top1", "top5", "images", "realised_rates", "target", "latency_ms", "static_latency_ms", "measured"} <= set(
        s
    )
    final = json.loads((run / "config.json").read_text())["trained"]["final"]
    assert s["top1"] == pytest.approx(final["top1"]) and s["images"] == 32 and s["target"] == "v100"
    assert s["realised_rates"].keys() == final["realised_rates"].keys()
    for stage, r in s["realised_rates"].items():
        assert r["rate"] == pytest.approx(final["realised_rates"][stage]["rate"])
    assert s["measured"]["latency_ms"] > 0 and s["measured"]["static_latency_ms"] > 0


def _kill_after_checkpoints(cmd: list[str], checkpoints: int, env: dict | None = None) -> None:
    """Start ``cmd``, SIGKILL every process of it once it has logged ``checkpoints`` mid-epoch checkpoints."""
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True, env=env
    )
    seen = 0
    for line in proc.stderr:
        seen += "checkpoint at step" in line
        if seen == checkpoints:
            break
    for pid in _descendants(proc.pid) + [proc.pid]:  # torchrun's workers run in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert seen == checkpoints, "the run ended before it could be killed"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_killed_run_resumes_to_the_same_weights(setup, reference, capsys):
    run = setup["root"] / "killed"
    argv = ["train", setup["cfg"], "--data", setup["data"], "--output-dir", str(run), *ARGS]
    _kill_after_checkpoints([sys.executable, "-m", "dynas", *argv], checkpoints=2)
    assert (run / "checkpoint.pt").is_file() and not (run / "model.pt").exists()
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "resuming" in err
    assert _max_diff(run / "model.pt", reference["run"] / "model.pt") <= 1e-5
    for a, b in zip(_metrics(run), _metrics(reference["run"])):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["top1"] == b["top1"]


def test_a_checkpoint_of_another_run_is_refused(setup, reference, capsys, tmp_path):
    run = reference["run"]
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    other = json.loads(json.dumps(CONFIG))
    other["stages"][0]["rate"] = 0.5
    (tmp_path / "other.json").write_text(json.dumps(other))
    three = make_folder(tmp_path / "three", classes=3, n_train=8, n_val=2)
    for argv, fragment in [
        ([tmp_path / "other.json", "--data", setup["data"]], "holds a checkpoint of config="),
        ([setup["cfg"], "--data", three], "holds a checkpoint of num_classes=4; this run has num_classes=3"),
        ([setup["cfg"], "--data", setup["data"], "--seed", "1"], "a run with seed=0; this run has seed=1"),
    ]:
        code, _, err = _run(capsys, "train", *argv, "--output-dir", run, *ARGS)
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


# ----------------------------------------------------------------------------- torchrun, 2 processes


def _torchrun(*argv) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dynas",
        *[str(a) for a in argv],
    ]


def test_torchrun_two_processes_train_and_resume_after_sigkill(setup):
    argv = ["train", setup["cfg"], "--data", setup["data"], *ARGS]
    ref = setup["root"] / "ddp"
    proc = subprocess.run(_torchrun(*argv, "--output-dir", ref), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("top-1") == 1  # the summary, from rank 0 only
    assert sorted(p.name for p in ref.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.pt"]
    assert json.loads((ref / "config.json").read_text())["trained"]["processes"] == 2
    build_model(ref / "config.json").load_state_dict(torch.load(ref / "model.pt"))

    run = setup["root"] / "ddp-killed"
    _kill_after_checkpoints(_torchrun(*argv, "--output-dir", run), checkpoints=2)
    assert not (run / "model.pt").exists()
    proc = subprocess.run(_torchrun(*argv, "--output-dir", run), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    assert _max_diff(run / "model.pt", ref / "model.pt") <= 1e-5


# ----------------------------------------------------------------------------- bad data


def _corrupt(root: Path) -> Path:
    bad = root / "train" / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return bad


def _bad_data(tmp: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp / "empty"
    empty.mkdir()
    no_val = make_folder(tmp / "noval", n_train=4, n_val=0)
    differ = make_folder(tmp / "differ", n_train=4, n_val=2)
    (differ / "val" / "class3").rename(differ / "val" / "extra")
    corrupt = make_folder(tmp / "corrupt", n_train=4, n_val=2)
    bad = _corrupt(corrupt)
    return {
        "missing": (tmp / "missing", "does not exist"),
        "empty": (empty, "is an empty folder"),
        "split without images": (no_val, "split val/ has no images"),
        "class lists differ": (differ, "different class folders"),
        "corrupt image": (corrupt, f"image {str(bad)!r} cannot be read"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "split without images", "class lists differ", "corrupt image"])
def test_bad_data_is_one_line_before_training_and_writes_nothing(setup, capsys, tmp_path, case):
    data, fragment = _bad_data(tmp_path)[case]
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", setup["cfg"], "--data", data, "--output-dir", run, *ARGS)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dynas: error: ") and fragment in err, err
    assert not run.exists()


def test_skip_bad_images_counts_them_and_trains(setup, capsys, tmp_path):
    data = make_folder(tmp_path / "data", n_train=4, n_val=2)
    _corrupt(data)
    run = tmp_path / "run"
    code, out, err = _run(
        capsys,
        "train",
        setup["cfg"],
        "--data",
        data,
        "--output-dir",
        run,
        *ARGS,
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--skip-bad-images",
        "-q",
    )
    assert code == 0, err
    assert "1 unreadable image(s) left out" in err and "epoch" not in err  # -q: warnings only, no progress
    trained = json.loads((run / "config.json").read_text())["trained"]
    assert trained["skipped_images"] == 1 and trained["train_images"] == 16


# ----------------------------------------------------------------------------- pretrained weights


def _torchvision_state(num_classes: int) -> dict[str, torch.Tensor]:
    """A static resnet18 state dict under torchvision's names (as users have them)."""
    from dynas.spaces.backbones import get_backbone
    from dynas.spaces.torch_model import build_static_model

    torch.manual_seed(123)
    state = build_static_model(get_backbone("resnet18", 32)).state_dict()
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer4.1.bn2.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in state  # torchvision's resnet18 key names
    if num_classes != state["fc.weight"].shape[0]:
        state["fc.weight"], state["fc.bias"] = torch.randn(num_classes, 512), torch.zeros(num_classes)
    return state


@pytest.mark.parametrize("classes", [1000, 4])
def test_weights_start_the_run_and_feed_the_teacher(setup, capsys, tmp_path, classes):
    weights = tmp_path / "static.pth"
    state = _torchvision_state(classes)
    torch.save(state, weights)
    run = tmp_path / "run"
    code, _, err = _run(
        capsys,
        "train",
        setup["cfg"],
        "--data",
        setup["data"],
        "--output-dir",
        run,
        *ARGS,
        "--steps",
        "1",
        "--lr",
        "1e-6",
        "--weights",
        weights,
    )
    assert code == 0, err
    trained = torch.load(run / "model.pt")
    assert float((trained["layer3.0.conv1.weight"] - state["layer3.0.conv1.weight"]).abs().max()) < 1e-4
    used = json.loads((run / "config.json").read_text())["trained"]["recipe"]["teacher_used"]
    if classes == 1000:  # an ImageNet head: replaced for the 4 classes, and no teacher for them
        assert "a new one is trained for the 4 classes" in err and "no distillation" in err and not used
    else:
        assert "new one" not in err and used


# ----------------------------------------------------------------------------- pieces


def test_the_finetune_proxy_reads_an_image_folder(setup):
    from dynas.kernels.data import load_data

    splits = load_data(setup["data"], (32, 32), batch_size=8, seed=3)
    assert splits.num_classes == 4
    first = [next(splits.train_batches()) for _ in range(2)]  # every call restarts the same sequence
    x, y = first[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    xv, yv = next(iter(splits.val))
    assert xv.shape == (32, 3, 32, 32) and sorted(set(yv.tolist())) == [0, 1, 2, 3]


def test_global_batches_do_not_depend_on_the_number_of_processes():
    from dynas.kernels.distributed import DistEnv, EpochSampler

    data = list(range(103))
    one = EpochSampler(data, DistEnv(), seed=5)
    two = [EpochSampler(data, DistEnv(rank=r, world=2), seed=5) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(3)
    order = [i for i, _ in one]  # [(index, key)] -> indices
    shards = [[i for i, _ in s] for s in two]
    for k in range(len(order) // 8):  # global batch 8 = 4 per process x 2
        assert sorted(order[8 * k : 8 * k + 8]) == sorted(shards[0][4 * k : 4 * k + 4] + shards[1][4 * k : 4 * k + 4])
    one.set_start(16)
    assert [i for i, _ in one] == order[16:] and len(one) == len(order) - 16
    keys = {key for _, key in one}
    one.set_epoch(4)
    assert len(keys) == 1 and {key for _, key in one} != keys  # one augmentation key per epoch


def test_transforms_are_seeded_per_sample_and_sized():
    import random

    from PIL import Image

    from dynas.kernels.imagefolder import centre_crop, pil_to_uint8, random_resized_crop

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    a = pil_to_uint8(random_resized_crop(img, (32, 24), random.Random(7)))
    b = pil_to_uint8(random_resized_crop(img, (32, 24), random.Random(7)))
    c = pil_to_uint8(random_resized_crop(img, (32, 24), random.Random(8)))
    assert a.shape == (3, 32, 24) and a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, c)
    centre = centre_crop(img, (32, 32))
    assert centre.size == (32, 32)
    # the centre crop of an image already at 1/0.875 of the size is its middle
    big = Image.fromarray(np.arange(37 * 37 * 3, dtype=np.uint8).reshape(37, 37, 3))
    assert torch.equal(pil_to_uint8(centre_crop(big, (32, 32))), pil_to_uint8(big)[:, 2:34, 2:34])


def test_warmup_then_cosine():
    from dynas.kernels.recipe import warmup_cosine

    f = [warmup_cosine(s, 10, 2) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and f[-1] < 0.05
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


def test_exports_and_run_configs_are_configs(tmp_path):
    from dynas.spaces.config import load_config

    # an export of a finetune-proxy search has a "realised" block; RUN/config.json a "trained" one
    for extra in ({"realised": {"config": CONFIG, "rates": {"0": {"rate": 0.3}}}}, {"trained": {"num_classes": 4}}):
        path = tmp_path / "c.json"
        path.write_text(json.dumps({**CONFIG, "target": {"name": "a100"}, **extra}))
        assert load_config(path).to_dict() == CONFIG
    assert build_model(path).fc.out_features == 4  # trained.num_classes


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(capsys, caplog, tty):
    import logging

    from dynas.kernels.progress import Progress

    parts = {"loss": 1.5, "ce": 1.0, "sparsity": 0.05, "kd": 0.0, "lr": 0.1, "temperature": 2.0}
    with caplog.at_level(logging.INFO, logger="dynas.train"):
        p = Progress(True, epochs=2, images_per_step=16, log_every=2, tty=tty)
        p.start(0, steps=4, done=1)  # resumed after step 1
        for _ in range(3):
            p.step(lambda: parts)
        p.close()
    err = capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.name == "dynas.train"]
    if tty:
        assert "epoch 1/2" in err and "4/4" in err and "loss 1.5000" in err and not lines
    else:
        assert err == "" and len(lines) == 2 and lines[-1].startswith("epoch 1/2 step 4/4: loss 1.5000")
    with caplog.at_level(logging.WARNING, logger="dynas.train"):  # -q
        quiet = Progress(True, epochs=1, images_per_step=16, log_every=1, tty=tty)
        quiet.start(0, steps=1, done=0)
        quiet.step(lambda: parts)
        quiet.close()
    assert capsys.readouterr().err == ""
