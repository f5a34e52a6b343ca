"""What a report page says, as plain data; the renderers (markdown_page.py, html_page.py) decide its look."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    align_right: set[int] = field(default_factory=set)
    highlight: set[int] = field(default_factory=set)  # row indices to emphasise


@dataclass
class Figure:
    path: Path
    caption: str
    link: str  # how the Markdown file refers to it (relative path)


Block = str | Table | Figure  # str: a paragraph, with `code` spans


@dataclass
class Section:
    heading: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Headline:
    label: str
    value: str
    sub: str = ""
    second: bool = False  # drawn smaller, in the second colour


@dataclass
class Page:
    """One report page. Markdown shows lead, summary and notes; HTML the card (headlines, facts) and notes."""

    title: str
    lead: tuple[str, str]  # Markdown's first line: (bold part, the rest)
    headlines: list[Headline]
    facts: list[tuple[str, str]]
    sections: list[Section]
    summary: Table | None = None
    notes: list[str] = field(
        default_factory=list
    )  # under the summary: the test protocol, what was unreadable
