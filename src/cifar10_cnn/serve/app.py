"""The FastAPI app: its routes, error handlers and docs, and create_app, the one place that shows how the
parts (limits, workers, observation, security headers, the service) fit together."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..images import MAX_PIXELS, DecodeBudget
from ..predict import identity, load_predictor
from ..version import __version__
from .errors import ApiError
from .limits import DEFAULT_TIMEOUTS, MAX_CONNECTIONS, MULTIPART_SLACK, BodyLimit, Limits, Timeouts
from .observe import Metrics, Observe
from .security import SecurityHeaders, policy_for_page
from .service import Service
from .workers import DECODE_MEMORY, EXPLAIN_OVERLAY, MAX_EXPLAIN_IMAGES, Batcher, Decoder, make_explainer

STATIC = Path(str(resources.files("cifar10_cnn") / "static"))
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


def swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-py package, so that /docs works offline (else: the CDN)."""
    spec = importlib.util.find_spec("swagger_ui")  # located, not imported: only its static files are used
    for root in (spec.submodule_search_locations or []) if spec else []:
        static = Path(root) / "static"
        if (static / "swagger-ui-bundle.js").is_file() and (static / "swagger-ui.css").is_file():
            return static
    return None


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


def add_docs(app: FastAPI, assets: Path | None) -> None:
    """/docs from the local Swagger UI files, so that it works offline (without them: from the CDN); the page's
    one inline script allowed by its hash."""
    urls = {}
    if assets:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")
        urls = {
            "swagger_js_url": "/docs-assets/swagger-ui-bundle.js",
            "swagger_css_url": "/docs-assets/swagger-ui.css",
            "swagger_favicon_url": "/docs-assets/favicon-32x32.png",
        }
    html = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json", title="cifar10-cnn API", **urls
    ).body.decode()
    policy = {"Content-Security-Policy": policy_for_page(html)}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(html, headers=policy)


def add_routes(app: FastAPI, service: Service) -> None:
    """/health, /ready, /metrics, /model, /predict, the page and its static files."""
    n_classes, size = len(service.predictor.meta.classes), service.predictor.meta.image_size

    @app.head("/health", include_in_schema=False)  # what load balancers often probe with
    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model is loaded and the inference thread runs."""
        return service.health()

    @app.head("/ready", include_in_schema=False)
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
            False,
            description=f"also return the {size}x{size} image the model saw (PNG data URL)",
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


def lifespan_of(service: Service) -> Any:
    """Start the workers and the readiness probe; at shutdown (after the requests in flight), stop them."""

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

    return lifespan


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
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    access_log: bool = True,
) -> FastAPI:
    """The FastAPI app serving one model (a run directory, a .safetensors or an .onnx file).

    timeouts.body is enforced here; the others are uvicorn's (serve passes them) and shown on /ready."""
    limits = Limits(max_upload_mb, max_files, max_pixels, top_k_default, max_connections)
    limits.check(max_batch)
    predictor = load_predictor(model_path, backend, data_dir=data_dir)
    metrics = Metrics()
    decoder = Decoder(
        max_pixels,
        DecodeBudget(decode_memory),
        on_decoded=metrics.decoded.inc,
        size=predictor.meta.image_size,
    )
    batcher = Batcher(predictor, max_batch, on_batch=metrics.batch_size.observe)
    explainer, no_explain = make_explainer(predictor, metrics)
    service = Service(predictor, limits, batcher, decoder, metrics, timeouts, explainer, no_explain)
    metrics.queue.set_function(batcher.queue_depth)
    metrics.model.info({**identity(predictor.meta), "backend": predictor.backend})

    meta, assets = predictor.meta, swagger_assets()
    app = FastAPI(
        title="cifar10-cnn",
        version=__version__,
        summary=f"CIFAR-10 classifier {meta.name} ({meta.architecture}) on {predictor.backend}",
        lifespan=lifespan_of(service),
        docs_url=None,  # add_docs: the page with its own policy
        redoc_url=None,
    )
    add_docs(app, assets)
    app.add_middleware(  # innermost: a body over the limit is refused before the route reads it
        BodyLimit,
        max_bytes=limits.max_upload_bytes * max_files + MULTIPART_SLACK,
        timeout=timeouts.body,
        on_refused=lambda reason: metrics.refused.labels(reason).inc(),
    )
    app.add_middleware(
        Observe, metrics=metrics, model_version=meta.version, routes=app.router.routes, access_log=access_log
    )
    app.add_middleware(SecurityHeaders)  # outermost: Observe's own 500 answers carry the headers too
    app.state.service = service
    add_error_handlers(app)
    add_routes(app, service)
    return app
