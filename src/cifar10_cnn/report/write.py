"""The report's entry points: load, build the page, render it as Markdown and HTML, write both atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from ..runs import Run, write_atomic
from . import html_page, markdown_page
from .compare import comparison_figures, comparison_names, comparison_page, comparison_paths, load_comparable
from .load import ReportError, expand_runs, load_run
from .model import Page
from .run_page import run_page


def _write(page: Page, md_path: Path, html_path: Path) -> tuple[Path, Path]:
    md, page_html = markdown_page.render(page), html_page.render(page)  # both built before either is written
    write_atomic(md_path, md)
    write_atomic(html_path, page_html)
    return md_path, html_path


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write run_dir/report.md and a self-contained run_dir/report.html from the run directory's files."""
    run = load_run(Path(run_dir))
    return _write(run_page(run), Run(run.path).file("report_md"), Run(run.path).file("report_html"))


def write_comparison(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """report.md and a self-contained report.html comparing several runs; figures in <out stem>_plots/.

    Runs of one recipe (same config but the seed) are summarised as mean ± std, min and max.
    """
    runs = load_comparable([Path(p) for p in paths])
    if len(runs) < 2:
        raise ReportError("a comparison needs at least two runs")
    names = comparison_names(runs)
    md_path, html_path, fig_dir = comparison_paths(runs, out)
    fig_dir.mkdir(parents=True, exist_ok=True)
    page = comparison_page(runs, names, comparison_figures(runs, names, fig_dir))
    return _write(page, md_path, html_path)


def write_reports(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> list[Path]:
    """The CLI's `report`: one run's report.md/html rebuilt, or several runs compared; returns the HTML paths."""
    runs = expand_runs(list(paths))
    if len(runs) == 1:
        if out is not None:
            raise UserError(
                "--out names the comparison page of several runs; one run's report stays in its directory"
            )
        return [write_report(runs[0])[1]]
    return [write_comparison(runs, out)[1]]
