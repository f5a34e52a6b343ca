"""How a report page looks in HTML: one self-contained file (CSS inline, figures as data URIs, no script).

The page is static/report/page.html.j2, rendered by Jinja2 with autoescape, so no value can reach the page
unescaped; the CSS is static/report/report.css.
"""

from __future__ import annotations

import base64
import functools
import html
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from .load import MAX_PNG_BYTES, ReportError, read_bounded
from .model import Figure, Page, Table

STATIC = resources.files("cifar10_cnn") / "static" / "report"


def _escape(value: Any) -> Markup:
    # The standard library's entities (&#x27; for '), as the pages have always had; markup stays markup.
    return value if isinstance(value, Markup) else Markup(html.escape(str(value), quote=True))


def _code_spans(text: str) -> Markup:
    """Escaped text with `code` spans, the only Markdown the report's paragraphs use."""
    parts = html.escape(text, quote=True).split("`")
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


def _data_uri(path: Path) -> Markup:
    data = read_bounded(path, MAX_PNG_BYTES)
    if data is None:
        raise ReportError(f"{path} disappeared while the report was written; run the report again")
    # Base64 holds no character that HTML would need escaped: marked safe, so 1 MB is not scanned five times.
    return Markup("data:image/png;base64," + base64.b64encode(data).decode("ascii"))


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        autoescape=True,
        finalize=_escape,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(code_spans=_code_spans, data_uri=_data_uri)
    env.tests.update(table=lambda b: isinstance(b, Table), figure=lambda b: isinstance(b, Figure))
    return env.from_string((STATIC / "page.html.j2").read_text(encoding="utf-8"))


def render(page: Page) -> str:
    """The page as one self-contained HTML document."""
    css = Markup((STATIC / "report.css").read_text(encoding="utf-8"))  # our own file: not escaped
    return _template().render(page=page, css=css)
