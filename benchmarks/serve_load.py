"""Load test of `cifar10 serve`: many concurrent clients posting single images, for each backend.

    python benchmarks/serve_load.py                                   # the fast net, 16 clients, 10 s per backend
    python benchmarks/serve_load.py --model runs/<run> --clients 32 --seconds 20 --backends onnx

For each backend it starts the real server (uvicorn on 127.0.0.1, a free port), waits for /health, and runs
the clients in another process: each client is a thread with a keep-alive connection that posts one image
(a CIFAR-10 test image as PNG, or --image) to /predict as fast as the answers come, for a bounded time.
It prints requests/s, p50/p95/p99/max latency, the error count (anything but 200 counts) and the mean batch
the server's inference thread ran. The ONNX backend serves the `cifar10 export --format onnx` of the model.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def multipart(image: bytes, name: str = "image.png") -> tuple[bytes, str]:
    boundary = "cifar10loadtestboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def run_clients(url: str, image: Path, clients: int, seconds: float) -> dict:
    """The client process: `clients` threads posting for `seconds`; latencies in ms and the error count."""
    host, port = url.removeprefix("http://").split(":")
    body, content_type = multipart(image.read_bytes(), image.name)
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict?top_k=3", body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200 and b'"predictions"' in payload
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            latencies[i].append((time.perf_counter() - t0) * 1000)
            errors[i] += not ok
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.array([x for per in latencies for x in per])
    return {
        "requests": len(lat),
        "seconds": elapsed,
        "rps": len(lat) / elapsed,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p95": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "max": float(lat.max()) if len(lat) else float("nan"),
        "errors": sum(errors),
    }


def start_server(model: Path, backend: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cifar10_cnn",
        "serve",
        str(model),
        "--port",
        str(port),
        "--backend",
        backend,
    ]
    cmd += ["--no-access-log", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}:\n{log.read_text()}")
        try:
            get_json(url + "/health")
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def prepare_model(spec: str, work: Path) -> Path:
    """A run directory or weights file as given, or a registered architecture with fresh weights."""
    if Path(spec).exists():
        return Path(spec)
    import torch

    from cifar10_cnn.models import create_model
    from cifar10_cnn.weights import save_weights

    torch.manual_seed(0)
    path = work / f"{spec}.safetensors"
    save_weights(create_model(spec).eval(), path, architecture=spec)  # speed does not depend on the weights
    return path


def test_image(spec: str | None, work: Path, data_dir: str | None) -> Path:
    if spec:
        return Path(spec)
    from PIL import Image

    from cifar10_cnn.export import verification_images

    images, _ = verification_images(data_dir, required=False, n=1)
    path = work / "test-image.png"
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="airbench", help="run dir, .safetensors, or an architecture name (airbench)"
    )
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="per backend")
    ap.add_argument("--image", help="the image every request posts (default: CIFAR-10 test image 0 as PNG)")
    ap.add_argument("--data-dir", help="CIFAR-10 (default $CIFAR10_DATA, else ./data)")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the clients against this URL
    args = ap.parse_args()
    if args.client:
        print(json.dumps(run_clients(args.client, Path(args.image), args.clients, args.seconds)))
        return

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        model = prepare_model(args.model, work)
        image = test_image(args.image, work, args.data_dir)
        print(
            f"{args.clients} concurrent clients x {args.seconds:g} s per backend, single-image requests "
            f"({image.stat().st_size:,} bytes), model {args.model}, {os.cpu_count()} CPUs shared by server and clients"
        )
        print(
            f"\n{'backend':<8}{'requests':>9}{'req/s':>8}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'max ms':>8}{'errors':>8}{'batch':>7}"
        )
        for backend in args.backends:
            served = model
            if backend == "onnx":
                from cifar10_cnn.export import export_model

                served = work / "model.onnx"
                export_model(model, served, "onnx", data_dir=args.data_dir, images=None if args.data_dir else
                             np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), force=True)  # fmt: skip
            proc, url = start_server(served, backend, work / f"{backend}.log")
            try:
                client_cmd = [sys.executable, __file__, "--client", url, "--image", str(image)]
                warm = subprocess.run(
                    [*client_cmd, "--clients", "2", "--seconds", "1"], capture_output=True, text=True
                )
                if warm.returncode != 0:
                    raise SystemExit(warm.stderr)
                before = get_json(url + "/model")["stats"]
                out = subprocess.run(
                    [*client_cmd, "--clients", str(args.clients), "--seconds", str(args.seconds)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                after = get_json(url + "/model")["stats"]
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            r = json.loads(out.stdout)
            batches = max(1, after["batches"] - before["batches"])
            batch = (after["images"] - before["images"]) / batches
            print(
                f"{backend:<8}{r['requests']:>9}{r['rps']:>8.0f}{r['p50']:>8.1f}{r['p95']:>8.1f}{r['p99']:>8.1f}"
                f"{r['max']:>8.1f}{r['errors']:>8}{batch:>7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
