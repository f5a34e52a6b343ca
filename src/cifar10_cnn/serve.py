"""The web service: FastAPI + uvicorn, a JSON API for predictions and a small page to try the model.

    POST /predict   multipart files (any field name) -> top-k classes of each image, and the model's identity
    GET  /model     architecture, params, test accuracy, classes, temperature, limits
    GET  /health    liveness
    GET  /          the page (static/index.html): drop an image, see the top classes as bars
    GET  /docs      OpenAPI docs

Uploads are decoded in threads, the memory of the decodes in flight bounded by a DecodeBudget (small images
have a lane of their own, so a large upload does not hold them up); inference runs in one thread that takes
every request waiting at that moment as one batch, so many small requests share model calls instead of
queueing one by one, and a lone request never waits for company. Every bad upload is a 4xx with
{"detail": "..."}. Connections are bounded in time: request headers must arrive within HEADER_TIMEOUT s,
a body within BODY_TIMEOUT s, and an idle keep-alive connection is closed after KEEP_ALIVE s.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import h11
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import UserError
from .images import MAX_PIXELS, DecodeBudget, ImageError, decode, decode_cost, open_image
from .predict import NOT_FINITE, Predictor, finite_rows, identity, load_predictor, top_k
from .version import __version__

STATIC = Path(str(resources.files("cifar10_cnn") / "static"))
MULTIPART_SLACK = 1 << 20  # headers and boundaries around the files
HEADER_TIMEOUT = 10.0  # seconds for a request's headers, from the connection or the previous response
BODY_TIMEOUT = 60.0  # seconds for a whole request body
KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open
MAX_UPLOAD_MB = 1024.0  # the largest --max-upload-mb accepted
DECODE_MEMORY = 256 * 2**20  # bytes of decoded pixels in flight (about one 60-megapixel 16-bit image)
DECODE_THREADS = 16  # threads decoding or waiting for the budget; a lone small decode never waits for one
log = logging.getLogger("uvicorn.error")


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

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyLimit:
    """ASGI middleware: refuse request bodies over max_bytes (without reading more) or slower than timeout s."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = BODY_TIMEOUT):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
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
                raise ApiError(413, self.message(seen))
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


class Batcher:
    """One inference thread that runs every request queued at that moment as one batch (up to max_batch)."""

    def __init__(self, predictor: Predictor, max_batch: int = 64):
        self.predictor = predictor
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.batches = 0
        self.images = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

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
            for (_, loop, future), result in zip(jobs, results, strict=True):
                loop.call_soon_threadsafe(_deliver, future, result)


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


@dataclass
class Limits:
    """What one request may hold: bytes per file, files, pixels per image; and the default top-k."""

    max_upload_mb: float
    max_files: int
    max_pixels: int
    top_k_default: int

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

    def __init__(self, max_pixels: int, budget: DecodeBudget, heavy_threads: int = 2):
        self.max_pixels = max_pixels
        self.budget = budget
        self.heavy = ThreadPoolExecutor(heavy_threads, "decode-heavy", initializer=_lower_priority)

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
                raise ApiError(e.status, f"{name}: {e}") from None
        return out


async def read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """The files of a multipart request as (name, bytes), or ApiError saying what is wrong with the request."""
    try:
        form = await request.form(max_files=limits.max_files, max_fields=limits.max_files + 16)
    except StarletteHTTPException as e:
        detail = str(e.detail)
        if "Too many files" in detail:
            raise ApiError(413, f"too many files; send at most {limits.max_files} per request") from None
        raise ApiError(400, f"the request is not valid multipart/form-data ({detail})") from None
    except ClientDisconnect:
        client = request.client
        log.warning("client %s disconnected during the upload; request dropped", client and client.host)
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
    decode_threads: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(DECODE_THREADS)
    )
    started: float = field(default_factory=time.time)

    def health(self) -> dict[str, Any]:
        """Liveness: the model is loaded and the inference thread runs."""
        if not self.batcher._thread.is_alive():
            raise ApiError(503, "the inference thread has stopped")
        return {
            "status": "ok",
            "model": identity(self.predictor.meta),
            "backend": self.predictor.backend,
            "uptime_seconds": round(time.time() - self.started, 1),
        }

    def model(self) -> dict[str, Any]:
        """The served model: identity, architecture, size, test accuracy, classes, calibration and limits."""
        limits = self.limits
        return {
            **self.predictor.meta.to_dict(),
            "backend": self.predictor.backend,
            "input": "any image Pillow reads; EXIF orientation, RGB on white, centre square crop, antialiased resize to 32x32",
            "top_k_default": limits.top_k_default,
            "limits": {
                "max_upload_mb": limits.max_upload_mb,
                "max_files": limits.max_files,
                "max_pixels": limits.max_pixels,
            },
            "stats": {"batches": self.batcher.batches, "images": self.batcher.images},
        }

    async def predict(self, request: Request, k: int, include_input: bool) -> dict[str, Any]:
        """Top-k classes of each uploaded image; a 422 for an image the model gives no finite answer for."""
        t0 = time.perf_counter()
        files = await read_uploads(request, self.limits)
        images = await anyio.to_thread.run_sync(self.decoder.decode_all, files, limiter=self.decode_threads)
        probs = await self.batcher.probabilities(np.stack(images))
        for (name, _), finite in zip(files, finite_rows(probs), strict=True):
            if not finite:
                raise ApiError(422, f"{name}: {NOT_FINITE}")
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
    """Every refusal as {"detail": "<one line>"} with its status."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
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
    """/health, /model, /predict, the page and its static files."""
    n_classes = len(service.predictor.meta.classes)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model is loaded and the inference thread runs."""
        return service.health()

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
    ) -> JSONResponse:
        """Top-k classes of each uploaded image (multipart/form-data; one or several files, any field name)."""
        # A JSONResponse directly: the values are plain JSON types, so FastAPI's encoder pass is not needed.
        return JSONResponse(await service.predict(request, top_k_, include_input))

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
    max_batch: int = 64,
    decode_memory: int = DECODE_MEMORY,
    data_dir: str | os.PathLike | None = None,
    body_timeout: float = BODY_TIMEOUT,
) -> FastAPI:
    """The FastAPI app serving one model (a run directory, a .safetensors or an .onnx file)."""
    limits = Limits(max_upload_mb, max_files, max_pixels, top_k_default)
    limits.check(max_batch)
    predictor = load_predictor(model_path, backend, data_dir=data_dir)
    decoder = Decoder(max_pixels, DecodeBudget(decode_memory))
    service = Service(predictor, limits, Batcher(predictor, max_batch), decoder)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        service.batcher.stop()
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
    app.add_middleware(
        BodyLimit, max_bytes=limits.max_upload_bytes * max_files + MULTIPART_SLACK, timeout=body_timeout
    )
    app.state.service = service
    add_error_handlers(app)
    add_routes(app, service)
    return app


def check_port(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when the address cannot be listened on."""
    from .errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(infos[0][4])
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host"
        ) from None


def check_address(port: int, max_upload_mb: float) -> None:
    """One line for a port outside 1-65535 or an upload limit that is not a positive number of megabytes."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"--port {port}: give a port from 1 to 65535")
    Limits(max_upload_mb, 1, 1, 1).check(1)


def serve(
    model_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    max_upload_mb: float = 10.0,
    max_files: int = 16,
    top_k_default: int = 5,
    data_dir: str | os.PathLike | None = None,
    log_level: str = "info",
    access_log: bool = True,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    keep_alive: float = KEEP_ALIVE,
) -> None:
    """Serve the model with uvicorn until interrupted; every option is checked before the model loads."""
    import uvicorn

    check_address(port, max_upload_mb)
    check_port(host, port)
    app = create_app(
        model_path,
        backend,
        max_upload_mb=max_upload_mb,
        max_files=max_files,
        top_k_default=top_k_default,
        data_dir=data_dir,
        body_timeout=body_timeout,
    )
    predictor = app.state.service.predictor
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {predictor.meta.name} ({predictor.meta.architecture}, {predictor.backend}) on "
        f"http://{shown}:{port}/  (API docs: /docs; Ctrl-C stops)",
        flush=True,
    )
    protocol = type("Protocol", (TimedH11Protocol,), {"header_timeout": header_timeout})
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=5,
        http=protocol,
        timeout_keep_alive=keep_alive,
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers (uvicorn's default, stated)
    )
