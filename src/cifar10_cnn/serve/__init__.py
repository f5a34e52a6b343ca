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
a body within BODY_TIMEOUT s, and an idle keep-alive connection is closed after KEEP_ALIVE s. Every response
carries a tight Content-Security-Policy, X-Content-Type-Options: nosniff and X-Frame-Options: DENY.

Every request gets an id (a valid incoming X-Request-ID, else a new one, echoed in the response header) and one
JSON line on the `cifar10_cnn.serve` logger. On SIGTERM or SIGINT the server stops accepting, finishes the
requests in flight (up to GRACEFUL_TIMEOUT s), drains the inference thread and exits 0; before it listens
(imports, the model loading) the same signals end it with status 0 and one line.

Explanations (torch backend only) run in a thread of their own on a copy of the model (Captum hooks the model it
explains, so it must not be the object the inference thread runs), at most MAX_EXPLAIN_IMAGES per request and
EXPLAIN_BACKLOG requests queued or running; more is a 503 to retry, never an unbounded queue.

The package: app (routes, create_app), service (what each route answers), limits (request size, time and
connection limits, the graceful server), workers (batcher, explainer, decoder threads), observe (metrics, request
log), security (response headers), errors (ApiError). This module is light, so that serve() can take the
signals before the heavy imports (torch, FastAPI) start; the other names load their module on first use.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import UserError
from ..lazy import lazy_exports
from .limits import (
    BODY_TIMEOUT,
    GRACEFUL_TIMEOUT,
    HEADER_TIMEOUT,
    KEEP_ALIVE,
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    Limits,
    Timeouts,
)

# Public name -> the module of this package that defines it (imported on first use).
_EXPORTS = {
    "create_app": "app",
    "swagger_assets": "app",
    "STATIC": "app",
    "Service": "service",
    "read_uploads": "service",
    "ApiError": "errors",
    "Batcher": "workers",
    "Decoder": "workers",
    "Explainer": "workers",
    "make_explainer": "workers",
    "MAX_EXPLAIN_IMAGES": "workers",
    "BodyLimit": "limits",
    "GracefulServer": "limits",
    "TimedH11Protocol": "limits",
    "Metrics": "observe",
    "Observe": "observe",
    "request_id": "observe",
    "SecurityHeaders": "security",
}
SIGNALS = (signal.SIGTERM, signal.SIGINT)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


class WarmUpStopped(BaseException):
    """SIGTERM or SIGINT before the server listens. A BaseException (as KeyboardInterrupt is), so that no
    `except Exception` in the model's loading turns it into an error."""

    def __init__(self, sig: int):
        super().__init__(sig)
        self.sig = sig


@contextmanager
def serving_signals() -> Iterator[Callable[[Callable[[int, Any], None]], None]]:
    """SIGTERM/SIGINT while the modules import and the model loads: WarmUpStopped (else SIGTERM would kill the
    process with status 143). Yields hand_over(handler): from then on the signals go to the server's graceful
    stop, with no moment between where they kill. At the end the handlers from before are back. In the main
    thread only: signals can be taken nowhere else."""
    main = threading.current_thread() is threading.main_thread()

    def stop(sig: int, frame: Any) -> None:
        raise WarmUpStopped(sig)

    def hand_over(handler: Callable[[int, Any], None]) -> None:
        for sig in SIGNALS if main else ():
            signal.signal(sig, handler)

    previous = {sig: signal.signal(sig, stop) for sig in SIGNALS} if main else {}
    try:
        yield hand_over
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def check_address(
    port: int,
    max_upload_mb: float,
    max_connections: int = MAX_CONNECTIONS,
    max_files: int = 1,
    top_k: int = 1,
) -> None:
    """One line for a port outside 1-65535, an upload limit that is not a positive number of megabytes, or
    a connection, file or top-k limit below 1: before the heavy imports, so that a typo fails at once."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"--port {port}: give a port from 1 to 65535")
    Limits(max_upload_mb, max_files, 1, top_k, max_connections).check(1)


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, and the request lines of `cifar10_cnn.serve` as bare JSON lines on stdout."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["json_line"] = {"format": "%(message)s"}
    config["handlers"]["requests"] = {
        "class": "logging.StreamHandler",
        "formatter": "json_line",
        "stream": "ext://sys.stdout",
    }
    config["loggers"][__name__] = {"handlers": ["requests"], "level": level.upper(), "propagate": False}
    return config


def limits_line(settings: dict[str, float | int]) -> str:
    """The limits in one line, as printed at start (the same as /ready shows)."""
    return "limits: " + " ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()
    )


def uvicorn_server(
    app: Any, host: str, port: int, timeouts: Timeouts, max_connections: int, log_level: str
) -> Any:
    """The GracefulServer of the app, with the header deadline, the timeouts and the connection limit."""
    import uvicorn

    from .limits import GracefulServer, TimedH11Protocol

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
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return GracefulServer(config)


def announce(app: Any, host: str, port: int) -> None:
    """The line saying what is served where, and the limits."""
    service = app.state.service
    meta, shown = service.predictor.meta, f"[{host}]" if ":" in host else host
    print(
        f"serving {meta.name} ({meta.architecture}, {service.predictor.backend}) on "
        f"http://{shown}:{port}/  (API docs: /docs; metrics: /metrics; Ctrl-C stops)\n"
        + limits_line(service.settings()),
        flush=True,
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

    Every option is checked before the model loads. A signal before the server listens returns too, with one
    line on stderr."""
    check_address(port, max_upload_mb, max_connections, max_files, top_k_default)
    check_port(host, port)
    timeouts = Timeouts(header_timeout, body_timeout, keep_alive, graceful_timeout)
    try:
        with serving_signals() as hand_over:
            print(f"loading {model_path} ...", flush=True)  # the warm-up: the imports, then the model
            from .app import create_app  # torch and FastAPI: seconds

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
            server = uvicorn_server(app, host, port, timeouts, max_connections, log_level)
            announce(app, host, port)
            hand_over(server.handle_exit)
            server.run()
    except WarmUpStopped as e:
        name = signal.Signals(e.sig).name
        print(f"stopped during warm-up ({name}), before the server listened", file=sys.stderr, flush=True)
