"""Training end to end on real CIFAR-10 subsets: learning, run directory, resume, reproducibility, errors."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cifar10_cnn import data as D
from cifar10_cnn.checkpoint import load_checkpoint
from cifar10_cnn.config import TrainConfig, recipe_config
from cifar10_cnn.errors import CheckpointError, TrainingDiverged
from cifar10_cnn.inference import evaluate_logits
from cifar10_cnn.models import count_params, create_model, list_models
from cifar10_cnn.optim import lr_factor
from cifar10_cnn.train import fit
from cifar10_cnn.weights import load_model, read_metadata

from .conftest import DATA_DIR, copy_run, error_line, in_process, on, run_cli

SMALL = ["--subset", "1000", "--val-size", "200", "--no-progress"]


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def quiet(*_):
    pass


# --- models ------------------------------------------------------------------------------------------------


def test_registry_builds_every_model():
    assert {"seed_cnn", "resnet18", "vgg11", "resnet9"} <= set(list_models())
    x = torch.randn(2, 3, 32, 32)
    for name in list_models():
        assert create_model(name).eval()(x).shape == (2, 10), name
    # The classic architecture, exactly: convs 32/64/128 and FC 2048 -> 512 -> 10.
    assert count_params(create_model("seed_cnn")) == 896 + 18_496 + 73_856 + 1_049_088 + 5_130


def test_lr_schedules():
    cfg = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=1)
    factors = [lr_factor(cfg, s, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.01
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    step = TrainConfig(epochs=10, schedule="step", step_size=3, step_gamma=0.1)
    assert [lr_factor(step, e * 10, 10) for e in (0, 2, 3, 6)] == pytest.approx([1, 1, 0.1, 0.01])
    one = TrainConfig(epochs=4, schedule="onecycle")
    peak = max(range(40), key=lambda s: lr_factor(one, s, 10))
    assert peak == 9 and lr_factor(one, 39, 10) < 0.05


# --- learning ------------------------------------------------------------------------------------------------


def test_a_val_size_from_the_recipe_is_sized_to_the_data_and_one_the_user_gives_is_not(tmp_path):
    from cifar10_cnn.cli import build_parser, config_from_args

    def cfg(*args: str) -> TrainConfig:
        return config_from_args(build_parser().parse_args(["train", *args]))

    quick = cfg("--recipe", "quick")
    assert quick.val_size == 1000 and quick.val_size_by_recipe
    assert quick.sized_for(50_000, 10).val_size == 1000  # the recipe's own data: as published
    assert quick.sized_for(96, 3).val_size == 9 and quick.sized_for(20, 3).val_size == 3  # a tenth, 1 a class
    assert replace(quick, subset=5000).sized_for(50_000, 10).val_size == 500
    assert not cfg("--recipe", "quick", "--val-size", "1000").val_size_by_recipe
    assert (
        cfg("--recipe", "quick", "--val-size", "1000").sized_for(96, 3).val_size == 1000
    )  # make_splits refuses
    assert not cfg("--recipe", "seed").val_size_by_recipe  # the seed recipe has no fixed split
    # A config file keeps what it says; a --val-size given with it is the user's.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(quick.to_dict()))
    assert cfg("--config", str(path)).val_size_by_recipe
    assert not cfg("--config", str(path), "--val-size", "1000").val_size_by_recipe


def test_seed_cnn_learns_in_one_epoch(cifar, tmp_path):
    """1 epoch (70 steps) on 4,500 real images: held-out accuracy clearly above chance (10%).

    With 500 validation and 10,000 test images, 18% is more than 6 standard deviations above chance.
    """
    cfg = recipe_config("seed", epochs=1, subset=4500, val_size=500)
    splits = D.make_splits(cifar, val_size=500, split_seed=0, subset=4500)
    result = fit(cfg, splits, tmp_path, progress=False, echo=quiet)
    logits = evaluate_logits(result.model, splits.test)
    test_acc = (logits.argmax(1) == splits.test.labels).float().mean().item()
    assert result.history[0]["val_acc"] > 0.18
    assert test_acc > 0.18, test_acc


# --- the CLI end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`cifar10 train` for 2 epochs on 1,000 real images (seed 3, cosine), evaluated on all 10,000 test images."""
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("train", "--epochs", "2", *SMALL, "--seed", "3", "--out", str(run), "--schedule", "cosine")
    return run, proc


def test_train_cli_writes_a_complete_run(cli_run, tmp_path):
    source, proc = cli_run
    assert "model seed_cnn (1,147,466 params) | device cpu" in proc.stdout
    assert "verified" in proc.stdout and "train 800 / val 200 / test 10000" in proc.stdout
    run = copy_run(source, tmp_path / "run", checkpoints=True)

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "seed_cnn" and config["schedule"] == "cosine" and config["epochs"] == 2

    rows = metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}

    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["test_accuracy"] <= 1 and results["test_loss"] > 0
    assert list(results["per_class_accuracy"]) == list(D.CLASSES)
    cm = np.array(results["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 10000 and (cm.sum(1) == 1000).all()
    assert np.trace(cm) / 10000 == pytest.approx(results["test_accuracy"])
    assert results["epochs_run"] == 2 and results["train_seconds"] > 0
    assert results["data"]["verified"] is True
    # The test accuracy comes first, then the slower extras; the last line says where the time went.
    assert 0 < results["headline_seconds"] < results["total_seconds"]
    lines = proc.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("test accuracy"))
    assert f"{results['test_accuracy']:.2%} on 10,000 images (no TTA" in lines[first]
    assert lines[-1].startswith(f"{results['total_seconds']:.0f} s in all: training")

    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(run / "checkpoints" / name)["epoch"] in (1, 2)
    meta = read_metadata(run / "model.safetensors")
    assert meta["architecture"] == "seed_cnn" and meta["classes"] == list(D.CLASSES)
    assert list((source / "tb").glob("events.out.tfevents.*"))
    for plot in ("curves", "confusion", "per_class", "predictions", "augmentations"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 5000, plot
    report = (run / "report.md").read_text()
    assert f"{results['test_accuracy'] * 100:.2f}" in report
    assert "data:image/png;base64," in (run / "report.html").read_text()

    # The weights reload into the same predictions, and `evaluate` reproduces the figures.
    model, _ = load_model(run)
    test = D.to_split(*np.load(DATA_DIR / "test.npz").values())
    acc = (evaluate_logits(model, test).argmax(1) == test.labels).float().mean().item()
    assert acc == pytest.approx(results["test_accuracy"])
    (run / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "test_accuracy"}))
    run_cli("evaluate", str(run), "--no-progress")
    assert json.loads((run / "results.json").read_text())["test_accuracy"] == pytest.approx(acc)


def test_config_file_reproduces_a_run_and_seeds_are_deterministic(cli_run, small_data, tmp_path):
    """--config run/config.json repeats the run exactly; --seed 4 on top of it does not. Both train on the same
    1,000 images as the first run, the first of the file, here read from the smaller copy of the data (so the
    weights are the same, bit for bit, whatever else the folder holds). The first run was a real process; the
    repeats call the command line's main() in this one (the same arithmetic, without another torch import)."""
    first, second, other = cli_run[0], tmp_path / "b", tmp_path / "c"
    config = ["train", "--config", str(first / "config.json"), "--no-progress", *on(small_data)]
    assert in_process(*config, "--out", str(second)).returncode == 0
    assert in_process(*config, "--seed", "4", "--out", str(other)).returncode == 0

    def numbers(run):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics(run)]

    assert numbers(first) == numbers(second)
    assert numbers(first) != numbers(other)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill_matches_an_uninterrupted_run(small_data, tmp_path):
    """A 3-epoch run killed mid-way (SIGKILL) and resumed ends with the same weights as one never stopped.
    The killed run is a real process; the resume and the straight run call main() in this one."""
    args = ["train", "--epochs", "3", "--subset", "1500", "--val-size", "200", "--no-progress", "--seed", "1"]
    args += on(small_data)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "CIFAR10_DATA": str(DATA_DIR)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar10_cnn", *args, "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "metrics.csv").exists() and len(metrics(killed)) >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    done = load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"]
    assert 1 <= done < 3

    assert in_process("train", "--resume", str(killed), "--no-progress", *on(small_data)).returncode == 0
    assert in_process(*args, "--out", str(straight)).returncode == 0
    a, b = load_file(killed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(metrics(killed)) == 3
    assert [r["val_acc"] for r in metrics(killed)] == [r["val_acc"] for r in metrics(straight)]


def test_early_stopping_restores_the_best_weights(cifar, tmp_path):
    # A learning rate so small that validation accuracy cannot improve after the first epoch.
    cfg = recipe_config("seed", epochs=6, lr=1e-9, patience=2, subset=600, val_size=100)
    splits = D.make_splits(cifar, val_size=100, split_seed=0, subset=600)
    result = fit(cfg, splits, tmp_path, progress=False, echo=quiet)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(v, best[k]) for k, v in result.model.state_dict().items())


def test_divergence_stops_with_the_last_good_checkpoint_intact(cifar, tmp_path):
    splits = D.make_splits(cifar, val_size=100, split_seed=0, subset=1100)
    fit(
        recipe_config("seed", epochs=1, subset=1100, val_size=100),
        splits,
        tmp_path,
        progress=False,
        echo=quiet,
    )
    good = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    # Blow the learning rate up inside the checkpoint so that epoch 2 diverges.
    blown = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    blown["scheduler"]["base_lrs"] = [1e8] * len(blown["scheduler"]["base_lrs"])
    torch.save(blown, tmp_path / "checkpoints" / "last.pt")
    good_bytes = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    cfg = recipe_config("seed", epochs=2, subset=1100, val_size=100)
    with pytest.raises(TrainingDiverged, match="checkpoint of epoch 1 is intact"):
        fit(cfg, splits, tmp_path, resume=True, progress=False, echo=quiet)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == good_bytes
    after = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert after["epoch"] == 1 and all(torch.equal(good["model"][k], v) for k, v in after["model"].items())
    assert not (tmp_path / "model.safetensors").exists()


# --- errors: one line each, nothing lost ---------------------------------------------------------------------------


def test_refuses_to_overwrite_a_run_unless_forced(tmp_path, trained_run, small_data):
    run = copy_run(trained_run, tmp_path / "run", checkpoints=True)
    before = (run / "model.safetensors").read_bytes()
    line = error_line(in_process("train", "--epochs", "1", *SMALL, "--out", str(run)))
    assert "already holds a run" in line and "--force" in line
    assert (run / "model.safetensors").read_bytes() == before
    forced = in_process(
        "train", "--epochs", "1", *SMALL, "--lr", "0.02", "--out", str(run), "--force", *on(small_data)
    )
    assert forced.returncode == 0, forced.stderr
    assert json.loads((run / "config.json").read_text())["lr"] == 0.02


def test_resume_errors(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run", checkpoints=True)
    line = error_line(in_process("train", "--resume", str(run), "--lr", "0.5"))
    assert "conflicts with --lr 0.5" in line
    ckpt = run / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    line = error_line(run_cli("train", "--resume", str(run), "--epochs", "1", check=False))
    assert "unreadable or truncated" in line
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)


def test_unknown_names_list_the_known_ones(tmp_path):
    line = error_line(in_process("train", "--model", "resnet1000", "--out", str(tmp_path / "x")))
    assert "unknown model 'resnet1000'" in line and "seed_cnn" in line and "resnet18" in line
    line = error_line(in_process("train", "--recipe", "nope", "--out", str(tmp_path / "y")))
    assert "unknown recipe 'nope'" in line and "seed" in line
    if not torch.cuda.is_available():
        line = error_line(in_process("train", "--device", "cuda", "--out", str(tmp_path / "z")))
        assert "no CUDA GPU is available" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_data_without_network(tmp_path):
    proc = in_process(
        "train", "--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "run"), "--no-progress",
        env={"CIFAR10_DATA": "", "HTTPS_PROXY": "http://127.0.0.1:9"},
    )  # fmt: skip
    line = error_line(proc)
    assert "cannot download" in line and "--data-dir" in line


def test_evaluate_a_run_without_a_model(tmp_path):
    (tmp_path / "run").mkdir()
    line = error_line(in_process("evaluate", str(tmp_path / "run")))
    assert "no finished model" in line and "--resume" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, small_data):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        # Each checkpoint of seed_cnn is about 9 MB: the first one cannot fit.
        proc = run_cli(
            "train", "--epochs", "2", *SMALL, "--out", str(mnt / "run"), *on(small_data), check=False
        )
        line = error_line(proc)
        assert "no space left on device" in line
        assert not [p for p in (mnt / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(mnt)])
