"""Load test of `cifar10 serve`: many concurrent clients posting single images, for each backend.

    python benchmarks/serve_load.py                                   # the fast net, 16 clients, 10 s per backend
    python benchmarks/serve_load.py --model runs/<run> --clients 32 --seconds 20 --backends onnx

For each backend it starts the real server (uvicorn on 127.0.0.1, a free port), waits for /health, and runs
the clients in another process: each client is a thread with a keep-alive connection that posts one image
(a CIFAR-10 test image as PNG, or --image) to /predict as fast as the answers come, for a bounded time.
It prints requests/s, p50/p95/p99/max latency, the error count (anything but 200 counts) and the mean batch
the server's inference thread ran. The ONNX backend serves the `cifar10 export --format onnx` of the model.

With --hostile N (default 2) each backend is measured twice: quiet, then with N more clients posting a
decode-heavy upload (a 7745x7745 16-bit grey PNG of about 120 KB: 60 megapixels to decode) beside the normal
ones. Latencies are those of the normal requests; the last line gives the ratio of the p99s and the server's
peak RSS (VmHWM). At the end of each backend it prints the server's own view, scraped from /metrics: the
/predict requests it answered and the bucket its p99 latency falls in. --access-log keeps the JSON line per
request on (to a file), to measure what it costs.

With --explain-share F (e.g. 0.2) a share F of the normal requests asks for explain=true (a Grad-CAM overlay;
torch backend only), chosen at random per request with a fixed seed per client; a last line per mix gives
p50/p99 of the plain requests and of the explain requests apart.

    python benchmarks/serve_load.py --backends torch --hostile 0 --explain-share 0.2 --clients 8 --seconds 10
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


def run_clients(
    url: str,
    image: Path,
    clients: int,
    seconds: float,
    hostile: Path | None = None,
    n_hostile: int = 0,
    explain_share: float = 0.0,
) -> dict:
    """The client process: `clients` threads posting image (and n_hostile threads posting hostile) for `seconds`.

    Latencies (ms) and errors are those of the normal clients; the hostile ones only count their requests. A
    share explain_share of the normal requests asks for explain=true; their latencies are also reported apart.
    """
    host, port = url.removeprefix("http://").split(":")
    bodies = [multipart(image.read_bytes(), image.name)] * clients
    if hostile is not None:
        bodies += [multipart(hostile.read_bytes(), hostile.name)] * n_hostile
    latencies: list[list[float]] = [[] for _ in bodies]
    errors = [0] * len(bodies)
    explained: list[list[bool]] = [[] for _ in bodies]
    start = threading.Barrier(len(bodies) + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        body, content_type = bodies[i]
        headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        rng = np.random.default_rng(i)
        start.wait()
        while time.perf_counter() < stop_at[0]:
            explain = i < clients and rng.random() < explain_share
            t0 = time.perf_counter()
            try:
                conn.request(
                    "POST", "/predict?top_k=3" + "&explain=true" * explain, body=body, headers=headers
                )
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200 and b'"predictions"' in payload
                ok = ok and (not explain or b'"explanation"' in payload)
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
            latencies[i].append((time.perf_counter() - t0) * 1000)
            explained[i].append(explain)
            errors[i] += not ok
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.array([x for per in latencies[:clients] for x in per])
    asked = np.array([x for per in explained[:clients] for x in per], bool)
    split = {
        f"{kind}_{stat}": float(np.percentile(part, q)) if len(part) else float("nan")
        for kind, part in (("plain", lat[~asked]), ("explain", lat[asked]))
        for stat, q in (("p50", 50), ("p99", 99))
    }
    return {
        **split,
        "plain_requests": int((~asked).sum()),
        "explain_requests": int(asked.sum()),
        "requests": len(lat),
        "seconds": elapsed,
        "rps": len(lat) / elapsed,
        **{f"p{q}": float(np.percentile(lat, q)) if len(lat) else float("nan") for q in (50, 95, 99)},
        "max": float(lat.max()) if len(lat) else float("nan"),
        "errors": sum(errors[:clients]),
        "hostile_requests": sum(len(per) for per in latencies[clients:]),
        "hostile_ok": sum(len(per) for per in latencies[clients:]) - sum(errors[clients:]),
    }


def hostile_image(work: Path) -> Path:
    """A decode-heavy upload: 7745x7745 16-bit grey (60 megapixels, under the cap), about 120 KB as PNG."""
    from PIL import Image

    a = np.zeros((7745, 7745), np.uint16)
    a[::97, ::89] = 65535
    path = work / "hostile-16bit.png"
    Image.fromarray(a).save(path, format="PNG", optimize=True)
    return path


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server_view(url: str) -> str:
    """The server's /metrics: /predict requests by status, and the latency bucket holding its p99."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    samples = [s for f in families for s in f.samples if s.labels.get("route") == "/predict"]
    counts = {s.labels["status"]: int(s.value) for s in samples if s.name == "cifar10_requests_total"}
    buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")]
    total = max((v for _, v in buckets), default=0)
    p99 = next((le for le, v in sorted(buckets) if v >= 0.99 * total), float("nan"))
    return f"server view: /predict answered {counts}, p99 <= {p99 * 1000:g} ms (histogram bucket)"


def start_server(
    model: Path, backend: str, log: Path, access_log: bool = False
) -> tuple[subprocess.Popen, str]:
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
    cmd += ["--log-level", "info"] if access_log else ["--no-access-log", "--log-level", "warning"]
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


def measure(client_cmd: list[str], url: str, clients: int, seconds: float, extra: list[str]) -> dict:
    before = get_json(url + "/model")["stats"]
    out = subprocess.run(
        [*client_cmd, "--clients", str(clients), "--seconds", str(seconds), *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    after = get_json(url + "/model")["stats"]
    r = json.loads(out.stdout)
    r["batch"] = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
    return r


def split_row(r: dict) -> str:
    return (
        f"{'':<8}plain {r['plain_requests']} requests p50 {r['plain_p50']:.1f} ms p99 {r['plain_p99']:.1f} ms | "
        f"explain=true {r['explain_requests']} requests p50 {r['explain_p50']:.1f} ms p99 {r['explain_p99']:.1f} ms"
    )


def row(backend: str, mix: str, r: dict) -> str:
    return (
        f"{backend:<8}{mix:<9}{r['requests']:>9}{r['rps']:>8.0f}{r['p50']:>8.1f}{r['p95']:>8.1f}{r['p99']:>8.1f}"
        f"{r['max']:>8.1f}{r['errors']:>8}{r['batch']:>7.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="airbench", help="run dir, .safetensors, or an architecture name (airbench)"
    )
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="per backend and mix")
    ap.add_argument("--hostile", type=int, default=2, help="clients posting decode-heavy uploads (0: none)")
    ap.add_argument("--image", help="the image every request posts (default: CIFAR-10 test image 0 as PNG)")
    ap.add_argument("--data-dir", help="CIFAR-10 (default $CIFAR10_DATA, else ./data)")
    ap.add_argument("--access-log", action="store_true", help="keep the JSON line per request on (to a file)")
    ap.add_argument(
        "--explain-share", type=float, default=0.0, help="share of requests with explain=true (torch backend)"
    )
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the clients against this URL
    ap.add_argument("--hostile-image", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        hostile = Path(args.hostile_image) if args.hostile_image else None
        print(
            json.dumps(
                run_clients(
                    args.client,
                    Path(args.image),
                    args.clients,
                    args.seconds,
                    hostile,
                    args.hostile,
                    args.explain_share,
                )
            )
        )
        return
    if not 0 <= args.explain_share <= 1:
        ap.error(f"--explain-share {args.explain_share}: give a share from 0 to 1")
    if args.explain_share and "onnx" in args.backends:
        ap.error("--explain-share needs --backends torch: the onnx backend does not explain")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        model = prepare_model(args.model, work)
        image = test_image(args.image, work, args.data_dir)
        bomb = hostile_image(work) if args.hostile else None
        print(
            f"{args.clients} concurrent clients x {args.seconds:g} s per backend, single-image requests "
            f"({args.explain_share:.0%} with explain=true) "
            f"({image.stat().st_size:,} bytes), model {args.model}, {os.cpu_count()} CPUs shared by server and clients"
        )
        if bomb:
            print(
                f"hostile mix: {args.hostile} more clients posting a 7745x7745 16-bit PNG ({bomb.stat().st_size:,} bytes)"
            )
        print(
            f"\n{'backend':<8}{'mix':<9}{'requests':>9}{'req/s':>8}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'max ms':>8}{'errors':>8}{'batch':>7}"
        )
        for backend in args.backends:
            served = model
            if backend == "onnx":
                from cifar10_cnn.export import export_model

                served = work / "model.onnx"
                export_model(model, served, "onnx", data_dir=args.data_dir, images=None if args.data_dir else
                             np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), force=True)  # fmt: skip
            proc, url = start_server(served, backend, work / f"{backend}.log", args.access_log)
            try:
                client_cmd = [sys.executable, __file__, "--client", url, "--image", str(image)]
                warm = subprocess.run(
                    [*client_cmd, "--clients", "2", "--seconds", "1"], capture_output=True, text=True
                )
                if warm.returncode != 0:
                    raise SystemExit(warm.stderr)
                share = ["--explain-share", str(args.explain_share)]
                quiet = measure(client_cmd, url, args.clients, args.seconds, share)
                print(row(backend, "quiet", quiet), flush=True)
                if args.explain_share:
                    print(split_row(quiet), flush=True)
                if bomb:
                    extra = ["--hostile", str(args.hostile), "--hostile-image", str(bomb), *share]
                    loud = measure(client_cmd, url, args.clients, args.seconds, extra)
                    print(row(backend, "hostile", loud), flush=True)
                    if args.explain_share:
                        print(split_row(loud), flush=True)
                    print(
                        f"{'':<8}p99 hostile/quiet {loud['p99'] / quiet['p99']:.2f}x, {loud['hostile_ok']} of "
                        f"{loud['hostile_requests']} hostile uploads answered, server peak RSS {peak_rss_mb(proc.pid):.0f} MB",
                        flush=True,
                    )
                print(f"{'':<8}{server_view(url)}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
