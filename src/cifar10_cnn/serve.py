"""The web service: FastAPI + uvicorn, a JSON API for predictions and a small page to try the model.

    POST /predict   multipart files (any field name) -> top-k classes of each image, and the model's identity
    GET  /model     architecture, params, test accuracy, classes, temperature, limits
    GET  /health    liveness
    GET  /          the page (static/index.html): drop an image, see the top classes as bars
    GET  /docs      OpenAPI docs

Uploads are decoded in a small thread pool (bounded, so that concurrent large images cannot exhaust memory);
inference runs in one thread that takes every request waiting at that moment as one batch, so many small
requests share model calls instead of queueing one by one, and a lone request never waits for company.
Every bad upload is a 4xx with {"detail": "..."}.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import os
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .predict import MAX_PIXELS, ImageError, Predictor, load_image, load_predictor, top_k

STATIC = Path(str(resources.files("cifar10_cnn") / "static"))
MULTIPART_SLACK = 1 << 20  # headers and boundaries around the files


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
    """ASGI middleware: refuse request bodies over max_bytes, without reading more than that."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

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

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, self.message(seen))
            return message

        await self.app(scope, limited, send)

    def message(self, size: int) -> str:
        return f"the request is over {self.max_bytes / 2**20:.0f} MB ({size / 2**20:.1f} MB); send fewer or smaller files"


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


@dataclass
class Limits:
    max_upload_bytes: int
    max_files: int
    max_pixels: int


def _png_data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _decode_all(uploads: list[tuple[str, bytes]], max_pixels: int) -> list[np.ndarray]:
    out = []
    for name, data in uploads:
        try:
            out.append(load_image(data, max_pixels))
        except ImageError as e:
            raise ApiError(e.status, f"{name}: {e}") from None
    return out


def create_app(
    model_path: str | os.PathLike,
    backend: str = "auto",
    *,
    max_upload_mb: float = 10.0,
    max_files: int = 16,
    max_pixels: int = MAX_PIXELS,
    top_k_default: int = 5,
    max_batch: int = 64,
    decode_threads: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> FastAPI:
    """The FastAPI app serving one model (a run directory, a .safetensors or an .onnx file)."""
    from .errors import UserError

    if max_upload_mb <= 0 or max_files < 1 or max_batch < 1:
        raise UserError("--max-upload-mb, --max-files and the batch size must be positive")
    predictor = load_predictor(model_path, backend, data_dir=data_dir)
    info = predictor.info
    limits = Limits(int(max_upload_mb * 2**20), max_files, max_pixels)
    batcher = Batcher(predictor, max_batch)
    # Decoding a large image takes memory and CPU: a few at a time, the rest wait their turn.
    decode_limiter = anyio.CapacityLimiter(decode_threads or max(2, os.cpu_count() or 1))
    n_classes = len(info.classes)
    started = time.time()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    assets = swagger_assets()
    app = FastAPI(
        title="cifar10-cnn",
        version=__version__,
        summary=f"CIFAR-10 classifier {info.name} ({info.architecture}) on {info.backend}",
        lifespan=lifespan,
        docs_url=None if assets else "/docs",
        redoc_url=None,
    )
    if assets:
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

    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes * max_files + MULTIPART_SLACK)
    app.state.predictor = predictor
    app.state.batcher = batcher

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

    identity = {"name": info.name, "version": info.version, "architecture": info.architecture}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model is loaded and the inference thread runs."""
        alive = batcher._thread.is_alive()
        if not alive:
            raise ApiError(503, "the inference thread has stopped")
        return {
            "status": "ok",
            "model": identity,
            "backend": info.backend,
            "uptime_seconds": round(time.time() - started, 1),
        }

    @app.get("/model")
    async def model() -> dict[str, Any]:
        """The served model: identity, architecture, size, test accuracy, classes, calibration and limits."""
        return {
            **info.to_dict(),
            "input": "any image Pillow reads; EXIF orientation, RGB on white, centre square crop, antialiased resize to 32x32",
            "top_k_default": top_k_default,
            "limits": {"max_upload_mb": max_upload_mb, "max_files": max_files, "max_pixels": max_pixels},
            "stats": {"batches": batcher.batches, "images": batcher.images},
        }

    upload_schema = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        },
                        "required": ["file"],
                    }
                }
            },
        }
    }

    @app.post("/predict", openapi_extra=upload_schema)
    async def predict(
        request: Request,
        top_k_: int = Query(
            top_k_default, alias="top_k", ge=1, le=n_classes, description="classes per image"
        ),
        include_input: bool = Query(
            False, description="also return the 32x32 image the model saw (PNG data URL)"
        ),
    ) -> JSONResponse:
        """Top-k classes of each uploaded image (multipart/form-data; one or several files, any field name)."""
        t0 = time.perf_counter()
        try:
            form = await request.form(max_files=limits.max_files, max_fields=limits.max_files + 16)
        except StarletteHTTPException as e:
            detail = str(e.detail)
            if "Too many files" in detail:
                raise ApiError(413, f"too many files; send at most {limits.max_files} per request") from None
            raise ApiError(400, f"the request is not valid multipart/form-data ({detail})") from None
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
                        f"{name}: {up.size / 2**20:.1f} MB is over the upload limit of {max_upload_mb:g} MB",
                    )
                files.append((name, await up.read()))
        finally:
            await form.close()
        images = await anyio.to_thread.run_sync(_decode_all, files, limits.max_pixels, limiter=decode_limiter)
        probs = await batcher.probabilities(np.stack(images))
        results = []
        for (name, _), image, row in zip(files, images, top_k(probs, info.classes, top_k_), strict=True):
            item: dict[str, Any] = {
                "filename": name,
                "predictions": [{"class": c, "probability": round(p, 6)} for c, p in row],
            }
            if include_input:
                item["input"] = _png_data_url(image)
            results.append(item)
        # A JSONResponse directly: the values are plain JSON types, so FastAPI's encoder pass is not needed.
        return JSONResponse(
            {
                "model": identity,
                "backend": info.backend,
                "results": results,
                "milliseconds": round((time.perf_counter() - t0) * 1000, 2),
            }
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
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
) -> None:
    """Serve the model with uvicorn until interrupted."""
    import uvicorn

    check_port(host, port)
    app = create_app(
        model_path,
        backend,
        max_upload_mb=max_upload_mb,
        max_files=max_files,
        top_k_default=top_k_default,
        data_dir=data_dir,
    )
    info = app.state.predictor.info
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {info.name} ({info.architecture}, {info.backend}) on http://{shown}:{port}/  "
        f"(API docs: /docs; Ctrl-C stops)",
        flush=True,
    )
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5
    )
