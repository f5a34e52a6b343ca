"""What a client may take: the size of a request, the time its headers and body may take, the connections open
at once; and the server that ends with status 0 after a graceful SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import UserError
from .errors import ApiError

MULTIPART_SLACK = 1 << 20  # headers and boundaries around the files
HEADER_TIMEOUT = 10.0  # seconds for a request's headers, from the connection or the previous response
BODY_TIMEOUT = 60.0  # seconds for a whole request body
KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open
MAX_UPLOAD_MB = 1024.0  # the largest --max-upload-mb accepted
GRACEFUL_TIMEOUT = 30.0  # seconds the requests in flight have to finish after SIGTERM
MAX_CONNECTIONS = 64  # open connections and requests in progress; beyond that uvicorn answers 503 at once
MAX_HEADER_BYTES = 16 * 1024  # request line and headers (uvicorn's default, stated)


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


DEFAULT_TIMEOUTS = Timeouts()


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
