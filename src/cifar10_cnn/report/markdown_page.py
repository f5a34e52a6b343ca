"""How a report page looks in Markdown (report.md): GitHub-flavoured tables, figures as relative links."""

from __future__ import annotations

from urllib.parse import quote

from .model import Block, Figure, Page, Table


def _cell(text: str) -> str:
    # Pipes would split the cell; angle brackets would be taken as raw HTML by most renderers.
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def table(t: Table) -> str:
    align = ["---:" if i in t.align_right else "---" for i in range(len(t.headers))]
    lines = ["| " + " | ".join(_cell(h) for h in t.headers) + " |", "| " + " | ".join(align) + " |"]
    for n, row in enumerate(t.rows):
        cells = [_cell(c) for c in row]
        if n in t.highlight:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _block(block: Block) -> list[str]:
    if isinstance(block, Table):
        return [table(block), ""]
    if isinstance(block, Figure):
        link = "/".join(quote(part) for part in block.link.split("/"))
        return [f"![{block.caption}]({link})", "", f"*{block.caption}*", ""]
    return [block, ""] if block else []


def render(page: Page) -> str:
    """The page as Markdown: the lead line, the summary table and notes, then each section."""
    bold, rest = page.lead
    out = [f"# {page.title}", "", f"**{bold}**{rest}", ""]
    if page.summary:
        out += [table(page.summary), ""]
    for note in page.notes:
        out += [note, ""]
    for section in page.sections:
        out += [f"## {section.heading}", ""]
        for block in section.blocks:
            out += _block(block)
    return "\n".join(out)
