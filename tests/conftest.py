"""Shared fixtures: the real CIFAR-10 from ../shared (or $CIFAR10_DATA), a session cache, small runs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CIFAR10_DATA") or ROOT.parent / "shared" / "data" / "cifar10")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "train.npz").is_file():
        pytest.fail(f"the real CIFAR-10 is needed at {DATA_DIR} (or set CIFAR10_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["CIFAR10_CACHE"] = str(path)  # for the library and every subprocess the tests start
    return path


@pytest.fixture(scope="session")
def cifar(data_dir, cache_dir):
    from cifar10_cnn.data import load_cifar10

    return load_cifar10(data_dir, progress=False)


def copy_run(run: Path, dest: Path, *, checkpoints: bool = False) -> Path:
    """A private copy of a shared run at dest; without its checkpoints (large) unless asked."""
    skip = ("tb",) if checkpoints else ("checkpoints", "tb")
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns(*skip)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread_env() -> dict[str, str]:
    """The environment of a subprocess that shares the 2 cores with others: the real data, one thread."""
    return {**os.environ, "CIFAR10_DATA": str(DATA_DIR), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """`python -m cifar10_cnn ARGS` in a subprocess, the way a user runs it."""
    env = {**os.environ, "CIFAR10_DATA": str(DATA_DIR), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cifar10_cnn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"cifar10 {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single error line a failed command printed (and check that it is one line, no traceback)."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="session")
def trained_run(cifar, tmp_path_factory) -> Path:
    """A small finished seed_cnn run (1 epoch on 1,000 images: seconds), for predict, export and serve."""
    from cifar10_cnn.config import recipe_config
    from cifar10_cnn.train import train

    out = tmp_path_factory.mktemp("trained") / "seed-small"
    cfg = recipe_config("seed", epochs=1, subset=1000, val_size=200)
    return train(cfg, out=out, data=cifar, progress=False, echo=lambda _: None)
