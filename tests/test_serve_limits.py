"""Serve, the limits: request sizes, connection timeouts and limits, start-up checks and signals, on the real
server (a subprocess on 127.0.0.1) and real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import error_line, free_port, run_cli

pytest.register_assert_rewrite("tests.serving")  # before its import: it is also this module's plugin

from tests.serving import Server, cli_serve, closed_after, connect, server_env, start_server, stop_server  # noqa: E402

pytest_plugins = ["tests.serving"]  # the session's server, shared with the other serve test modules


def test_a_body_over_the_request_limit_is_refused_before_it_is_read(server):
    limit = 16 * 10 * 2**20 + 2**20
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {limit + 1}\r\n\r\n".encode()
        )
        answer = b""
        while chunk := s.recv(4096):  # the server answers at once and closes the connection
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and "send fewer or smaller files" in answer


def test_the_body_limit_also_counts_bodies_without_a_length():
    from cifar10_cnn.serve import ApiError, BodyLimit

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass

    chunks = iter([{"type": "http.request", "body": b"x" * 6, "more_body": True}] * 3)

    async def receive() -> dict:
        return next(chunks)

    with pytest.raises(ApiError, match="over"):
        asyncio.run(BodyLimit(app, max_bytes=10)({"type": "http", "headers": []}, receive, None))


# --- start-up: options checked first, broken models refused -----------------------------------------------------


def test_serve_cli_errors_are_one_line(tmp_path, trained_run):
    assert "does not exist" in error_line(run_cli("serve", str(tmp_path / "missing"), check=False))
    proc = run_cli("serve", str(trained_run), "--max-files", "0", check=False)
    assert "must be positive" in error_line(proc)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = run_cli("serve", str(trained_run), "--port", str(busy.getsockname()[1]), check=False)
    assert "cannot listen on 127.0.0.1" in error_line(proc)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"max_upload_mb": float("nan")}, "--max-upload-mb nan"),
        ({"max_upload_mb": float("inf")}, "--max-upload-mb inf"),
        ({"max_upload_mb": 0.0}, "--max-upload-mb 0"),
        ({"max_upload_mb": -1.0}, "--max-upload-mb -1"),
        ({"port": 99999}, "--port 99999"),
        ({"port": 0}, "--port 0"),
        ({"port": -5}, "--port -5"),
        ({"max_connections": 0}, "--max-connections 0"),
    ],
)
def test_serve_refuses_bad_options_before_loading_the_model(tmp_path, options, words):
    from cifar10_cnn.errors import UserError
    from cifar10_cnn.serve import serve

    with pytest.raises(UserError, match=words):
        serve(tmp_path / "no-model-needed", **options)  # checked before the model is looked for


def test_serve_cli_bad_options_are_one_line(trained_run):
    assert "--max-upload-mb nan" in error_line(
        run_cli("serve", str(trained_run), "--max-upload-mb", "nan", check=False)
    )
    assert "1 to 65535" in error_line(run_cli("serve", str(trained_run), "--port", "99999", check=False))


def test_a_broken_model_is_refused_at_start_not_served(trained_run, tmp_path):
    from tests.test_predict import broken_weights, tampered

    nan = broken_weights(trained_run, tmp_path / "nan.safetensors", float("nan"))
    assert "NaN or infinite" in error_line(
        run_cli("serve", str(nan), "--port", str(free_port()), check=False)
    )
    bad = tampered(trained_run, tmp_path / "bad.safetensors", classes="5")
    assert "metadata 'classes'" in error_line(
        run_cli("serve", str(bad), "--port", str(free_port()), check=False)
    )


def test_a_signal_during_warm_up_exits_0_with_one_line(trained_run):
    """SIGTERM (or Ctrl-C) while serve imports and loads the model, before it listens: status 0 and one line, not
    the 143 of a process the signal killed."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        port = free_port()
        proc = subprocess.Popen(
            cli_serve(trained_run)(port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=server_env(),
        )
        try:
            first = proc.stdout.readline()  # printed once the signals are taken, before the heavy imports
            assert first.startswith(f"loading {trained_run}"), first
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, (sig, proc.returncode, out, err)
        assert err.splitlines() == [f"stopped during warm-up ({sig.name}), before the server listened"], err
        assert "serving" not in out
        with socket.socket() as s:  # it never listened: the port is free
            s.bind(("127.0.0.1", port))


def test_the_server_helper_fails_when_health_never_answers(tmp_path):
    """The serve tests' fixtures fail, with the server's output, rather than yield a server that never answered."""
    sleeper = [sys.executable, "-c", "print('still warming up', flush=True); import time; time.sleep(60)"]
    with pytest.raises(pytest.fail.Exception, match=r"did not answer /health in 1 s:\nstill warming up"):
        start_server(lambda port: sleeper, tmp_path / "sleeper.log", timeout=1)
    quitter = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(pytest.fail.Exception, match="exited 3 before /health answered"):
        start_server(lambda port: quitter, tmp_path / "quitter.log")


# --- connection timeouts and limits, and SIGTERM (a server with short timeouts, ended by the last test) ---------


@pytest.fixture(scope="module")
def strict_server(trained_run, tmp_path_factory) -> Iterator[Server]:
    """The server with short timeouts (1 s for headers, 2 s for a body, 1 s of keep-alive), 3 connections."""
    code = (
        "import sys; from cifar10_cnn.serve import serve; "
        "serve(sys.argv[1], port=int(sys.argv[2]), access_log=False, header_timeout=1, body_timeout=2, keep_alive=1, "
        "max_connections=3)"
    )
    command = lambda port: [sys.executable, "-c", code, str(trained_run), str(port)]  # noqa: E731
    s = start_server(command, tmp_path_factory.mktemp("strict") / "server.log")
    yield s
    stop_server(s)


def test_idle_and_slow_connections_are_closed(strict_server):
    with connect(strict_server) as s:  # connects, sends nothing
        assert closed_after(s, 10)[0] < 5
    with connect(strict_server) as s:  # headers a byte at a time, forever
        t0 = time.monotonic()
        try:
            for byte in b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                s.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass  # closed by the server, as it should
        assert time.monotonic() - t0 < 6
        assert closed_after(s, 10)[0] < 5
    with connect(strict_server) as s:  # a body that never arrives: 408, then closed
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n")
        s.sendall(b"Content-Length: 100000\r\n\r\n--b\r\n")
        seconds, data = closed_after(s, 10)
        assert seconds < 6 and data.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in data
    with connect(strict_server) as s:  # keep-alive: idle after an answer
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        seconds, data = closed_after(s, 10)
        assert seconds < 5 and data.startswith(b"HTTP/1.1 200")
    assert httpx.get(f"{strict_server.url}/health", timeout=5).status_code == 200


def test_a_client_that_disconnects_mid_upload_logs_one_line(strict_server, cat_png):
    body = b"--b\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n" + cat_png * 50
    before = strict_server.log.read_text()
    with connect(strict_server) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n")
        s.sendall(f"Content-Length: {len(body) + 100}\r\n\r\n".encode() + body[: len(body) // 2])
        time.sleep(0.3)
    time.sleep(1.0)
    new = strict_server.log.read_text()[len(before) :]
    assert "Traceback" not in new and len([ln for ln in new.splitlines() if ln.strip()]) == 1, new
    assert "disconnected during the upload" in new
    assert httpx.get(f"{strict_server.url}/health", timeout=5).status_code == 200


def test_connections_over_the_limit_get_503_at_once(strict_server):
    """--max-connections 3: with three connections open, a fourth is answered 503 without waiting."""
    assert httpx.get(f"{strict_server.url}/ready", timeout=5).json()["limits"]["max_connections"] == 3
    held = [connect(strict_server) for _ in range(3)]  # open, idle: they count until the header timeout
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        answer = httpx.get(f"{strict_server.url}/health", timeout=5)
        assert answer.status_code == 503 and time.monotonic() - t0 < 1
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    assert httpx.get(f"{strict_server.url}/health", timeout=5).status_code == 200


def test_sigterm_finishes_the_request_in_flight_then_exits_0(strict_server, cat_png):
    """Ends the strict server, so it comes last: a request whose body is half sent gets SIGTERM mid-way."""
    body = (
        b"--b\r\nContent-Disposition: form-data; name=file; filename=cat.png\r\n\r\n"
        + cat_png
        + b"\r\n--b--\r\n"
    )
    with connect(strict_server) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n")
        s.sendall(f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        time.sleep(0.3)
        strict_server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new connections
            connect(strict_server).close()
        s.sendall(body[100:])
        _, answer = closed_after(s, 20)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer  # and the server closed the connection after it
    assert json.loads(payload)["results"][0]["filename"] == "cat.png"  # the whole answer
    assert strict_server.proc.wait(timeout=30) == 0
    assert "Traceback" not in strict_server.log.read_text()
