"""Serve: the real server (uvicorn on 127.0.0.1, a free port) over HTTP, every bad input, and a real browser.

The browser test drives Debian's Chromium (apt package `chromium`) with Playwright; when Chromium is missing
and the tests run as root, the fixture installs it with apt-get.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cifar10_cnn.images import load_image
from cifar10_cnn.predict import load_predictor
from tests.conftest import DATA_DIR, error_line, free_port, run_cli

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path


def start_server(model: Path, log: Path, *args: str, timeout: float = 180) -> Server:
    """`cifar10 serve MODEL --port P` in a subprocess, once /health answers."""
    port = free_port()
    env = {**os.environ, "CIFAR10_DATA": str(DATA_DIR), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cifar10_cnn",
                "serve",
                str(model),
                "--port",
                str(port),
                *args,
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the server did not answer /health in {timeout} s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory) -> Iterator[Server]:
    s = start_server(trained_run, tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    stop_server(s)
    assert s.proc.returncode is not None
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def cat_png(cifar) -> bytes:
    return png(cifar.test_images[0])  # a cat, CIFAR-10 test image 0


# --- the API ---------------------------------------------------------------------------------------------------


def test_health_model_and_docs(client, server):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "torch"
    model = client.get("/model").json()
    assert model["architecture"] == "seed_cnn" and model["params"] == 1_147_466
    assert model["classes"][0] == "airplane" and len(model["classes"]) == 10
    assert 0 <= model["test_accuracy"] <= 1 and model["limits"]["max_upload_mb"] == 10
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text  # no CDN
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert (
        page.status_code == 200 and "drop" in page.text.lower() and "http" not in page.text.split("<body>")[0]
    )
    assert "http://127.0.0.1:" in server.log.read_text()  # binds to localhost unless --host says otherwise


def test_predict_one_and_several_files(client, trained_run, cifar, cat_png):
    r = client.post("/predict", files={"file": ("cat.png", cat_png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["architecture"] == "seed_cnn" and len(body["model"]["version"]) == 12
    (result,) = body["results"]
    assert result["filename"] == "cat.png" and len(result["predictions"]) == 5
    probs = [p["probability"] for p in result["predictions"]]
    assert probs == sorted(probs, reverse=True)
    predictor = load_predictor(trained_run)
    want = predictor.top_k(cifar.test_images[:1], 5)[0]
    assert [p["class"] for p in result["predictions"]] == [c for c, _ in want]
    assert np.allclose(probs, [p for _, p in want], atol=1e-5)

    files = [("files", (f"img{i}.png", png(cifar.test_images[i], 64), "image/png")) for i in range(5)]
    r = client.post("/predict", params={"top_k": 10, "include_input": "true"}, files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [f"img{i}.png" for i in range(5)]
    assert all(len(x["predictions"]) == 10 for x in results)
    assert all(abs(sum(p["probability"] for p in x["predictions"]) - 1) < 1e-4 for x in results)
    seen = base64.b64decode(results[2]["input"].split(",", 1)[1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(seen))), load_image(png(cifar.test_images[2], 64)))


def test_bad_inputs_are_4xx_with_a_json_message(client, cifar, cat_png):
    def post(files, **kw) -> httpx.Response:
        return client.post("/predict", files=files, **kw)

    big = Image.fromarray(cifar.test_images[0]).resize((200, 200))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    from tests.test_predict import png_header_only

    cases = {
        "not an image": (post({"file": ("notes.txt", b"hello, not an image\n" * 20, "text/plain")}), 415),
        "empty file": (post({"file": ("empty.png", b"", "image/png")}), 400),
        "truncated": (post({"file": ("half.png", truncated, "image/png")}), 422),
        "bomb": (post({"file": ("bomb.png", png_header_only(200_000, 200_000), "image/png")}), 413),
        "over 10 MB": (post({"file": ("huge.png", os.urandom(10 * 2**20 + 1), "image/png")}), 413),
        "too many files": (post([("file", (f"{i}.png", cat_png, "image/png")) for i in range(17)]), 413),
        "no file": (client.post("/predict"), 400),
        "a form without files": (client.post("/predict", data={"x": "1"}), 400),
        "json": (client.post("/predict", json={"image": "cat"}), 400),
        "broken multipart": (
            client.post(
                "/predict",
                content=b"--xx\r\nrubbish",
                headers={"content-type": "multipart/form-data; boundary=xx"},
            ),
            400,
        ),
        "top_k 0": (post({"file": ("cat.png", cat_png)}, params={"top_k": 0}), 422),
        "top_k 11": (post({"file": ("cat.png", cat_png)}, params={"top_k": 11}), 422),
        "GET": (client.get("/predict"), 405),
        "unknown path": (client.get("/nothing-here"), 404),
    }
    for name, (r, status) in cases.items():
        assert r.status_code == status, (name, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail, name
    assert "notes.txt" in cases["not an image"][0].json()["detail"]
    assert "10 MB" in cases["over 10 MB"][0].json()["detail"]
    assert "at most 16" in cases["too many files"][0].json()["detail"]
    # one bad file among good ones refuses the request, naming the file
    r = post([("file", ("good.png", cat_png)), ("file", ("bad.gif", b"GIF89a broken"))])
    assert r.status_code in (415, 422) and "bad.gif" in r.json()["detail"]
    assert client.get("/health").status_code == 200  # still alive


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


def test_concurrent_requests_are_all_served_each_with_its_own_answer(client, server, cifar, trained_run):
    images = cifar.test_images[:48]
    bodies = [png(image) for image in images]
    before = client.get("/model").json()["stats"]

    def one(i: int) -> tuple[int, str]:
        r = httpx.post(
            f"{server.url}/predict", files={"file": (f"{i}.png", bodies[i])}, params={"top_k": 1}, timeout=60
        )
        return r.status_code, r.json()["results"][0]["predictions"][0]["class"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(len(bodies))))
    assert all(status == 200 for status, _ in answers)
    expected = [top[0][0] for top in load_predictor(trained_run).top_k(images, 1)]
    assert [c for _, c in answers] == expected  # batched together, answered apart
    after = client.get("/model").json()["stats"]
    assert after["images"] - before["images"] == len(bodies)


def test_health_answers_while_large_uploads_are_decoded(server, client):
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=1)
    heavy = buf.getvalue()  # about 6.8 MB: 2.25 megapixels to decode per request
    done = threading.Event()

    def flood() -> None:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(
                    lambda _: (
                        httpx.post(
                            f"{server.url}/predict", files={"file": ("big.png", heavy)}, timeout=120
                        ).status_code
                    ),
                    range(8),
                )
            )
        assert statuses == [200] * 8
        done.set()

    t = threading.Thread(target=flood)
    t.start()
    latencies = []
    while not done.is_set() and len(latencies) < 20:
        t0 = time.perf_counter()
        assert client.get("/health").status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    t.join()
    assert done.is_set() and max(latencies) < 2.0, latencies


def test_the_batcher_runs_waiting_requests_as_one_batch():
    from cifar10_cnn.serve import Batcher

    class SlowPredictor:
        def __init__(self) -> None:
            self.batch_sizes: list[int] = []
            self.gate = threading.Event()

        def probabilities(self, images: np.ndarray) -> np.ndarray:
            self.gate.wait(10)
            self.batch_sizes.append(len(images))
            return np.tile(images[:, 0, 0, :1].astype(np.float32), (1, 10))

    predictor = SlowPredictor()
    batcher = Batcher(predictor, max_batch=64)  # type: ignore[arg-type]
    batcher.start()

    async def main() -> list[np.ndarray]:
        first = asyncio.ensure_future(batcher.probabilities(np.zeros((1, 32, 32, 3), np.uint8)))
        await asyncio.sleep(0.2)  # the first request is in the model; the next seven queue up behind it
        rest = [
            asyncio.ensure_future(batcher.probabilities(np.full((1, 32, 32, 3), i, np.uint8)))
            for i in range(1, 8)
        ]
        await asyncio.sleep(0.1)
        predictor.gate.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(main())
    batcher.stop()
    assert predictor.batch_sizes == [1, 7]
    assert [int(r[0, 0]) for r in results] == list(range(8))  # each request gets its own rows back


def test_the_onnx_backend_serves_the_same_answers(trained_run, tmp_path, cat_png, client):
    onnx = tmp_path / "model.onnx"
    run_cli("export", str(trained_run), "--format", "onnx", "--out", str(onnx))
    s = start_server(onnx, tmp_path / "onnx.log", "--backend", "onnx")
    try:
        r = httpx.post(
            f"{s.url}/predict", files={"file": ("cat.png", cat_png)}, params={"top_k": 10}, timeout=60
        )
        assert r.status_code == 200 and r.json()["backend"] == "onnx"
        assert httpx.get(f"{s.url}/model").json()["params"] == 1_147_466
        bad = httpx.post(f"{s.url}/predict", files={"file": ("x.png", b"nope")}, timeout=60)
        assert bad.status_code == 415
        refused = httpx.post(
            f"{s.url}/predict", files={"file": ("cat.png", cat_png)}, params={"explain": "true"}, timeout=60
        )
        assert refused.status_code == 422 and "need the torch backend" in refused.json()["detail"], (
            refused.text
        )
        assert httpx.get(f"{s.url}/model").json()["explain"]["available"] is False
    finally:
        stop_server(s)
    torch_answer = client.post("/predict", files={"file": ("cat.png", cat_png)}, params={"top_k": 10}).json()
    a, b = r.json()["results"][0]["predictions"], torch_answer["results"][0]["predictions"]
    assert [p["class"] for p in a] == [p["class"] for p in b]
    assert np.allclose([p["probability"] for p in a], [p["probability"] for p in b], atol=1e-4)


def test_serve_cli_errors_are_one_line(tmp_path, trained_run):
    assert "does not exist" in error_line(run_cli("serve", str(tmp_path / "missing"), check=False))
    proc = run_cli("serve", str(trained_run), "--max-files", "0", check=False)
    assert "must be positive" in error_line(proc)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = run_cli("serve", str(trained_run), "--port", str(busy.getsockname()[1]), check=False)
    assert "cannot listen on 127.0.0.1" in error_line(proc)


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


# --- explanations -----------------------------------------------------------------------------------------------


def data_url_image(url: str) -> np.ndarray:
    """The RGB pixels of a PNG data URL (and that it is one)."""
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64", head
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img)


def test_explain_returns_a_heatmap_per_image_bounded_and_counted(client, trained_run, cifar, cat_png):
    from cifar10_cnn.explain import explain, overlay

    before = scrape(client)
    files = [("file", ("cat.png", cat_png)), ("file", ("ship.png", png(cifar.test_images[1], 64)))]
    r = client.post("/predict", params={"explain": "true", "top_k": 3}, files=files)
    assert r.status_code == 200, r.text
    maps = []
    for result in r.json()["results"]:
        explanation = result["explanation"]
        assert explanation["class"] == result["predictions"][0]["class"]  # default: the predicted class
        assert explanation["method"] == "gradcam"
        maps.append(data_url_image(explanation["png"]))
        assert maps[-1].shape == (128, 128, 3)
    # the server's overlay is the explain module's map of the image it decoded, with the served model
    model, classes = load_predictor(trained_run).model, client.get("/model").json()["classes"]
    predicted = classes.index(r.json()["results"][0]["predictions"][0]["class"])
    mine = overlay(cifar.test_images[0], explain(model, cifar.test_images[:1], target=predicted)[0], size=128)
    diff = np.abs(mine.astype(int) - maps[0])  # float rounding apart (memory layout, threads)
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())

    other = classes[(predicted + 5) % 10]  # another class: another map of the same image
    by_name = client.post("/predict", params={"explain_class": other}, files={"file": ("cat.png", cat_png)})
    by_index = client.post(
        "/predict",
        params={"explain": "1", "explain_class": classes.index(other)},
        files={"file": ("c.png", cat_png)},
    )
    assert by_name.status_code == by_index.status_code == 200, by_name.text
    named, indexed = (x.json()["results"][0]["explanation"] for x in (by_name, by_index))
    assert named["class"] == indexed["class"] == other and named["png"] == indexed["png"]
    assert np.abs(data_url_image(named["png"]).astype(int) - maps[0]).mean() > 3

    refused = {
        "at most 4 images": client.post(
            "/predict", params={"explain": "true"}, files=[("f", ("c.png", cat_png))] * 5
        ),
        "unknown class 'unicorn'": client.post(
            "/predict", params={"explain_class": "unicorn"}, files={"file": ("cat.png", cat_png)}
        ),
    }
    for words, answer in refused.items():
        assert answer.status_code == 422 and words in answer.json()["detail"], answer.text
    plain = client.post("/predict", files={"file": ("cat.png", cat_png)}).json()["results"][0]
    assert "explanation" not in plain
    model_info = client.get("/model").json()
    assert model_info["explain"] == {"available": True, "method": "gradcam"}
    assert model_info["limits"]["max_explain_images"] == 4

    after = scrape(client)
    assert after[("cifar10_explanations_total", ())] - before.get(("cifar10_explanations_total", ()), 0) == 4
    count = ("cifar10_explanation_duration_seconds_count", ())
    assert (
        after[count] - before.get(count, 0) == 3
    )  # one observation per explained request; warm-up not counted


# --- operating the service: metrics, readiness, request logs ---------------------------------------------------


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by Prometheus' own text-format parser: {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_the_requests_sent(client, cifar, cat_png):
    from tests.test_predict import png_header_only

    before = scrape(client)
    good = [[cat_png], [png(cifar.test_images[1]), png(cifar.test_images[2], 64)], [cat_png]]
    bad = {
        "not_an_image": [[b"hello, not an image\n"], [b"GIF89a broken"]],
        "empty": [[b""]],
        "too_many_pixels": [[png_header_only(200_000, 200_000)]],
        "too_many_files": [[cat_png] * 17],
        "too_large": [[os.urandom(10 * 2**20 + 1)]],
    }
    statuses = {"200": 0, "415": 0, "400": 0, "413": 0}
    for files in good + [files for cases in bad.values() for files in cases]:
        r = client.post("/predict", files=[("file", (f"{i}.png", f)) for i, f in enumerate(files)])
        statuses[str(r.status_code)] += 1
    assert statuses == {"200": 3, "415": 2, "400": 1, "413": 3}
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    for status, n in statuses.items():
        assert delta("cifar10_requests_total", route="/predict", status=status) == n, status
    for reason, cases in bad.items():
        assert delta("cifar10_images_refused_total", reason=reason) == len(cases), reason
    assert delta("cifar10_images_decoded_total") == 4
    assert delta("cifar10_model_batch_size_sum") == 4 and delta("cifar10_model_batch_size_count") == 3
    assert delta("cifar10_request_duration_seconds_count", route="/predict") == 9
    assert delta("cifar10_request_duration_seconds_bucket", route="/predict", le="+Inf") == 9
    assert delta("cifar10_requests_total", route="/metrics", status="200") == 1  # the scrape before
    assert after[("cifar10_requests_in_flight", ())] == 1  # the scrape itself
    assert after[("cifar10_inference_queue_requests", ())] == 0
    model = client.get("/model").json()
    info = {k: v for (name, labels), _ in after.items() if name == "cifar10_model_info" for k, v in labels}
    assert info == {
        "name": model["name"],
        "version": model["version"],
        "architecture": "seed_cnn",
        "backend": "torch",
    }


def test_ready_shows_the_limits_printed_at_start(client, server):
    from cifar10_cnn.serve import limits_line

    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    limits = r.json()["limits"]
    assert limits["max_upload_mb"] == 10 and limits["max_files"] == 16 and limits["body_timeout_s"] == 60
    assert limits["decode_threads"] >= 1 and limits["graceful_shutdown_timeout_s"] > 0
    assert limits_line(limits) in server.log.read_text().splitlines()  # the same limits, one line at start


def test_each_request_logs_one_json_line_with_its_id(client, server, cat_png):
    ids = []
    for header in ("trace-42.a:b_C", "bad id <script>", "x" * 65, None):
        r = client.post(
            "/predict",
            files=[("file", ("cat.png", cat_png)), ("file", ("cat2.png", cat_png))],
            headers={"X-Request-ID": header} if header else {},
        )
        assert r.status_code == 200
        ids.append(r.headers["x-request-id"])
    assert ids[0] == "trace-42.a:b_C"  # a valid id is kept; an unsafe or over-long one replaced
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids[1:]) and len(set(ids)) == 4
    refused = client.get("/nothing-here", headers={"X-Request-ID": "req-404"})
    assert refused.status_code == 404 and refused.headers["x-request-id"] == "req-404"
    time.sleep(0.2)
    lines = [json.loads(ln) for ln in server.log.read_text().splitlines() if ln.startswith("{")]
    by_id = {line["request_id"]: line for line in lines}
    version = client.get("/model").json()["version"]
    for rid in ids:
        line = by_id[rid]
        assert set(line) == {
            "time",
            "request_id",
            "method",
            "route",
            "status",
            "latency_ms",
            "images",
            "model_version",
        }
        assert (line["method"], line["route"], line["status"], line["images"]) == ("POST", "/predict", 200, 2)
        assert line["model_version"] == version and 0 < line["latency_ms"] < 60_000
        assert line["time"].endswith("+00:00")
    assert (by_id["req-404"]["route"], by_id["req-404"]["status"]) == ("unmatched", 404)
    assert "Traceback" not in server.log.read_text()  # after every refusal above and in the other tests


def test_ready_waits_for_the_probe_and_a_server_error_is_one_line(trained_run, caplog):
    """In this process, on 127.0.0.1: uvicorn without the lifespan, so that the probe runs when the test says."""
    import uvicorn

    from cifar10_cnn.serve import create_app

    app = create_app(trained_run, data_dir=DATA_DIR)

    @app.get("/fail")  # a handler with a bug, to see how the service reports a 5xx
    async def fail() -> None:
        raise RuntimeError("a bug, with details the client must not see")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, lifespan="off", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url, service = f"http://127.0.0.1:{port}", app.state.service
    try:
        while not server.started:
            time.sleep(0.05)
        r = httpx.get(f"{url}/ready")
        assert (
            r.status_code == 503
            and r.json()["status"] == "not ready"
            and r.json()["limits"]["max_files"] == 16
        )
        service.batcher.start()
        assert httpx.get(f"{url}/ready").status_code == 503  # alive, but the probe has not passed
        asyncio.run(service.warm_up())
        assert httpx.get(f"{url}/ready").status_code == 200

        caplog.set_level(logging.INFO, logger="cifar10_cnn.serve")
        r = httpx.get(f"{url}/fail", headers={"X-Request-ID": "boom-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
        assert r.json()["detail"] == "internal server error (RuntimeError); request id boom-1"
        for _ in range(50):  # the line is written once the response is sent
            records = [x for x in caplog.records if x.name == "cifar10_cnn.serve"]
            if records:
                break
            time.sleep(0.1)
        time.sleep(0.1)
        (record,) = [x for x in caplog.records if x.name == "cifar10_cnn.serve"]
        line = json.loads(record.getMessage())
        assert record.levelno == logging.ERROR and record.exc_info is None  # no traceback at info level
        assert (line["request_id"], line["status"], line["error"]) == ("boom-1", 500, "RuntimeError")
    finally:
        server.should_exit = True
        thread.join(10)
        service.batcher.stop()


# --- the page, in a real browser ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; installed with apt-get when missing and the tests run as root."""
    if not Path(CHROMIUM).is_file() and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=900)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env, timeout=1800)
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: apt-get install chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_the_page_classifies_an_uploaded_image(browser, server, client, cifar, tmp_path):
    image = tmp_path / "test-image-0.png"
    image.write_bytes(png(cifar.test_images[0]))
    expected = client.post("/predict", files={"file": ("x.png", image.read_bytes())}).json()["results"][0]
    page = browser.new_page(viewport={"width": 900, "height": 900})
    console_errors: list[str] = []
    # the browser logs every 4xx answer as a console error; the refused text file below is one, on purpose
    page.on(
        "console",
        lambda m: (
            console_errors.append(m.text) if m.type == "error" and "status of 415" not in m.text else None
        ),
    )
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    external: list[str] = []
    page.on(
        "request",
        lambda r: external.append(r.url) if not r.url.startswith((server.url, "data:", "blob:")) else None,
    )
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('seed_cnn')")
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector(".card[data-state=done] .top-class", timeout=30_000)
    card = page.locator(".card").first
    assert card.locator(".top-class").inner_text().lower() == expected["predictions"][0]["class"]
    assert card.locator(".bar-row").count() == 5
    assert card.locator(".bar-row .label").first.inner_text() == expected["predictions"][0]["class"]
    assert card.locator(".seen").is_visible()  # the 32x32 input is shown

    # drag and drop a second image, and a file that is not an image
    drop = page.evaluate_handle(
        """([b64, name]) => { const dt = new DataTransfer();
             const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             dt.items.add(new File([bytes], name, {type: 'image/png'})); return dt; }""",
        [base64.b64encode(png(cifar.test_images[1], 128)).decode(), "ship.png"],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
    page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 2")
    junk = page.evaluate_handle(
        """() => { const dt = new DataTransfer(); dt.items.add(new File(['hello'], 'notes.txt', {type: 'text/plain'}));
             return dt; }"""
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": junk})
    page.wait_for_selector(".card[data-state=error]")
    assert "not an image" in page.locator(".card[data-state=error] .status").inner_text()
    shot = Path(os.environ.get("CIFAR10_SCREENSHOT_DIR", tmp_path)) / "serve-page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not console_errors, console_errors
    assert not external, external  # nothing from outside the server: no CDN
    page.close()


def test_the_page_shows_a_heatmap_and_another_class_on_demand(browser, server, client, cifar, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(png(cifar.test_images[0]))
    page = browser.new_page(viewport={"width": 900, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('seed_cnn')")
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector(".card[data-state=done] .heatmap[data-state=done] .heatmap-img", timeout=60_000)
    card = page.locator(".card").first
    heat = card.locator(".heatmap-img")
    assert heat.is_visible()
    predicted = card.locator(".top-class").inner_text().lower()
    first = heat.get_attribute("src")
    assert heat.get_attribute("data-class") == predicted == card.locator(".explain-class").input_value()
    assert data_url_image(first).shape == (128, 128, 3)

    def shows(cls: str) -> str:
        page.wait_for_function(
            "c => { const f = document.querySelector('.card .heatmap');"
            " return f.dataset.state === 'done' && f.querySelector('.heatmap-img').dataset.class === c; }",
            arg=cls,
            timeout=60_000,
        )
        return heat.get_attribute("src")

    second = card.locator(".bar-row").nth(1)  # click the runner-up's bar
    runner_up = second.get_attribute("data-class")
    second.click()
    clicked = shows(runner_up)
    assert clicked != first and "explained" in (second.get_attribute("class") or "")
    api = client.post(
        "/predict", params={"explain_class": runner_up}, files={"file": ("cat.png", image.read_bytes())}
    )
    assert clicked == api.json()["results"][0]["explanation"]["png"]  # the map of that class, for this image
    last = next(c for c in ("truck", "frog") if c not in (predicted, runner_up))
    card.locator(".explain-class").select_option(last)  # any class, from the menu
    assert shows(last) not in (first, clicked)
    assert not errors, errors
    page.close()


def test_the_api_docs_render_offline(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "cifar10-cnn" in page.locator(".swagger-ui .info .title").inner_text()
    assert page.locator(".opblock-summary-path", has_text="/predict").count() == 1
    page.close()


# --- hardening: options, broken models, connection timeouts ---------------------------------------------------


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


@pytest.fixture(scope="module")
def strict_server(trained_run, tmp_path_factory) -> Iterator[Server]:
    """The server with short timeouts (1 s for headers, 2 s for a body, 1 s of keep-alive), 3 connections."""
    port = free_port()
    log = tmp_path_factory.mktemp("strict") / "server.log"
    code = (
        "import sys; from cifar10_cnn.serve import serve; "
        "serve(sys.argv[1], port=int(sys.argv[2]), access_log=False, header_timeout=1, body_timeout=2, keep_alive=1, "
        "max_connections=3)"
    )
    env = {**os.environ, "CIFAR10_DATA": str(DATA_DIR), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(trained_run), str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.3)
    s = Server(url, proc, log)
    yield s
    stop_server(s)


def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return time.monotonic() - t0, data


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)


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
