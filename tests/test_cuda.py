"""What differs on a GPU: mixed precision, exact resume, checkpoints across devices, the verbs on a GPU model.

    pytest -m cuda                 # on a machine with a CUDA GPU (skipped elsewhere, so CI skips them)
    CIFAR10_TEST_ACCEL=mps pytest -m cuda   # the same tests on another accelerator

Every run here is a real `python -m cifar10_cnn` process on the real data subset, as a user runs it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from cifar10_cnn.checkpoint import load_checkpoint
from cifar10_cnn.device import select_device
from cifar10_cnn.errors import UserError
from tests.conftest import DATA_DIR, on, run_cli
from tests.serving import cli_serve, png, start_server, stop_server

ACCEL = os.environ.get("CIFAR10_TEST_ACCEL", "cuda")


def _available(name: str) -> bool:
    try:
        select_device(name)
    except UserError:
        return False
    return True


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _available(ACCEL), reason=f"no {ACCEL} device here"),
]

SMALL = ["--subset", "2000", "--val-size", "200", "--no-progress"]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def gpu_run(small_data, tmp_path_factory) -> Path:
    """The seed CNN, 2 epochs on 1,800 real images on the accelerator, default precision."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    run_cli("train", "--device", ACCEL, "--epochs", "2", *SMALL, "--out", str(run), *on(small_data))
    return run


@pytest.mark.parametrize("amp, dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_training_learns_in_mixed_precision(small_data, tmp_path, amp, dtype):
    """fp16 with the gradient scaler, and bf16: the loss falls and held-out accuracy is far above chance."""
    run = tmp_path / amp
    proc = run_cli("train", "--device", ACCEL, "--amp", amp, "--epochs", "3", *SMALL, "--out", str(run),
                   *on(small_data))  # fmt: skip
    assert f"| device {ACCEL}" in proc.stdout and dtype in proc.stdout
    res = results(run)
    assert res["test_accuracy"] > 0.25, res["test_accuracy"]  # chance is 10%; 1,000 test images
    losses = [float(r["train_loss"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert len(losses) == 3 and losses[-1] < losses[0]
    scaler = load_checkpoint(run / "checkpoints" / "last.pt", map_location="cpu")["scaler"]
    if amp == "fp16":  # the grad scaler was on: its saved state holds a power-of-two loss scale
        assert scaler and math.log2(scaler["scale"]).is_integer()
    else:
        assert scaler == {}  # bf16 needs no scaler: it stays off


def _kill_after_first_epoch(args: list[str], run: Path, epochs: int) -> None:
    env = {**os.environ, "CIFAR10_DATA": str(DATA_DIR)}
    proc = subprocess.Popen([sys.executable, "-m", "cifar10_cnn", *args, "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "checkpoints" / "last.pt").exists():
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = load_checkpoint(run / "checkpoints" / "last.pt", map_location="cpu")["epoch"]
    assert 1 <= done < epochs


def test_resume_after_sigkill_is_exact_with_deterministic_algorithms(small_data, tmp_path):
    """Killed after its first checkpoint, resumed: the same weights, bit for bit, as a run never stopped."""
    args = ["train", "--device", ACCEL, "--deterministic", "--epochs", "6", *SMALL, "--seed", "1",
            *on(small_data)]  # fmt: skip
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    _kill_after_first_epoch(args, killed, 6)
    run_cli("train", "--resume", str(killed), "--no-progress", *on(small_data))
    proc = run_cli(*args, "--out", str(straight))
    assert ", deterministic" in proc.stdout
    a, b = load_file(killed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first, then", [(ACCEL, "cpu"), ("cpu", ACCEL)])
def test_a_checkpoint_resumes_on_the_other_device(small_data, tmp_path, first, then):
    """A run killed on one device resumes on the other (--device may change on --resume) and finishes."""
    args = ["train", "--device", first, "--epochs", "4", *SMALL, *on(small_data)]
    run = tmp_path / "run"
    _kill_after_first_epoch(args, run, 4)
    proc = run_cli("train", "--resume", str(run), "--device", then, "--no-progress", *on(small_data))
    assert f"| device {then}" in proc.stdout and "resumed" in proc.stdout
    res = results(run)
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 4
    assert res["test_accuracy"] > 0.2


def test_a_gpu_trained_model_evaluates_predicts_exports_and_serves(gpu_run, small_data, tmp_path, cifar):
    """The weights a GPU run wrote (CPU tensors in safetensors) work with every verb; ONNX is verified."""
    assert results(gpu_run)["device"].startswith(ACCEL)
    proc = run_cli("evaluate", str(gpu_run), "--no-progress", *on(small_data))
    assert "test accuracy" in proc.stdout.lower()
    image = tmp_path / "cat.png"
    image.write_bytes(png(cifar.test_images[0]))
    out = json.loads(run_cli("predict", str(gpu_run), str(image), "--json").stdout)["results"]
    assert len(out) == 1 and len(out[0]["predictions"]) == 3
    onnx = tmp_path / "model.onnx"
    proc = run_cli("export", str(gpu_run), "--format", "onnx", "--out", str(onnx))
    assert onnx.is_file() and "verified" in proc.stdout
    server = start_server(cli_serve(gpu_run), tmp_path / "serve.log")
    try:
        r = httpx.post(f"{server.url}/predict", files={"file": ("cat.png", image.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]["predictions"][0]["class"]
        assert top == out[0]["predictions"][0]["class"]
    finally:
        stop_server(server)


def test_seeds_and_cross_validation_on_the_gpu(small_data, tmp_path):
    """--seeds 2 and --cv 2 each train two runs on the accelerator and summarise them."""
    base = ["train", "--device", ACCEL, "--epochs", "1", "--subset", "1000", "--no-progress", *on(small_data)]
    seeds = run_cli(*base, "--val-size", "100", "--seeds", "2", "--out", str(tmp_path / "seeds"))
    cv = run_cli(*base, "--cv", "2", "--out", str(tmp_path / "cv"))
    for proc, root in ((seeds, tmp_path / "seeds"), (cv, tmp_path / "cv")):
        runs = sorted(p for p in root.iterdir() if (p / "results.json").is_file())
        assert len(runs) == 2, proc.stdout
        assert all(results(r)["device"].startswith(ACCEL) for r in runs)
        assert "±" in proc.stdout
