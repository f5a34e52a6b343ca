"""Multi-process training on this CPU: real torchrun, real Gloo process groups, real runs on the real data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cifar10_cnn.runs import read_metrics_csv

from .conftest import ROOT, free_port, on, one_thread_env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun(
    nproc: int, *args: str, nnodes: int = 1, node_rank: int = 0, port: int | None = None
) -> list[str]:
    rdzv = ["--standalone"] if nnodes == 1 else [
        "--nnodes", str(nnodes), "--node-rank", str(node_rank),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
    ]  # fmt: skip
    return [*TORCHRUN, *rdzv, "--nproc-per-node", str(nproc), *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=one_thread_env(), cwd=ROOT
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_two_processes_keep_identical_weights_and_match_one_process(tmp_path, cache_dir):
    """The quick recipe (batch norm, whitening, Muon, summed loss) for 3 steps: 2 ranks with 128 images each
    hold identical parameters after every step, and match 1 process with micro-batches of 128."""
    worker = str(ROOT / "tests" / "ddp_worker.py")
    run(torchrun(2, worker, str(tmp_path)))
    run([sys.executable, worker, str(tmp_path), "--micro-batch", "128"])

    two = json.loads((tmp_path / "record-2.json").read_text())
    assert len(two["spread"]) == 3 and max(two["spread"]) == 0.0, two["spread"]
    w2, w1 = load_file(tmp_path / "weights-2.safetensors"), load_file(tmp_path / "weights-1.safetensors")
    params = [k for k in w1 if "running" not in k and "num_batches" not in k]
    for k in params:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs")
    one = json.loads((tmp_path / "record-1.json").read_text())
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_torchrun_cli_learns_and_resumes_on_another_number_of_processes(tmp_path, small_data):
    """`torchrun -m cifar10_cnn train` on 2 Gloo processes learns; killed after epoch 1, the run resumes on one
    process and ends where the uninterrupted 2-process run ends. (4,000 real training images; the test set is
    the first 1,000 real test images.)"""
    common = ["-m", "cifar10_cnn", "train", "--subset", "4000", "--val-size", "400", "--epochs", "2"]
    common += ["--amp", "off", "--no-progress", *on(small_data)]
    full = tmp_path / "full"
    out = run(torchrun(2, *common, "--out", str(full))).stdout
    assert "distributed: 2 processes (gloo); global batch 64 = 32 per process x 2" in out
    results = json.loads((full / "results.json").read_text())
    assert results["processes"] == 2 and results["test_accuracy"] > 0.25  # chance is 0.10
    assert [r["epoch"] for r in read_metrics_csv(full / "metrics.csv")] == [1, 2]  # rank 0 logged, once

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        torchrun(2, *common, "--out", str(cut)), env=one_thread_env(), cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not read_metrics_csv(cut / "metrics.csv") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = [r["epoch"] for r in read_metrics_csv(cut / "metrics.csv")]
    assert done == [1] and not (cut / "results.json").exists()

    resumed = run(
        [sys.executable, *common[:3], "--resume", str(cut), "--no-progress", *on(small_data)]
    ).stdout
    assert f"resumed {cut} after epoch" in resumed
    # The same trajectory: epoch losses agree closely and the weights are near (the order of floating-point sums
    # differs between 1 and 2 processes, and 100 SGD steps amplify that to about 1% of the weights).
    for a, b in zip(
        read_metrics_csv(full / "metrics.csv"), read_metrics_csv(cut / "metrics.csv"), strict=True
    ):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    for k in a:
        assert ((a[k] - b[k]).norm() / a[k].norm()).item() < 0.05, k
    assert json.loads((cut / "results.json").read_text())["processes"] == 1


def test_ranks_that_disagree_on_the_config_stop_with_one_line(tmp_path, cache_dir):
    """Two 'nodes' on 127.0.0.1 launched with different --lr: both stop with the same clear error; no run."""
    port = free_port()
    args = ["-m", "cifar10_cnn", "train", "--subset", "600", "--epochs", "1", "--out", str(tmp_path / "run")]
    procs = [
        subprocess.Popen(
            torchrun(1, *args, "--lr", lr, nnodes=2, node_rank=rank, port=port),
            env=one_thread_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, lr in ((0, "0.01"), (1, "0.02"))
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode != 0
        assert "error: the ranks disagree on the config: rank 0 and rank 1 differ in lr=0.01 vs 0.02" in err
    assert not (tmp_path / "run").exists()


def test_sync_bn_on_cpu_is_one_line_on_every_rank(tmp_path, cache_dir):
    cmd = torchrun(
        2, "-m", "cifar10_cnn", "train", "--sync-bn", "--subset", "600", "--out", str(tmp_path / "r")
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=one_thread_env(), cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --sync-bn needs CUDA") == 2  # both ranks, one line each
    assert not (tmp_path / "r").exists()
