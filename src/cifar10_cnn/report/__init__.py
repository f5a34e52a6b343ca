"""The run report: Markdown and one self-contained HTML file, built from run directories alone.

    cifar10 report runs/<run>                        # rebuild the run's report.md and report.html
    cifar10 report runs/a runs/b ... [--out F.html]  # compare runs side by side (mean ± std per recipe)

Reads ``config.json``, ``metrics.csv``, ``results.json``, ``eval/*.json`` and the PNGs in ``plots/`` and
``eval/``; never a trainer or model. Any of them may be missing or incomplete (a run stopped before
evaluation): absent values read "n/a". Hostile files are bounded and checked (load.py).

    load.py                    the run directory as checked plain data (RunData)
    fmt.py                     values as text
    model.py                   a page as plain data: Page, Section, Table, Figure, Headline
    tables.py, run_page.py     what one run's report says
    compare.py                 what the comparison of several runs says
    markdown_page.py, html_page.py   how a page looks (HTML: static/report/page.html.j2 and report.css)
    write.py                   the entry points below
"""

from .load import ReportError, RunNotFound, expand_runs
from .write import write_comparison, write_report, write_reports

__all__ = [
    "ReportError",
    "RunNotFound",
    "expand_runs",
    "write_comparison",
    "write_report",
    "write_reports",
]
