"""What the serve tests share: starting a real server (a subprocess on 127.0.0.1, a free port) and waiting for
/health, stopping it, the session's server and client, and the helpers that read its answers.

A plugin of the serve test modules (`pytest_plugins = ["tests.serving"]`), so that the session-scoped server is
one process for all of them, not one per module.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DATA_DIR, free_port


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def server_env() -> dict[str, str]:
    return {**os.environ, "CIFAR10_DATA": str(DATA_DIR), "PYTHONUNBUFFERED": "1"}


def cli_serve(model: Path, *args: str) -> Callable[[int], list[str]]:
    """The command line of `cifar10 serve MODEL --port P ARGS`, for a port."""
    return lambda port: [sys.executable, "-m", "cifar10_cnn", "serve", str(model), "--port", str(port), *args]


def start_server(command: Callable[[int], list[str]], log: Path, timeout: float = 180) -> Server:
    """command(port) in a subprocess, its output in log, once /health answers 200; the test fails (with the
    server's output) when it exits first or does not answer in time."""
    port = free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen(command(port), stdout=f, stderr=subprocess.STDOUT, env=server_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited {proc.returncode} before /health answered:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    pytest.fail(f"the server did not answer /health in {timeout} s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def server(trained_run, tmp_path_factory) -> Iterator[Server]:
    """`cifar10 serve` of the small trained run, for every serve test module (one process)."""
    s = start_server(cli_serve(trained_run), tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    stop_server(s)
    assert s.proc.returncode is not None
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


@pytest.fixture(scope="session")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png(image: np.ndarray, size: int | None = None) -> bytes:
    img = Image.fromarray(image)
    if size:
        img = img.resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def cat_png(cifar) -> bytes:
    return png(cifar.test_images[0])  # a cat, CIFAR-10 test image 0


def data_url_image(url: str) -> np.ndarray:
    """The RGB pixels of a PNG data URL (and that it is one)."""
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64", head
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img)


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by Prometheus' own text-format parser: {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return time.monotonic() - t0, data
