"""What a comparison of several runs says: the runs, each recipe's mean ± std over seeds, per-class accuracy."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..metrics import summarize
from ..runs import Run
from .fmt import NA, ci, ci_text, count, duration, flt, pct, value
from .load import ReportError, RunData, class_names, load_run, number
from .model import Figure, Headline, Page, Section, Table

# (results.json key, label, formatter) of the metrics summarised over runs.
COMPARED: list[tuple[str, str, Callable[[Any], str]]] = [
    ("test_accuracy", "test accuracy", pct),
    ("test_top2_accuracy", "top-2 accuracy", pct),
    ("macro_f1", "macro F1", pct),
    ("test_loss", "test NLL", flt),
    ("test_brier", "Brier score", flt),
    ("test_ece", "ECE", pct),
    ("test_ece_calibrated", "ECE after temperature", pct),
    ("temperature", "temperature", lambda v: flt(v, 3)),
    ("mean_corruption_accuracy", "mean corruption accuracy", pct),
    ("train_seconds", "train time", duration),
]


def _accuracy_problem(run: RunData) -> str | None:
    """Why a run cannot be compared (no readable test accuracy), or None. The same check as its own report."""
    if number(run.results.get("test_accuracy")) is not None:
        return None
    unreadable = [u for u in run.unreadable if u.startswith("results.json: test_accuracy ")]
    if unreadable:
        return (
            f"run {run.path} has no readable test accuracy ({unreadable[0]}); "
            f"evaluate it again: cifar10 evaluate {run.path}"
        )
    return f"run {run.path} has no test results yet; evaluate it first: cifar10 evaluate {run.path}"


def _listed(names: list[str], limit: int = 12) -> str:
    """Class names for a one-line message: the first few, each on the line."""
    shown = ", ".join(" ".join(n.split())[:40] for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_comparable(paths: Sequence[Path]) -> list[RunData]:
    """Every run loaded and checked before anything is written: results present, one class list."""
    runs = [load_run(p) for p in paths]
    for run in runs:
        problem = _accuracy_problem(run)
        if problem:
            raise ReportError(problem)
    first = class_names(runs[0].results)
    for run in runs[1:]:
        names = class_names(run.results)
        if names != first:
            raise ReportError(
                f"runs {runs[0].path} and {run.path} have different class lists ({_listed(first)} vs "
                f"{_listed(names)}); compare runs of the same classes only"
            )
    return runs


def comparison_names(runs: list[RunData]) -> list[str]:
    """Each run's path relative to the runs' common folder (unique where the folder names alone are not)."""
    resolved = [r.path.resolve() for r in runs]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    names = [str(p.relative_to(common)) if p != common else p.name for p in resolved]
    return [n if n != "." else r.name for n, r in zip(names, runs, strict=True)]


def comparison_paths(runs: list[RunData], out: str | os.PathLike | None) -> tuple[Path, Path, Path]:
    """(report.md, report.html, folder of figures): by default report.html in the runs' common folder."""
    if out is None:
        out = Path(os.path.commonpath([r.path.resolve() for r in runs])) / "report.html"
    html_path = Path(out)
    if html_path.suffix.lower() != ".html":
        html_path = html_path / "report.html" if html_path.is_dir() else html_path.with_suffix(".html")
    return html_path.with_suffix(".md"), html_path, html_path.with_name(f"{html_path.stem}_plots")


def comparison_figures(runs: list[RunData], names: list[str], fig_dir: Path) -> list[Figure]:
    """Accuracy with intervals, overlaid training curves and robustness by severity, drawn into fig_dir."""
    from .. import plots  # here, not at the top: one run's report draws nothing and loads no matplotlib

    link, results = f"{fig_dir.name}/", [r.results for r in runs]
    plots.plot_run_comparison(
        names, [r["test_accuracy"] for r in results], [ci(r) for r in results], fig_dir / "accuracy.png",
        ece=[number(r.get("test_ece")) for r in results],
    )  # fmt: skip
    figures = [Figure(fig_dir / "accuracy.png", "Test accuracy of each run with its 95% interval, "
                      "and its expected calibration error.", link + "accuracy.png")]  # fmt: skip
    curves = {name: run.metrics for name, run in zip(names, runs, strict=True) if run.metrics}
    if curves:
        plots.plot_runs_curves(curves, fig_dir / "curves.png")
        figures.append(
            Figure(fig_dir / "curves.png", "Training curves of all runs overlaid.", link + "curves.png")
        )
    robust = _comparable_robustness(runs, names)
    if robust:
        plots.plot_corruptions(
            {n: r["mean_by_severity"] for n, r in robust.items()},
            {n: r["clean_accuracy"] for n, r in robust.items()},
            fig_dir / "corruptions.png",
            title="Mean accuracy over the corruptions by severity, per run (regenerated CIFAR-10-C approximation)",
            mean_label="mean over runs",
        )
        figures.append(Figure(fig_dir / "corruptions.png", "Mean accuracy over the 10 corruptions by severity, "
                              "one line per run.", link + "corruptions.png"))  # fmt: skip
    return figures


def _comparable_robustness(runs: list[RunData], names: list[str]) -> dict[str, dict[str, Any]]:
    """The runs' robustness records that can share one plot: with a clean accuracy, as many severities as the
    first."""
    robust = {
        n: r.robustness
        for n, r in zip(names, runs, strict=True)
        if r.robustness and number(r.robustness.get("clean_accuracy")) is not None
    }
    lengths = [len(r["mean_by_severity"]) for r in robust.values()]
    return {n: r for n, r in robust.items() if len(r["mean_by_severity"]) == lengths[0]}


def _group_key(run: RunData) -> str:
    """Runs of one recipe: the same config but for the seed (and where they ran)."""
    config = {k: v for k, v in run.config.items() if k not in ("seed", "device")}
    if not config:
        config = {"model": run.results.get("model"), "recipe": run.results.get("recipe")}
    return json.dumps(config, sort_keys=True, default=str)


def _group_name(runs: list[RunData]) -> str:
    c, r = runs[0].config, runs[0].results
    return f"recipe {value(c.get('recipe', r.get('recipe')))}, model {value(c.get('model', r.get('model')))}"


def _runs_table(runs: list[RunData], names: list[str]) -> Table:
    """One row per run: what it is and its headline figures."""
    rows = []
    for name, run in zip(names, runs, strict=True):
        r, c = run.results, run.config
        rows.append([
            name,
            value(r.get("model", c.get("model"))),
            value(c.get("recipe", r.get("recipe"))),
            value(c.get("seed")),
            count(r.get("epochs_run")),
            duration(r.get("train_seconds")),
            f"{pct(r.get('test_accuracy'))} ({ci_text(r)})",
            flt(r.get("test_loss")),
            pct(r.get("test_ece")),
            pct(r.get("test_ece_calibrated")),
            flt(r.get("temperature"), 3),
            pct(r.get("mean_corruption_accuracy")) if run.robustness else NA,
        ])  # fmt: skip
    headers = ["run", "model", "recipe", "seed", "epochs", "train time", "test accuracy (95% interval)",
               "test NLL", "ECE", "ECE after T", "temperature T", "mean corruption acc."]  # fmt: skip
    return Table(headers, rows, set(range(3, len(headers))))


def _group_stats(group: list[RunData]) -> Table:
    """Mean ± sample std, min and max over the runs of one recipe, per compared metric."""
    rows = []
    for key, label, fmt in COMPARED:
        # Robustness counts only where it was measured on the weights evaluated.
        values = [
            number(run.results.get(key))
            for run in group
            if key != "mean_corruption_accuracy" or run.robustness
        ]
        values = [v for v in values if v is not None]
        if not values:
            continue
        s = summarize(values)
        std = f"{s['std'] * 100:.2f} points" if fmt is pct else fmt(s["std"])
        rows.append([label, f"{fmt(s['mean'])} ± {std}", fmt(s["min"]), fmt(s["max"]), str(s["n"])])
    return Table(["metric", "mean ± std", "min", "max", "runs"], rows, {1, 2, 3, 4})


def _recipe_section(runs: list[RunData], names: list[str]) -> Section:
    """The runs grouped by recipe; each group of two or more summarised."""
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(_group_key(run), []).append(i)
    section = Section("Runs of one recipe: mean ± std over seeds")
    for members in groups.values():
        if len(members) < 2:
            continue
        group = [runs[i] for i in members]
        section.blocks += [
            f"{_group_name(group)}: {len(group)} runs ({', '.join(names[i] for i in members)}); std is the sample "
            "standard deviation over runs.",
            _group_stats(group),
        ]
    if not section.blocks:
        section.blocks.append("No two runs share a recipe (the same config but for the seed).")
    return section


def _per_class_comparison(runs: list[RunData], names: list[str]) -> Table:
    rows = []
    for c in class_names(runs[0].results):
        row = [c]
        for run in runs:
            pc = run.results.get("per_class_accuracy")
            row.append(pct(pc.get(c)) if isinstance(pc, dict) else NA)
        rows.append(row)
    return Table(["class", *names], rows, set(range(1, len(names) + 1)))


def comparison_page(runs: list[RunData], names: list[str], figures: list[Figure]) -> Page:
    """The comparison page: a summary card, then the runs, the recipes, the plots and per-class accuracy."""
    results = [r.results for r in runs]
    best = max(range(len(runs)), key=lambda i: results[i]["test_accuracy"])
    s = summarize([r["test_accuracy"] for r in results])
    spread = f"± {s['std'] * 100:.2f} points (std), min {pct(s['min'])}, max {pct(s['max'])}"
    links = [f"{name}: `{Run(run.path).file('report_html')}`" for name, run in zip(names, runs, strict=True)]
    return Page(
        title=f"Comparison of {len(runs)} runs",
        lead=(
            f"{len(runs)} runs; best test accuracy {pct(results[best]['test_accuracy'])} ({names[best]})",
            "",
        ),
        headlines=[Headline("Mean test accuracy", pct(s["mean"]), spread)],
        facts=[
            (n, f"{pct(r['test_accuracy'])}, ECE {pct(r.get('test_ece'))}")
            for n, r in zip(names, results, strict=True)
        ],
        sections=[
            Section("Runs", [_runs_table(runs, names)]),
            _recipe_section(runs, names),
            Section("Plots", list(figures)),
            Section("Per-class test accuracy", [_per_class_comparison(runs, names)]),
            Section("Each run's own report", ["; ".join(links)]),
        ],
        notes=[
            f"Could not read in {name} (shown as n/a): {'; '.join(run.unreadable)}."
            for name, run in zip(names, runs, strict=True)
            if run.unreadable
        ],
    )
