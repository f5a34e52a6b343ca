"""The service's refusals: an HTTP status and one line for the client, echoing at most a short part of what the
client sent (a 100 KB query value is not sent back whole)."""

from __future__ import annotations

ECHO_CHARS = 40  # characters of a client's value a message repeats


class ApiError(Exception):
    """A request the service refuses: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason  # why an upload was refused (the metrics' label); None for other refusals


def clip(value: str, limit: int = ECHO_CHARS) -> str:
    """A client's value as a message repeats it: its first `limit` characters, and '…' when there were more."""
    return value if len(value) <= limit else value[:limit] + "…"
