"""Watching the service: its Prometheus metrics, the request id, and one JSON log line per request."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import MutableSequence
from contextlib import suppress
from datetime import UTC, datetime

import h11
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # an incoming X-Request-ID we echo and log as it is
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CLIENT_GONE = (
    499  # the status recorded for a request the app gave no answer to (nginx's "client closed request")
)
log = logging.getLogger("cifar10_cnn.serve")  # one JSON line per request


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

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        model_version: str,
        routes: MutableSequence[BaseRoute],
        access_log: bool,
    ):
        self.app, self.metrics, self.model_version = app, metrics, model_version
        self.routes, self.access_log = routes, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(dict(scope["headers"]).get(b"x-request-id"))
        state = scope.setdefault("state", {})
        state["images"] = 0
        status: int | None = None
        error: Exception | None = None
        delivered = True

        async def send_with_id(message: Message) -> None:
            nonlocal status, delivered
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            try:
                await send(message)
            except h11.LocalProtocolError:  # uvicorn has answered this connection itself (e.g. a 400)
                delivered = False

        t0 = time.perf_counter()
        with self.metrics.in_flight.track_inprogress():
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as e:  # a bug or a broken model: the client gets the request id to report
                error = e
                detail = f"internal server error ({type(e).__name__}); request id {rid}"
                with suppress(Exception):  # the response may have started
                    await JSONResponse({"detail": detail}, 500)(scope, receive, send_with_id)
        if not delivered or status is None:  # the client has no answer of the app's: not a server error
            status = CLIENT_GONE if error is None else 500
        self.record(scope, rid, status, time.perf_counter() - t0, state.get("images", 0), error)

    def record(
        self, scope: Scope, rid: str, status: int, seconds: float, images: int, error: Exception | None
    ) -> None:
        route = route_of(scope, self.routes)
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
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
            "model_version": self.model_version,
        }
        if error is None:
            log.info(json.dumps(line))
            return
        log.error(json.dumps({**line, "error": type(error).__name__}))
        log.debug("request %s failed", rid, exc_info=error)
