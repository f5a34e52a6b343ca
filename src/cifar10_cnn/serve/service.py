"""The service object: the served model and what the handlers share (the workers, the limits, the metrics), and
what each route answers, independent of HTTP routing."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ..errors import first_line
from ..predict import NOT_FINITE, Predictor, finite_rows, identity, top_k
from ..weights import probe_images
from .errors import ApiError, clip
from .limits import Limits, Timeouts
from .observe import Metrics
from .workers import DECODE_THREADS, Batcher, Decoder, Explainer, png_data_url


def input_text(size: int) -> str:
    """What /model says the service does with an upload."""
    return (
        "any image Pillow reads; EXIF orientation, RGB on white, centre square crop, antialiased resize to "
        f"{size}x{size}"
    )


uvicorn_log = logging.getLogger("uvicorn.error")


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
                    f"{clip(name)}: {up.size / 2**20:.1f} MB is over the upload limit of {limits.max_upload_mb:g} MB",
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
            probs = await self.batcher.probabilities(probe_images(self.predictor.meta.image_size))
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
            "input": input_text(self.predictor.meta.image_size),
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
                raise ApiError(422, f"{clip(name)}: {NOT_FINITE}", "not_finite")
        explanations = await self.explanations(np.stack(images), probs, target) if explain else None
        results = []
        for i, ((name, _), row) in enumerate(
            zip(files, top_k(probs, self.predictor.meta.classes, k), strict=True)
        ):
            item: dict[str, Any] = {
                "filename": name,
                "predictions": [{"class": c, "probability": round(p, 6)} for c, p in row],
            }
            if include_input:
                item["input"] = png_data_url(images[i])
            if explanations:
                item["explanation"] = explanations[i]
            results.append(item)
        return {
            "model": identity(self.predictor.meta),
            "backend": self.predictor.backend,
            "results": results,
            "milliseconds": round((time.perf_counter() - t0) * 1000, 2),
        }

    async def explanations(
        self, images: np.ndarray, probs: np.ndarray, target: int | None
    ) -> list[dict[str, str]] | None:
        """Each image's Grad-CAM overlay, for `target` or (None) the class predicted for it."""
        if self.explainer is None:
            return None
        targets = probs.argmax(1) if target is None else np.full(len(images), target)
        pngs = await self.explainer.overlays(images, targets)
        classes = self.predictor.meta.classes
        return [
            {"class": classes[t], "method": self.explainer.method, "png": url}
            for t, url in zip(targets, pngs, strict=True)
        ]
