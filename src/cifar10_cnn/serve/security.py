"""What a browser may do with the service's answers: a tight Content-Security-Policy on every response, no MIME
sniffing, no framing.

The page (static/) loads only its own script and style sheet; its images are data: URLs (the model's input, the
heatmaps) and blob: URLs (the preview of a dropped file). /docs is Swagger UI, whose page starts it with one
inline script: that script alone is allowed, by its hash.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
EXTERNAL = re.compile(r'(?:src|href)="(https://[^/"]+)')


def policy_for_page(html: str) -> str:
    """The policy of a page of ours that needs inline scripts (Swagger UI's start): those scripts by their hash,
    and the origins it loads scripts and styles from (the CDN, when Swagger UI's files are not installed)."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in INLINE_SCRIPT.findall(html)
    ]
    origins = sorted(set(EXTERNAL.findall(html)))
    scripts = " ".join(["'self'", *origins, *hashes])
    styles = " ".join(["'self'", *origins])
    images = " ".join(["'self' data:", *origins])
    return (
        f"default-src 'self'; script-src {scripts}; style-src {styles}; img-src {images}; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


class SecurityHeaders:
    """ASGI middleware: HEADERS on every HTTP response, unless the response set its own policy."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
