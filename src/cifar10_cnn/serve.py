"""The web service: FastAPI + uvicorn, a JSON API for predictions and a small page to try the model.

    POST /predict   multipart files (any field name) -> top-k classes of each image, and the model's identity;
                    with explain=true (or explain_class=NAME_OR_INDEX) also a Grad-CAM overlay of each image
    GET  /model     architecture, params, test accuracy, classes, temperature, limits
    GET  /health    liveness
    GET  /ready     readiness (model loaded, a probe inference passed; 503 until then) and the limits
    GET  /metrics   Prometheus text format: requests, latencies, batch sizes, images decoded and refused, ...
    GET  /          the page (static/index.html): drop an image, see the top classes as bars
    GET  /docs      OpenAPI docs

Uploads are decoded in threads, the memory of the decodes in flight bounded by a DecodeBudget (small images
have a lane of their own, so a large upload does not hold them up); inference runs in one thread that takes
every request waiting at that moment as one batch, so many small requests share model calls instead of
queueing one by one, and a lone request never waits for company. Every bad upload is a 4xx with
{"detail": "..."}. Connections are bounded in time: request headers must arrive within HEADER_TIMEOUT s,
a body within BODY_TIMEOUT s, and an idle keep-alive connection is closed after KEEP_ALIVE s.

Every request gets an id (a valid incoming X-Request-ID, else a new one, echoed in the response header) and one
JSON line on the `cifar10_cnn.serve` logger. On SIGTERM or SIGINT the server stops accepting, finishes the
requests in flight (up to GRACEFUL_TIMEOUT s), drains the inference thread and exits 0.

Explanations (torch backend only) run in a thread of their own on a copy of the model (Captum hooks the model it
explains, so it must not be the object the inference thread runs), at most MAX_EXPLAIN_IMAGES per request and
EXPLAIN_BACKLOG requests queued or running; more is a 503 to retry, never an unbounded queue.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import importlib.util
import io
import json
import logging
import math
import os
import queue
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableSequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import UserError, first_line
from .explain import explain, overlay, require_captum, resolve_class
from .images import MAX_PIXELS, DecodeBudget, ImageError, decode, decode_cost, open_image
from .predict import NOT_FINITE, Predictor, TorchPredictor, finite_rows, identity, load_predictor, top_k
from .version import __version__

STATIC = Path(str(resources.files("cifar10_cnn") / "static"))
MULTIPART_SLACK = 1 << 20  # headers and boundaries around the files
HEADER_TIMEOUT = 10.0  # seconds for a request's headers, from the connection or the previous response
BODY_TIMEOUT = 60.0  # seconds for a whole request body
KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open
MAX_UPLOAD_MB = 1024.0  # the largest --max-upload-mb accepted
DECODE_MEMORY = 256 * 2**20  # bytes of decoded pixels in flight (about one 60-megapixel 16-bit image)
DECODE_THREADS = 16  # threads decoding or waiting for the budget; a lone small decode never waits for one
HEAVY_DECODE_THREADS = 2  # low-priority threads for the large decodes
MAX_EXPLAIN_IMAGES = (
    4  # images explained per request: a Grad-CAM map costs about a forward and a backward pass
)
EXPLAIN_BACKLOG = 8  # requests with explanations queued or running; beyond that a 503
EXPLAIN_OVERLAY = 128  # pixels of the overlay's side: the 32x32 input enlarged, the map coloured on top
GRACEFUL_TIMEOUT = 30.0  # seconds the requests in flight have to finish after SIGTERM
MAX_CONNECTIONS = 64  # open connections and requests in progress; beyond that uvicorn answers 503 at once
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # an incoming X-Request-ID we echo and log as it is
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROBE = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)  # the readiness probe
# An ImageError's status says why an image was refused: the `reason` label of the refusal counter.
IMAGE_REFUSALS = {400: "empty", 413: "too_many_pixels", 415: "not_an_image", 422: "corrupt"}
log = logging.getLogger("cifar10_cnn.serve")  # one JSON line per request
uvicorn_log = logging.getLogger("uvicorn.error")


def swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-py package, so that /docs works offline (else: the CDN)."""
    spec = importlib.util.find_spec("swagger_ui")  # located, not imported: only its static files are used
    for root in (spec.submodule_search_locations or []) if spec else []:
        static = Path(root) / "static"
        if (static / "swagger-ui-bundle.js").is_file() and (static / "swagger-ui.css").is_file():
            return static
    return None


class ApiError(Exception):
    """A request the service refuses: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason  # why an upload was refused (the metrics' label); None for other refusals


class Metrics:
    """The service's Prometheus metrics, in a registry of its own, so that several apps in one process (tests)
    do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cifar10_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "cifar10_request_duration_seconds", "time to answer, by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )  # fmt: skip
        self.in_flight = Gauge("cifar10_requests_in_flight", "requests being answered now", registry=r)
        self.batch_size = Histogram(
            "cifar10_model_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.decoded = Counter("cifar10_images_decoded", "uploaded images decoded", registry=r)
        self.refused = Counter(
            "cifar10_images_refused", "uploads refused, one per refused request, by reason", ["reason"], registry=r
        )  # fmt: skip
        self.queue = Gauge("cifar10_inference_queue_requests", "requests waiting for the model", registry=r)
        self.model = Info("cifar10_model", "the model served", registry=r)
        self.explained = Counter(
            "cifar10_explanations", "images explained (Grad-CAM overlays returned)", registry=r
        )
        self.explain_latency = Histogram(
            "cifar10_explanation_duration_seconds", "time to explain one request's images, in the explanation thread",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def request_id(header: bytes | None) -> str:
    """The client's X-Request-ID when it is short and made of safe characters, else a new one."""
    text = header.decode("latin-1") if header else ""
    return text if REQUEST_ID.fullmatch(text) else uuid.uuid4().hex


def route_of(scope: Scope, routes: MutableSequence[BaseRoute]) -> str:
    """The route template of a request (bounded label values: never the raw path), or "unmatched"."""
    route = scope.get("route")
    if route is None:  # answered before routing (e.g. a body over the limit): match it here
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


class Observe:
    """ASGI middleware: a request id (echoed in X-Request-ID), the metrics of each request and one JSON log line.

    An exception from the app is answered 500 here and logged as one line with its type and the request id (the
    traceback at debug level only), so that uvicorn does not print a traceback per failed request.
    """

    def __init__(self, app: ASGIApp, service: Service, routes: MutableSequence[BaseRoute], access_log: bool):
        self.app, self.service, self.routes, self.access_log = app, service, routes, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(dict(scope["headers"]).get(b"x-request-id"))
        state = scope.setdefault("state", {})
        state["images"] = 0
        status, error = 500, None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        t0 = time.perf_counter()
        with self.service.metrics.in_flight.track_inprogress():
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as e:  # a bug or a broken model: the client gets the request id to report
                error = e
                detail = f"internal server error ({type(e).__name__}); request id {rid}"
                with suppress(Exception):  # the response may have started
                    await JSONResponse({"detail": detail}, 500)(scope, receive, send_with_id)
        self.record(scope, rid, status, time.perf_counter() - t0, state.get("images", 0), error)

    def record(
        self, scope: Scope, rid: str, status: int, seconds: float, images: int, error: Exception | None
    ) -> None:
        route = route_of(scope, self.routes)
        metrics = self.service.metrics
        metrics.requests.labels(route, str(status)).inc()
        metrics.latency.labels(route).observe(seconds)
        if error is None and not self.access_log:
            return
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": rid,
            "method": scope["method"],
            "route": route,
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
            "images": images,
            "model_version": self.service.predictor.meta.version,
        }
        if error is None:
            log.info(json.dumps(line))
            return
        log.error(json.dumps({**line, "error": type(error).__name__}))
        log.debug("request %s failed", rid, exc_info=error)


class BodyLimit:
    """ASGI middleware: refuse request bodies over max_bytes (without reading more) or slower than timeout s."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout: float = BODY_TIMEOUT,
        on_refused: Callable[[str], None] = lambda reason: None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            self.on_refused("too_large")
            response = JSONResponse(
                {"detail": self.message(int(length))}, 413, headers={"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        seen = 0
        deadline = time.monotonic() + self.timeout

        async def limited() -> Message:
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.timeout:g} s") from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, self.message(seen), "too_large")
            return message

        await self.app(scope, limited, send)

    def message(self, size: int) -> str:
        return f"the request is over {self.max_bytes / 2**20:.0f} MB ({size / 2**20:.1f} MB); send fewer or smaller files"


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for request headers: uvicorn has none, so a client that
    connects and sends nothing, or sends its headers a byte at a time, would hold the connection forever."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self.loop.call_later(self.header_timeout, self._header_deadline, self.cycle)

    def _header_deadline(self, cycle: Any) -> None:
        # Still waiting for the headers of the request after `cycle`: close (a new request has a new cycle).
        if self.cycle is cycle and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, ending with exit status 0 after a graceful SIGTERM/SIGINT shutdown: uvicorn re-raises
    the signal once it has shut down, which would kill the process with it (a second SIGINT still forces)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


class Batcher:
    """One inference thread that runs every request queued at that moment as one batch (up to max_batch)."""

    def __init__(
        self, predictor: Predictor, max_batch: int = 64, on_batch: Callable[[int], None] = lambda n: None
    ):
        self.predictor = predictor
        self.max_batch = max_batch
        self.on_batch = on_batch  # called with the size of each model call
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.batches = 0
        self.images = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Answer every request queued before, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of uint8 images (N, 32, 32, 3), computed in the inference thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.put((images, loop, future))
        return await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], len(job[0])
            while n < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                n += len(job[0])
            try:
                probs = self.predictor.probabilities(np.concatenate([j[0] for j in jobs]))
                results: list[Any] = np.split(probs, np.cumsum([len(j[0]) for j in jobs])[:-1])
            except Exception as e:  # delivered to each waiting request, never kills the thread
                results = [e] * len(jobs)
            self.batches += 1
            self.images += n
            self.on_batch(n)
            for (_, loop, future), result in zip(jobs, results, strict=True):
                loop.call_soon_threadsafe(_deliver, future, result)


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


class Explainer:
    """Grad-CAM overlays in one thread of its own, on a copy of the torch model: Captum puts hooks on the model it
    explains, which a prediction on the same object in the inference thread would trip."""

    method = "gradcam"

    def __init__(
        self,
        model: Any,
        classes: list[str],
        max_images: int = MAX_EXPLAIN_IMAGES,
        backlog: int = EXPLAIN_BACKLOG,
        on_explained: Callable[[int, float], None] = lambda n, seconds: None,
    ):
        self.model = copy.deepcopy(model).eval()
        self.classes = classes
        self.max_images = max_images
        self.backlog = backlog
        self.on_explained = on_explained  # images explained and seconds taken, per request
        self._slots = threading.BoundedSemaphore(
            backlog
        )  # released when the work ends, even if the client left
        self._thread = ThreadPoolExecutor(1, "explain")

    def target(self, value: str | None, n_images: int) -> int | None:
        """explain_class as a class index (None: each image's predicted class); ApiError for a bad request."""
        if n_images > self.max_images:
            raise ApiError(
                422,
                f"explain=true explains at most {self.max_images} images per request; {n_images} were sent",
            )
        if value is None:
            return None
        try:
            return resolve_class(value, self.classes)
        except UserError as e:
            raise ApiError(422, f"explain_class: {e}") from None

    async def overlays(self, images: np.ndarray, targets: np.ndarray) -> list[str]:
        """Each image's map for its target class, overlaid on the image, as PNG data URLs."""
        if not self._slots.acquire(blocking=False):
            raise ApiError(503, f"{self.backlog} explanations are already waiting; retry in a moment")
        try:
            future = self._thread.submit(self._overlays, images, targets)
        except RuntimeError:  # shut down
            self._slots.release()
            raise ApiError(503, "the service is shutting down") from None
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    def _overlays(self, images: np.ndarray, targets: np.ndarray, record: bool = True) -> list[str]:
        t0 = time.perf_counter()
        maps = explain(self.model, images, method=self.method, target=targets)
        urls = [_png_data_url(overlay(i, m, size=EXPLAIN_OVERLAY)) for i, m in zip(images, maps, strict=True)]
        if record:
            self.on_explained(len(images), time.perf_counter() - t0)
        return urls

    def warm_up(self) -> None:
        """One explanation, uncounted: the first imports Captum's modules (about a second)."""
        self._thread.submit(self._overlays, PROBE[:1], np.zeros(1, np.int64), False).result()

    def stop(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


def make_explainer(predictor: Predictor, metrics: Metrics) -> tuple[Explainer | None, str]:
    """The explainer of a torch model, or None and why explain=true is refused (the backend, or no Captum)."""
    if not isinstance(predictor, TorchPredictor):
        return None, (
            f"explanations need the torch backend; this server runs {predictor.backend} "
            "(serve the run directory or .safetensors with --backend torch)"
        )
    try:
        require_captum()
    except UserError as e:
        return None, str(e)

    def record(n: int, seconds: float) -> None:
        metrics.explained.inc(n)
        metrics.explain_latency.observe(seconds)

    return Explainer(predictor.model, list(predictor.meta.classes), on_explained=record), ""


@dataclass
class Limits:
    """What one request may hold: bytes per file, files, pixels per image; the default top-k; and how many
    connections (and requests in progress) the server takes at once."""

    max_upload_mb: float
    max_files: int
    max_pixels: int
    top_k_default: int
    max_connections: int = MAX_CONNECTIONS

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def check(self, max_batch: int) -> None:
        """One line for a limit that cannot work: NaN, infinite, zero or negative."""
        mb = self.max_upload_mb
        if not isinstance(mb, (int, float)) or not math.isfinite(mb) or not 0 < mb <= MAX_UPLOAD_MB:
            raise UserError(
                f"--max-upload-mb {mb}: give a number of megabytes above 0, at most {MAX_UPLOAD_MB:g}"
            )
        if self.max_files < 1 or max_batch < 1 or self.max_pixels < 1 or self.top_k_default < 1:
            raise UserError("--max-files, --top-k, the pixel limit and the batch size must be positive")
        if self.max_connections < 1:
            raise UserError(f"--max-connections {self.max_connections}: give at least 1")


@dataclass(frozen=True)
class Timeouts:
    """Seconds a connection may take: for request headers, for a body, idle between requests; and the time the
    requests in flight have to finish after SIGTERM."""

    header: float = HEADER_TIMEOUT
    body: float = BODY_TIMEOUT
    keep_alive: float = KEEP_ALIVE
    graceful_shutdown: float = GRACEFUL_TIMEOUT


def _png_data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _lower_priority() -> None:
    """Run this thread at a lower CPU priority (Linux: nice is per thread), where the OS allows it."""
    with suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class Decoder:
    """Uploads -> uint8 (32, 32, 3) arrays: large images in low-priority threads, so that a decode-heavy upload
    takes the CPU that normal requests leave, and the memory the budget allows."""

    def __init__(
        self,
        max_pixels: int,
        budget: DecodeBudget,
        heavy_threads: int = HEAVY_DECODE_THREADS,
        on_decoded: Callable[[], None] = lambda: None,
    ):
        self.max_pixels = max_pixels
        self.budget = budget
        self.heavy_threads = heavy_threads
        self.heavy = ThreadPoolExecutor(heavy_threads, "decode-heavy", initializer=_lower_priority)
        self.on_decoded = on_decoded

    def decode_all(self, uploads: list[tuple[str, bytes]]) -> list[np.ndarray]:
        """Called in a worker thread; waits for the low-priority threads where an image is large."""
        out = []
        for name, data in uploads:
            try:
                img = open_image(data, self.max_pixels)
                if decode_cost(img) > self.budget.small:
                    out.append(self.heavy.submit(decode, img, self.budget).result())
                else:
                    out.append(decode(img, self.budget))
            except ImageError as e:
                raise ApiError(e.status, f"{name}: {e}", IMAGE_REFUSALS.get(e.status, "other")) from None
            self.on_decoded()
        return out


async def read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """The files of a multipart request as (name, bytes), or ApiError saying what is wrong with the request."""
    try:
        form = await request.form(max_files=limits.max_files, max_fields=limits.max_files + 16)
    except StarletteHTTPException as e:
        detail = str(e.detail)
        if "Too many files" in detail:
            raise ApiError(
                413, f"too many files; send at most {limits.max_files} per request", "too_many_files"
            ) from None
        raise ApiError(400, f"the request is not valid multipart/form-data ({detail})") from None
    except ClientDisconnect:
        client = request.client
        uvicorn_log.warning(
            "client %s disconnected during the upload; request dropped", client and client.host
        )
        raise ApiError(400, "the client disconnected during the upload") from None
    try:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise ApiError(
                400,
                "no file in the request; send multipart/form-data with one or more image files (e.g. -F file=@cat.jpg)",
            )
        files = []
        for i, up in enumerate(uploads):
            name = up.filename or f"file {i + 1}"
            if up.size is not None and up.size > limits.max_upload_bytes:
                raise ApiError(
                    413,
                    f"{name}: {up.size / 2**20:.1f} MB is over the upload limit of {limits.max_upload_mb:g} MB",
                    "too_large",
                )
            files.append((name, await up.read()))
        return files
    finally:
        await form.close()


@dataclass
class Service:
    """The served model and what the handlers share: the batcher, the limits and the decoding bounds."""

    predictor: Predictor
    limits: Limits
    batcher: Batcher
    decoder: Decoder
    metrics: Metrics
    timeouts: Timeouts = field(default_factory=Timeouts)
    explainer: Explainer | None = None
    no_explain: str = "explanations are not set up"  # why explain=true is refused when there is no explainer
    decode_threads: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(DECODE_THREADS)
    )
    started: float = field(default_factory=time.time)
    not_ready: str | None = "the probe inference has not run yet"  # why /ready answers 503; None when ready

    def health(self) -> dict[str, Any]:
        """Liveness: the model is loaded and the inference thread runs."""
        if not self.batcher.alive():
            raise ApiError(503, "the inference thread has stopped")
        return {
            "status": "ok",
            "model": identity(self.predictor.meta),
            "backend": self.predictor.backend,
            "uptime_seconds": round(time.time() - self.started, 1),
        }

    def settings(self) -> dict[str, float | int]:
        """The limits an operator sizes the service by: per request, concurrency and timeouts (s)."""
        limits = self.limits
        return {
            "max_upload_mb": limits.max_upload_mb,
            "max_files": limits.max_files,
            "max_pixels": limits.max_pixels,
            "max_connections": limits.max_connections,
            "max_batch": self.batcher.max_batch,
            "decode_threads": int(self.decode_threads.total_tokens),
            "heavy_decode_threads": self.decoder.heavy_threads,
            "decode_memory_mb": round(self.decoder.budget.max_bytes / 2**20, 1),
            "max_explain_images": self.explainer.max_images if self.explainer else 0,
            "explain_backlog": self.explainer.backlog if self.explainer else 0,
            **{f"{k}_timeout_s": v for k, v in asdict(self.timeouts).items()},
        }

    async def warm_up(self) -> None:
        """Readiness: a probe batch through the inference thread must give finite probabilities."""
        try:
            probs = await self.batcher.probabilities(PROBE)
            if not finite_rows(probs).all():
                raise ValueError(NOT_FINITE)
            if self.explainer:
                await anyio.to_thread.run_sync(self.explainer.warm_up)
        except Exception as e:  # a model that loaded but cannot answer: alive, never ready
            self.not_ready = f"the probe inference failed ({first_line(e)})"
            uvicorn_log.error("not ready: %s", self.not_ready)
            return
        self.not_ready = None

    def ready(self) -> JSONResponse:
        """Readiness and the limits: 200 once the probe inference passed, 503 before or when it failed."""
        reason = "the inference thread has stopped" if not self.batcher.alive() else self.not_ready
        body = {
            "status": "not ready" if reason else "ready",
            **({"detail": reason} if reason else {}),
            "model": identity(self.predictor.meta),
            "backend": self.predictor.backend,
            "limits": self.settings(),
        }
        return JSONResponse(body, 503 if reason else 200)

    def model(self) -> dict[str, Any]:
        """The served model: identity, architecture, size, test accuracy, classes, calibration and limits."""
        return {
            **self.predictor.meta.to_dict(),
            "backend": self.predictor.backend,
            "input": "any image Pillow reads; EXIF orientation, RGB on white, centre square crop, antialiased resize to 32x32",
            "top_k_default": self.limits.top_k_default,
            "explain": {
                "available": self.explainer is not None,
                **({"method": self.explainer.method} if self.explainer else {"detail": self.no_explain}),
            },
            "limits": self.settings(),
            "stats": {"batches": self.batcher.batches, "images": self.batcher.images},
        }

    async def predict(
        self,
        request: Request,
        k: int,
        include_input: bool,
        explain: bool = False,
        explain_class: str | None = None,
    ) -> dict[str, Any]:
        """Top-k classes of each uploaded image (and its explanation when asked); a 422 for an image the model
        gives no finite answer for."""
        t0 = time.perf_counter()
        explain = explain or explain_class is not None
        if explain and self.explainer is None:
            raise ApiError(422, self.no_explain)
        files = await read_uploads(request, self.limits)
        request.state.images = len(files)  # for the request's log line
        target = self.explainer.target(explain_class, len(files)) if explain and self.explainer else None
        images = await anyio.to_thread.run_sync(self.decoder.decode_all, files, limiter=self.decode_threads)
        probs = await self.batcher.probabilities(np.stack(images))
        for (name, _), finite in zip(files, finite_rows(probs), strict=True):
            if not finite:
                raise ApiError(422, f"{name}: {NOT_FINITE}", "not_finite")
        explanations = None
        if explain and self.explainer:
            targets = probs.argmax(1) if target is None else np.full(len(images), target)
            pngs = await self.explainer.overlays(np.stack(images), targets)
            classes = self.predictor.meta.classes
            explanations = [
                {"class": classes[t], "method": self.explainer.method, "png": url}
                for t, url in zip(targets, pngs, strict=True)
            ]
        results = []
        for (name, _), image, row in zip(
            files, images, top_k(probs, self.predictor.meta.classes, k), strict=True
        ):
            item: dict[str, Any] = {
                "filename": name,
                "predictions": [{"class": c, "probability": round(p, 6)} for c, p in row],
            }
            if include_input:
                item["input"] = _png_data_url(image)
            if explanations:
                item["explanation"] = explanations[len(results)]
            results.append(item)
        return {
            "model": identity(self.predictor.meta),
            "backend": self.predictor.backend,
            "results": results,
            "milliseconds": round((time.perf_counter() - t0) * 1000, 2),
        }


UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            }
        },
    }
}


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal as {"detail": "<one line>"} with its status; refused uploads counted by reason."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        if e.reason:
            app.state.service.metrics.refused.labels(e.reason).inc()
        return JSONResponse({"detail": e.message}, e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}"
            for err in e.errors()
        ]
        return JSONResponse({"detail": "; ".join(parts)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))


def add_docs(app: FastAPI, assets: Path) -> None:
    """/docs from the local Swagger UI files, so that it works offline."""
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="cifar10-cnn API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def add_routes(app: FastAPI, service: Service) -> None:
    """/health, /ready, /metrics, /model, /predict, the page and its static files."""
    n_classes = len(service.predictor.meta.classes)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model is loaded and the inference thread runs."""
        return service.health()

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and a probe inference passed (503 until then); and the limits."""
        return service.ready()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text format."""
        return service.metrics.exposition()

    @app.get("/model")
    async def model() -> dict[str, Any]:
        """The served model: identity, architecture, size, test accuracy, classes, calibration and limits."""
        return service.model()

    @app.post("/predict", openapi_extra=UPLOAD_SCHEMA)
    async def predict(
        request: Request,
        top_k_: int = Query(
            service.limits.top_k_default, alias="top_k", ge=1, le=n_classes, description="classes per image"
        ),
        include_input: bool = Query(
            False, description="also return the 32x32 image the model saw (PNG data URL)"
        ),
        explain_: bool = Query(
            False,
            alias="explain",
            description=f"also return a Grad-CAM heatmap over each image ({EXPLAIN_OVERLAY}x{EXPLAIN_OVERLAY} PNG data "
            f"URL; at most {MAX_EXPLAIN_IMAGES} images per request; torch backend only)",
        ),
        explain_class: str | None = Query(
            None,
            description="the class to explain, by name or index (default: each image's predicted class); implies explain",
        ),
    ) -> JSONResponse:
        """Top-k classes of each uploaded image (multipart/form-data; one or several files, any field name)."""
        # A JSONResponse directly: the values are plain JSON types, so FastAPI's encoder pass is not needed.
        return JSONResponse(await service.predict(request, top_k_, include_input, explain_, explain_class))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def create_app(
    model_path: str | os.PathLike,
    backend: str = "auto",
    *,
    max_upload_mb: float = 10.0,
    max_files: int = 16,
    max_pixels: int = MAX_PIXELS,
    top_k_default: int = 5,
    max_connections: int = MAX_CONNECTIONS,
    max_batch: int = 64,
    decode_memory: int = DECODE_MEMORY,
    data_dir: str | os.PathLike | None = None,
    timeouts: Timeouts = Timeouts(),
    access_log: bool = True,
) -> FastAPI:
    """The FastAPI app serving one model (a run directory, a .safetensors or an .onnx file).

    timeouts.body is enforced here; the others are uvicorn's (serve passes them) and shown on /ready."""
    limits = Limits(max_upload_mb, max_files, max_pixels, top_k_default, max_connections)
    limits.check(max_batch)
    predictor = load_predictor(model_path, backend, data_dir=data_dir)
    metrics = Metrics()
    decoder = Decoder(max_pixels, DecodeBudget(decode_memory), on_decoded=metrics.decoded.inc)
    batcher = Batcher(predictor, max_batch, on_batch=metrics.batch_size.observe)
    explainer, no_explain = make_explainer(predictor, metrics)
    service = Service(predictor, limits, batcher, decoder, metrics, timeouts, explainer, no_explain)
    metrics.queue.set_function(batcher.queue_depth)
    metrics.model.info({**identity(predictor.meta), "backend": predictor.backend})

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        probe = asyncio.create_task(service.warm_up())  # /ready says 503 until it passes
        yield
        probe.cancel()  # done long ago, unless the model hangs
        with suppress(asyncio.CancelledError):
            await probe
        service.batcher.stop()  # uvicorn has waited for the requests in flight: the queue is empty
        if service.explainer:
            service.explainer.stop()
        service.decoder.heavy.shutdown(wait=False, cancel_futures=True)

    meta, assets = predictor.meta, swagger_assets()
    app = FastAPI(
        title="cifar10-cnn",
        version=__version__,
        summary=f"CIFAR-10 classifier {meta.name} ({meta.architecture}) on {predictor.backend}",
        lifespan=lifespan,
        docs_url=None if assets else "/docs",
        redoc_url=None,
    )
    if assets:
        add_docs(app, assets)
    refused = metrics.refused
    app.add_middleware(
        BodyLimit,
        max_bytes=limits.max_upload_bytes * max_files + MULTIPART_SLACK,
        timeout=timeouts.body,
        on_refused=lambda reason: refused.labels(reason).inc(),
    )
    app.add_middleware(Observe, service=service, routes=app.router.routes, access_log=access_log)  # outermost
    app.state.service = service
    add_error_handlers(app)
    add_routes(app, service)
    return app


def check_port(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(infos[0][4])
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host"
        ) from None


def check_address(port: int, max_upload_mb: float, max_connections: int = MAX_CONNECTIONS) -> None:
    """One line for a port outside 1-65535, an upload limit that is not a positive number of megabytes, or
    a connection limit below 1."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"--port {port}: give a port from 1 to 65535")
    Limits(max_upload_mb, 1, 1, 1, max_connections).check(1)


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, and the request lines of `cifar10_cnn.serve` as bare JSON lines on stdout."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["json_line"] = {"format": "%(message)s"}
    config["handlers"]["requests"] = {
        "class": "logging.StreamHandler",
        "formatter": "json_line",
        "stream": "ext://sys.stdout",
    }
    config["loggers"][log.name] = {"handlers": ["requests"], "level": level.upper(), "propagate": False}
    return config


def limits_line(settings: dict[str, float | int]) -> str:
    """The limits in one line, as printed at start (the same as /ready shows)."""
    return "limits: " + " ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()
    )


def serve(
    model_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    max_upload_mb: float = 10.0,
    max_files: int = 16,
    top_k_default: int = 5,
    max_connections: int = MAX_CONNECTIONS,
    data_dir: str | os.PathLike | None = None,
    log_level: str = "info",
    access_log: bool = True,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    keep_alive: float = KEEP_ALIVE,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
) -> None:
    """Serve the model with uvicorn until SIGTERM or SIGINT, then finish the requests in flight and return.

    Every option is checked before the model loads."""
    check_address(port, max_upload_mb, max_connections)
    check_port(host, port)
    timeouts = Timeouts(header_timeout, body_timeout, keep_alive, graceful_timeout)
    app = create_app(
        model_path,
        backend,
        max_upload_mb=max_upload_mb,
        max_files=max_files,
        top_k_default=top_k_default,
        max_connections=max_connections,
        data_dir=data_dir,
        timeouts=timeouts,
        access_log=access_log,
    )
    service = app.state.service
    meta, shown = service.predictor.meta, f"[{host}]" if ":" in host else host
    print(
        f"serving {meta.name} ({meta.architecture}, {service.predictor.backend}) on "
        f"http://{shown}:{port}/  (API docs: /docs; metrics: /metrics; Ctrl-C stops)\n"
        + limits_line(service.settings()),
        flush=True,
    )
    protocol = type("Protocol", (TimedH11Protocol,), {"header_timeout": timeouts.header})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config(log_level),
        access_log=False,  # replaced by Observe's JSON line
        timeout_graceful_shutdown=timeouts.graceful_shutdown,
        http=protocol,
        timeout_keep_alive=timeouts.keep_alive,
        limit_concurrency=max_connections,  # beyond it: 503 at once, before the request is read
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers (uvicorn's default, stated)
    )
    GracefulServer(config).run()
