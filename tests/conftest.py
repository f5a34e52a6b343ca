"""Shared fixtures: the real CIFAR-10 from ../shared (or $CIFAR10_DATA), a session cache, small runs.

Train once, use many times: the runs here are made once per session (per xdist worker) and copied by the
tests that change them. `small_data` is a real subset of CIFAR-10 (5,000 train, 1,000 test images, the first
of each file) for command-line runs whose claim does not depend on the full test set: their evaluation then
costs a tenth. `in_process` runs the command line's `main` in this process, for error paths that need no
process of their own (each `python -m cifar10_cnn` pays torch's import).
"""

from __future__ import annotations

import ast
import contextlib
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CIFAR10_DATA") or ROOT.parent / "shared" / "data" / "cifar10")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "train.npz").is_file():
        pytest.fail(f"the real CIFAR-10 is needed at {DATA_DIR} (or set CIFAR10_DATA)")
    return DATA_DIR


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4 (each holds the data set and trains its own small runs)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_configure(config) -> None:
    """Under xdist, each worker (and every process it starts) gets its share of the cores: two workers of two
    threads each on two cores would stall each other (OpenMP threads spin while they wait)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


# The files that train the most, heaviest first (--durations on a 2-core AVX2 CPU). xdist hands whole files
# to the workers in collection order, so these start first and the light files fill in at the end: a heavy
# file collected last (test_train.py, alphabetically) would leave the other worker idle for minutes.
HEAVY_FIRST = (
    "test_train.py", "test_distributed.py", "test_run_safety.py", "test_fast.py", "test_tune.py",
    "test_evaluate_notebook.py", "test_evaluate.py", "test_predict.py", "test_folders.py", "test_image_size.py",
    "test_cifar100.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items) -> None:
    """Run the files of HEAVY_FIRST first, in that order; the others after them, as collected."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    # A stable sort: the tests of a file keep their order.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole run, shared by the xdist workers (the cache's writes are atomic)."""
    root = tmp_path_factory.getbasetemp()
    path = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "cifar10-cache"
    path.mkdir(exist_ok=True)
    os.environ["CIFAR10_CACHE"] = str(path)  # for the library and every subprocess the tests start
    return path


@pytest.fixture(scope="session")
def cifar(data_dir, cache_dir):
    from cifar10_cnn.data import load_cifar10

    return load_cifar10(data_dir, progress=False)


@pytest.fixture(scope="session")
def small_data(cifar, tmp_path_factory) -> Path:
    """A real subset of CIFAR-10 as a train.npz/test.npz pair: the first 5,000 train and 1,000 test images."""
    import numpy as np

    root = tmp_path_factory.mktemp("small-data")
    np.savez(root / "train.npz", images=cifar.train_images[:5000], labels=cifar.train_labels[:5000])
    np.savez(root / "test.npz", images=cifar.test_images[:1000], labels=cifar.test_labels[:1000])
    return root


def on(data: Path) -> list[str]:
    """The command-line options that train on a data folder other than the real, verified CIFAR-10."""
    return ["--data-dir", str(data), "--allow-unverified"]


def copy_run(run: Path, dest: Path, *, checkpoints: bool = False) -> Path:
    """A private copy of a shared run at dest; without its checkpoints (large) unless asked."""
    skip = ("tb",) if checkpoints else ("checkpoints", "tb")
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns(*skip)))


def snapshot(root: Path, *, mtimes: bool = False) -> dict[str, str]:
    """Every entry under root, links not followed: a file's sha256 (and its mtime, if asked), else its kind.
    Compared before and after a command, it shows what the command wrote, and that a refused one wrote nothing."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file():
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "special"
        else:
            kind = hashlib.sha256(p.read_bytes()).hexdigest()
            kind += f" {p.stat().st_mtime_ns}" if mtimes else ""
        out[str(p.relative_to(root))] = kind
    return out


def loaded_by(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of modules a fresh interpreter holds after running code (the code's own asserts must pass)."""
    check = f"\nimport sys\nprint([m for m in {modules!r} if m in sys.modules])\n"
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # the list printed above


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


def in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cifar10 ARGS` through the command line's main() in this process: its exit status and what it printed."""
    from cifar10_cnn.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update({"CIFAR10_DATA": str(DATA_DIR), **(env or {})})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's errors and --help
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["cifar10", *args], code, out.getvalue(), err.getvalue())


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
    from cifar10_cnn.pipeline import train

    out = tmp_path_factory.mktemp("trained") / "seed-small"
    cfg = recipe_config("seed", epochs=1, subset=1000, val_size=200)
    return train(cfg, out=out, data=cifar, progress=False, echo=lambda _: None)


class Endless(http.server.BaseHTTPRequestHandler):
    """Sends zeros without a Content-Length (the end is when the server closes), up to 8 MiB."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):  # the client hanging up is the point
            for _ in range(128):
                self.wfile.write(bytes(2**16))

    def log_message(self, *args):
        pass


@pytest.fixture()
def endless_server():
    """A real HTTP server on 127.0.0.1 that sends more than any download's bound (for CIFAR-10 and -100)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    httpd.daemon_threads, httpd.block_on_close = True, False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
