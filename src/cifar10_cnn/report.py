"""The run report: Markdown and one self-contained HTML file, built from run directories alone.

    cifar10 report runs/<run>                        # rebuild the run's report.md and report.html
    cifar10 report runs/a runs/b ... [--out F.html]  # compare runs side by side (mean ± std per recipe)

Reads ``config.json``, ``metrics.csv``, ``results.json``, ``eval/*.json`` and the PNGs in ``plots/`` and
``eval/``; never a trainer or model. Any of them may be missing or incomplete (a run stopped before
evaluation): absent values read "n/a".
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import plots
from .data import CLASSES
from .errors import UserError
from .metrics import accuracy_interval, summarize
from .runs import RUN_FILES, SEEDS_SUMMARY, Run, read_json, write_atomic

__all__ = [
    "ReportError",
    "RunNotFound",
    "write_comparison",
    "write_report",
    "write_reports",
]

NA = "n/a"


class RunNotFound(UserError, FileNotFoundError):
    """A path that is not a run directory."""


class ReportError(UserError, ValueError):
    """Run files that cannot make a report (unreadable JSON, runs that cannot be compared)."""


# Known figures (runs.RUN_FILES keys) with captions; other PNGs in plots/ follow, captioned by name.
FIGURES = {
    "reliability_png": "Reliability diagram on the test set: accuracy against confidence in 15 bins, "
    "before and after temperature scaling; bars below the diagonal are over-confident. The grey bars show "
    "where the images are.",
    "confusion_png": "Confusion matrix on the test set: rows are true classes, columns predicted classes.",
    "per_class_png": "Test precision, recall (accuracy) and F1 per class; the dashed line is the mean "
    "accuracy over classes.",
    "confident_errors_png": "The test images the model got wrong with the highest confidence.",
    "explanations_png": "Grad-CAM heatmaps of test images: each input, then the map of its true class and of "
    "the predicted class (for correct predictions, of the runner-up class), with the model's probability of "
    "each; red is where the evidence for that class is.",
    "predictions_png": "Sample test predictions with confidence: green titles are right, red are wrong.",
    "corruptions_png": "Test accuracy under each corruption by severity (regenerated CIFAR-10-C "
    "approximation); the dashed black line is the mean over corruptions.",
    "curves_png": "Loss and accuracy per epoch (train and validation); the dotted line marks the best "
    "validation epoch.",
    "augmentations_png": "Training images as the model sees them, after augmentation.",
}
SECTION_FIGURES = {
    "calibration": ["reliability_png"],
    "classes": ["per_class_png", "confusion_png"],
    "errors": ["confident_errors_png", "predictions_png"],
    "explanations": ["explanations_png"],
    "robustness": ["corruptions_png"],
    "training": ["curves_png", "augmentations_png"],
}

ROBUSTNESS_HINT = "Not measured: `cifar10 evaluate RUN --corruptions` adds it."
EXPLANATIONS_HINT = "Not computed: `cifar10 evaluate RUN` adds it (with Captum installed)."


@dataclass
class _Run:
    """What the report needs from a run directory, as plain data."""

    name: str
    path: Path = field(default_factory=Path)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, float | None]] = field(default_factory=list)  # metrics.csv
    results: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval/metrics.json
    robustness: dict[str, Any] = field(default_factory=dict)  # eval/robustness.json, for these weights
    figures: dict[str, Path] = field(default_factory=dict)  # FIGURES key -> file
    extra_plots: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    align_right: set[int] = field(default_factory=set)
    highlight: set[int] = field(default_factory=set)  # row indices to emphasise


@dataclass
class _Figure:
    path: Path
    caption: str
    link: str  # how the Markdown file refers to it (relative path)


@dataclass
class _Section:
    heading: str
    blocks: list[str | _Table | _Figure] = field(default_factory=list)  # str: a paragraph


# ----------------------------------------------------------------------------- reading


def _load_run(run_dir: Path) -> _Run:
    run = Run(Path(run_dir))
    if not run.path.is_dir():
        raise RunNotFound(f"run directory {run.path} does not exist; pass the directory of a training run")
    names = [RUN_FILES[key] for key in ("config", "metrics", "results")]
    if not any((run.path / n).exists() for n in names):
        raise RunNotFound(f"{run.path} is not a run directory: none of {', '.join(names)} found")
    config = read_json(run.file("config"))
    evaluation = read_json(run.file("evaluation"))
    robustness = read_json(run.file("robustness"))
    if robustness.get("model_fingerprint") != evaluation.get("model_fingerprint"):
        robustness = {}  # measured on other weights than the ones evaluated
    figures = {key: run.file(key) for key in FIGURES if run.file(key).is_file()}
    if not robustness:
        figures.pop("corruptions_png", None)
    if not _explained(evaluation):
        figures.pop("explanations_png", None)  # not from this evaluation
    plots_dir = run.dir("plots")
    known = {run.file(key) for key in FIGURES}
    found = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    extra = [(p, p.stem.replace("_", " ").capitalize() + ".") for p in found if p not in known]
    name = str(config.get("run_name") or config.get("name") or run.path.resolve().name)
    return _Run(
        name, run.path, config, run.read_metrics(), run.read_results(), evaluation, robustness, figures, extra
    )


# ----------------------------------------------------------------------------- formatting


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, empty, null and NaN values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _pct(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage; values above 1 are taken as already in percent."""
    x = _number(value)
    if x is None:
        return NA
    return f"{x * 100 if abs(x) <= 1.0 else x:.{digits}f}%"


def _float(value: Any, digits: int = 4) -> str:
    x = _number(value)
    return NA if x is None else f"{x:.{digits}f}"


def _lr(value: Any) -> str:
    x = _number(value)
    return NA if x is None else f"{x:.4g}"


def _int(value: Any) -> str:
    x = _number(value)
    return NA if x is None else f"{round(x):,}"


def _tta(r: dict[str, Any]) -> str:
    """ "level 2", or "level 2 on 28% of the images (top-two margin < 0.4)" for selective TTA."""
    if not r.get("tta"):
        return _yes_no(r.get("tta"))
    margin, share = _number(r.get("tta_margin")), _number(r.get("tta_share"))
    if margin is None or margin >= 1 or share is None:
        return f"level {r['tta']}"
    return f"level {r['tta']} on {share:.0%} of the images (top-two margin < {margin:g})"


def _duration(value: Any) -> str:
    x = _number(value)
    if x is None:
        return NA
    if x < 60:
        return f"{x:.1f} s"
    minutes, seconds = divmod(round(x), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def _params(value: Any) -> str:
    x = _number(value)
    if x is None:
        return NA
    return f"{int(x):,} ({x / 1e6:.2f}M)" if x >= 1e5 else f"{int(x):,}"


def _yes_no(value: Any) -> str:
    return NA if value is None else ("yes" if value else "no")


def _value(value: Any) -> str:
    """A config value as text: JSON for containers, plain text for scalars."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# ----------------------------------------------------------------------------- content of one run


# Above this many classes the report lists the most frequent confusions instead of the whole count matrix.
MATRIX_CLASSES = 20
CONFUSED_PAIRS = 20


def _class_names(results: dict[str, Any]) -> list[str]:
    names = results.get("class_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    per_class = results.get("per_class_accuracy")
    if isinstance(per_class, dict) and per_class:
        return [str(n) for n in per_class]
    return list(CLASSES)


def _data_source(results: dict[str, Any]) -> str:
    data = results.get("data")
    if not isinstance(data, dict):
        return NA
    source = str(data.get("source") or NA)
    if data.get("kind") == "folder":
        return f"{source} ({_folder_notes(data)})"
    verified = data.get("verified")
    how = "md5" if data.get("kind") == "cifar100" else "sha256"
    check = NA if verified is None else (f"{how} verified" if verified else "NOT verified")
    return f"{source} ({check})"


def _folder_notes(data: dict[str, Any]) -> str:
    """What a folder of images gave: its classes, the files skipped (the first named), leakage."""
    classes = data.get("classes") if isinstance(data.get("classes"), list) else []
    parts = [f"your own images, {len(classes)} classes"]
    skipped, first = _number(data.get("skipped")) or 0, data.get("skipped_first")
    if skipped:
        names = "; ".join(str(x) for x in first) if isinstance(first, list) else ""
        parts.append(
            f"{int(skipped):,} files skipped, not readable images" + (f" (first: {names})" if names else "")
        )
    duplicates = _number(data.get("train_test_duplicates")) or 0
    if duplicates:
        parts.append(f"warning: {int(duplicates):,} test images identical to training images (leakage)")
    return "; ".join(parts)


def _ci(results: dict[str, Any]) -> tuple[float, float] | None:
    """The stored 95% Wilson interval of the test accuracy, else the same computed from accuracy and size."""
    stored = results.get("test_accuracy_ci95")
    if isinstance(stored, list) and len(stored) == 2 and all(_number(v) is not None for v in stored):
        return float(stored[0]), float(stored[1])
    p, n = _number(results.get("test_accuracy")), _number(results.get("test_size"))
    if p is None or n is None or n < 1 or not 0.0 <= p <= 1.0:
        return None
    return accuracy_interval(round(p * n), round(n))


def _ci_text(results: dict[str, Any]) -> str:
    ci = _ci(results)
    return NA if ci is None else f"{ci[0] * 100:.2f}% to {ci[1] * 100:.2f}%"


def _ece_text(results: dict[str, Any]) -> str:
    ece = _pct(results.get("test_ece"))
    after, t = _number(results.get("test_ece_calibrated")), _number(results.get("temperature"))
    if ece != NA and after is not None and t is not None:
        return f"{ece} ({after * 100:.2f}% after temperature {t:.3f})"
    return ece


def _summary(run: _Run) -> list[tuple[str, str]]:
    r, c = run.results, run.config
    epochs = _int(r.get("epochs_run"))
    if epochs != NA and _number(c.get("epochs")) is not None:
        epochs += f" of {_int(c.get('epochs'))}"
    best_epoch = _int(r.get("best_epoch"))
    best = _pct(r.get("best_val_accuracy"))
    if best != NA and best_epoch != NA:
        best += f" (epoch {best_epoch})"
    return [
        ("Test accuracy", _pct(r.get("test_accuracy"))),
        ("95% interval (Wilson)", _ci_text(r)),
        ("Calibration error (ECE, 15 bins)", _ece_text(r)),
        ("Model", _value(r.get("model", c.get("model")))),
        ("Parameters", _params(r.get("params"))),
        ("Recipe", _value(c.get("recipe", r.get("recipe")))),
        ("Data", _data_source(r)),
        ("Train time", _duration(r.get("train_seconds"))),
        ("Top-2 accuracy", _pct(r.get("test_top2_accuracy"))),
        ("Test loss (NLL)", _float(r.get("test_loss"))),
        ("Macro F1", _pct(r.get("macro_f1"))),
        ("Mean corruption accuracy", _pct(r.get("mean_corruption_accuracy")) if run.robustness else NA),
        ("Best validation accuracy", best),
        (
            "Train / val / test images",
            " / ".join(_int(r.get(k)) for k in ("train_size", "val_size", "test_size")),
        ),
        ("Epochs run", epochs),
        ("Stopped early", _yes_no(r.get("stopped_early"))),
        ("Weights evaluated", _value(r.get("weights"))),
        ("Test-time augmentation", _tta(r)),
        ("Device", _value(r.get("device", c.get("device")))),
        ("Test accuracy known after", _duration(r.get("headline_seconds"))),
        ("Evaluation time", _duration(r.get("eval_seconds"))),
        ("Created", _value(r.get("created"))),
    ]


def _protocol_sentence(run: _Run) -> str:
    """How the test set was used: stated, because reusing it for selection inflates the figure."""
    test = _int(run.results.get("test_size"))
    test_part = f"The test set ({test} images)" if test != NA else "The test set"
    val = _number(run.results.get("val_size", run.config.get("val_size")))
    if val is None:
        return f"{test_part} was used only for this final evaluation."
    if val > 0:
        return (
            f"{test_part} was used only for this final evaluation; model selection "
            f"(best epoch, early stopping) and the temperature used the validation split of {int(val):,} "
            "images held out from the training set."
        )
    return (
        f"{test_part} was used only for this final evaluation. No validation split was held out, "
        "so no model selection was done: the weights are those of the last epoch."
    )


def _most_confused(counts: list[float], i: int, names: list[str]) -> str:
    total = sum(counts)
    others = [(v, j) for j, v in enumerate(counts) if j != i]
    if not others or not total:
        return NA
    v, j = max(others)
    return f"{names[j]} ({v / total * 100:.1f}%)" if v > 0 else "none"


def _valid_cm(cm: Any, n: int) -> bool:
    return (
        isinstance(cm, list) and len(cm) == n and all(isinstance(row, list) and len(row) == n for row in cm)
    )


def _per_class_table(run: _Run) -> _Table | None:
    r = run.results
    names = _class_names(r)
    per_class = r.get("per_class_accuracy") if isinstance(r.get("per_class_accuracy"), dict) else {}
    scores = r.get("per_class") if isinstance(r.get("per_class"), dict) else {}
    cm = r.get("confusion_matrix")
    valid_cm = _valid_cm(cm, len(names))
    if not per_class and not valid_cm:
        return None
    rows = []
    for i, name in enumerate(names):
        acc, correct, confused = per_class.get(name), NA, NA
        if valid_cm:
            counts = [_number(v) or 0.0 for v in cm[i]]
            total = sum(counts)
            correct = f"{int(counts[i]):,} / {int(total):,}"
            if acc is None and total:
                acc = counts[i] / total
            confused = _most_confused(counts, i, names)
        s = scores.get(name) if isinstance(scores.get(name), dict) else {}
        rows.append([name, _pct(acc), _pct(s.get("precision")), _pct(s.get("f1")), correct, confused])
    headers = ["class", "accuracy (recall)", "precision", "F1", "correct / total", "most often predicted as"]
    return _Table(headers, rows, {1, 2, 3, 4})


def _confusion_table(run: _Run) -> _Table | None:
    names = _class_names(run.results)
    cm = run.results.get("confusion_matrix")
    if not _valid_cm(cm, len(names)):
        return None
    if (
        len(names) > MATRIX_CLASSES
    ):  # a 100 x 100 table reads as noise: the largest off-diagonal cells instead
        return _confused_pairs(names, [[_number(v) or 0.0 for v in row] for row in cm])
    rows = [[f"true {name}"] + [_int(v) for v in row] for name, row in zip(names, cm, strict=True)]
    return _Table(["counts", *names], rows, set(range(1, len(names) + 1)))


def _confused_pairs(names: list[str], cm: list[list[float]]) -> _Table:
    cells = sorted(
        ((-v, i, j) for i, row in enumerate(cm) for j, v in enumerate(row) if i != j and v > 0),
        key=lambda c: c[:3],
    )[:CONFUSED_PAIRS]
    rows = [[names[i], names[j], _int(-v), _pct(-v / sum(cm[i])) if sum(cm[i]) else NA] for v, i, j in cells]
    return _Table(["true class", "predicted as", "images", "% of the true class"], rows, {2, 3})


def _calibration_table(run: _Run) -> _Table | None:
    cal = run.evaluation.get("calibration")
    if not isinstance(cal, dict) or not isinstance(cal.get("uncalibrated"), dict):
        return None
    before, after = cal["uncalibrated"], cal.get("calibrated") or {}
    rows = [
        ["accuracy", _pct(before.get("accuracy")), _pct(after.get("accuracy"))],
        ["negative log-likelihood (nats)", _float(before.get("nll")), _float(after.get("nll"))],
        ["Brier score (0 to 2)", _float(before.get("brier")), _float(after.get("brier"))],
        ["expected calibration error (ECE)", _pct(before.get("ece")), _pct(after.get("ece"))],
        ["maximum calibration error (MCE)", _pct(before.get("mce")), _pct(after.get("mce"))],
        ["mean confidence", _pct(before.get("mean_confidence")), _pct(after.get("mean_confidence"))],
    ]
    t = _number(cal.get("temperature"))
    after_head = (
        f"after temperature scaling (T = {t:.3f})" if t is not None else "after (no temperature fitted)"
    )
    return _Table(["test set", "before", after_head], rows, {1, 2})


def _robustness_table(run: _Run) -> _Table | None:
    rob = run.robustness
    table = rob.get("accuracy")
    if not isinstance(table, dict) or not table:
        return None
    severities = rob.get("severities") or list(range(1, len(next(iter(table.values()))) + 1))
    rows = [
        [name.replace("_", " ")] + [_pct(v, 1) for v in values] + [_pct(sum(values) / len(values), 1)]
        for name, values in table.items()
    ]
    by_severity = rob.get("mean_by_severity") or []
    rows.append(
        ["mean over corruptions"]
        + [_pct(v, 1) for v in by_severity]
        + [_pct(rob.get("mean_corruption_accuracy"), 1)]
    )
    headers = ["corruption"] + [f"severity {s}" for s in severities] + ["mean"]
    return _Table(headers, rows, set(range(1, len(headers))), {len(rows) - 1})


def _metrics_table(run: _Run) -> _Table | None:
    if not run.metrics:
        return None
    best = _number(run.results.get("best_epoch"))
    rows, highlight = [], set()
    for i, m in enumerate(run.metrics):
        row = [
            _int(m.get("epoch")),
            _float(m.get("train_loss")),
            _pct(m.get("train_acc")),
            _float(m.get("val_loss")),
            _pct(m.get("val_acc")),
            _lr(m.get("lr")),
            _float(m.get("seconds"), 1),
        ]
        if best is not None and _number(m.get("epoch")) == best:
            row[0] += " (best)"
            highlight.add(i)
        rows.append(row)
    headers = ["epoch", "train loss", "train acc", "val loss", "val acc", "lr", "seconds"]
    return _Table(headers, rows, set(range(len(headers))), highlight)


def _config_table(run: _Run) -> _Table | None:
    if not run.config:
        return None
    # An explicit null in the config means "off" (e.g. no subset), not "unknown".
    rows = [[str(k), "none" if v is None else _value(v)] for k, v in run.config.items()]
    return _Table(["setting", "value"], rows)


def _explained(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The images of eval/metrics.json's Grad-CAM figure (none: not computed, or Captum missing)."""
    x = evaluation.get("explanations")
    images = x.get("images") if isinstance(x, dict) else None
    return [i for i in images if isinstance(i, dict)] if isinstance(images, list) else []


def _explanations_section(run: _Run) -> _Section:
    section = _Section("Where the model looks")
    x = run.evaluation.get("explanations")
    figures = _figures(run, "explanations")
    if not figures:
        note = x.get("note") if isinstance(x, dict) else None
        section.blocks.append(
            f"Not computed: {note}." if isinstance(note, str) and note else EXPLANATIONS_HINT
        )
        return section
    section.blocks.append(
        f"{_value(x.get('method'))} on layer `{_value(x.get('layer'))}` for {len(_explained(run.evaluation))} "
        f"test images, computed in {_duration(x.get('seconds'))}: where in each image the evidence for a class "
        "is. A map that covers the background rather than the object is a reason to doubt the prediction. "
        "`cifar10 explain RUN IMAGES` does the same for any image."
    )
    return _Section(section.heading, section.blocks + figures)


def _figures(run: _Run, section: str) -> list[_Figure]:
    return [
        _Figure(run.figures[key], FIGURES[key], RUN_FILES[key])
        for key in SECTION_FIGURES[section]
        if key in run.figures
    ]


def _sections(run: _Run) -> list[_Section]:
    """The report's sections in reading order."""
    no_results = "results.json not found: no evaluation yet."
    cal = run.evaluation.get("calibration") if isinstance(run.evaluation.get("calibration"), dict) else {}
    calibration = _Section("Calibration")
    if cal:
        calibration.blocks.append(str(cal.get("note") or ""))
    calibration.blocks += [_calibration_table(run) or "Not measured yet: `cifar10 evaluate RUN` adds it."]
    calibration.blocks += _figures(run, "calibration")
    calibration.blocks.append(
        "ECE: the image-weighted mean of |accuracy − confidence| over 15 equal-width confidence bins; MCE: the "
        "largest gap of any bin (bins with few images make it noisy). NLL and Brier score are proper scoring "
        "rules: lower is better."
    )

    classes = _Section("Per-class results", [_per_class_table(run) or no_results])
    classes.blocks += _figures(run, "classes")
    cm = _confusion_table(run)
    if cm and len(_class_names(run.results)) > MATRIX_CLASSES:
        classes.blocks += [
            f"The {CONFUSED_PAIRS} most frequent confusions (the full matrix is in results.json):",
            cm,
        ]
    elif cm:
        classes.blocks += ["Confusion matrix, counts (rows true class, columns predicted class):", cm]

    errors = _Section("Errors", _figures(run, "errors") or ["No prediction plots found."])
    explanations = _explanations_section(run)

    robustness = _Section("Robustness to common corruptions")
    if run.robustness:
        rob = run.robustness
        robustness.blocks.append(
            f"{rob.get('note', '')} Measured on the first {_int(rob.get('images'))} test images without "
            f"test-time augmentation (seed {_value(rob.get('seed'))}); clean accuracy on them "
            f"{_pct(rob.get('clean_accuracy'))}, mean corruption accuracy "
            f"{_pct(rob.get('mean_corruption_accuracy'))}."
        )
        robustness.blocks += [_robustness_table(run) or NA, *_figures(run, "robustness")]
    else:
        robustness.blocks.append(ROBUSTNESS_HINT)

    training = _Section("Training", _figures(run, "training")[:1])
    training.blocks.append(_metrics_table(run) or "metrics.csv not found or empty.")
    training.blocks += _figures(run, "training")[1:]
    config = _Section("Configuration", [_config_table(run) or "config.json not found."])
    sections = [calibration, classes, errors, explanations, robustness, training, config]
    if run.extra_plots:
        sections.append(
            _Section(
                "Other plots",
                [_Figure(p, caption, p.relative_to(run.path).as_posix()) for p, caption in run.extra_plots],
            )
        )
    return sections


# ----------------------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    # Pipes would split the cell; angle brackets would be taken as raw HTML by most renderers.
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _md_table(table: _Table) -> str:
    align = ["---:" if i in table.align_right else "---" for i in range(len(table.headers))]
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |", "| " + " | ".join(align) + " |"]
    for n, row in enumerate(table.rows):
        cells = [_md_cell(c) for c in row]
        if n in table.highlight:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _md_block(block: str | _Table | _Figure) -> list[str]:
    if isinstance(block, _Table):
        return [_md_table(block), ""]
    if isinstance(block, _Figure):
        link = "/".join(quote(part) for part in block.link.split("/"))
        return [f"![{block.caption}]({link})", "", f"*{block.caption}*", ""]
    return [block, ""] if block else []


def _markdown(title: str, headline: list[str], sections: list[_Section]) -> str:
    out = [f"# {title}", "", *headline]
    for section in sections:
        out += [f"## {section.heading}", ""]
        for block in section.blocks:
            out += _md_block(block)
    return "\n".join(out)


def _run_markdown(run: _Run) -> str:
    summary = _summary(run)
    headline = [
        f"**Test accuracy: {summary[0][1]}** (95% interval {summary[1][1]}); ECE {summary[2][1]}",
        "",
        _md_table(_Table(["summary", "value"], [[k, v] for k, v in summary])),
        "",
        _protocol_sentence(run),
        "",
    ]
    return _markdown(f"Run report: {run.name}", headline, _sections(run))


# ----------------------------------------------------------------------------- HTML

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 26px; margin: 8px 0 16px; word-break: break-word; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.card { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; background: #fff;
  border: 1px solid var(--line); border-radius: 10px; padding: 20px 24px; }
.headlines { display: flex; flex-direction: column; gap: 14px; min-width: 210px; }
.headline .value { font-size: 44px; font-weight: 700; color: var(--accent); line-height: 1.1; }
.headline .value.second { font-size: 30px; color: #9a6700; }
.headline .label { color: var(--muted); font-size: 13px; text-transform: uppercase; letter-spacing: .05em; }
.headline .sub { color: var(--muted); font-size: 13px; }
.facts { flex: 1; display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 8px 20px;
  margin: 0; }
.facts div { min-width: 0; }
.facts dt { color: var(--muted); font-size: 12px; }
.facts dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
.note { background: #fff8c5; border: 1px solid #eac54f; border-radius: 6px; padding: 8px 12px; }
.table-wrap { overflow-x: auto; margin: 8px 0 16px; }
table { border-collapse: collapse; background: #fff; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; }
th { background: #eef1f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td { overflow-wrap: anywhere; }
tr.best td { background: #dafbe1; font-weight: 600; }
figure { margin: 16px 0 28px; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 14px; margin-top: 8px; text-align: center; }
code { background: #eef1f4; border-radius: 4px; padding: 1px 5px; font-size: 13px; }
.muted { color: var(--muted); }
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _inline(text: str) -> str:
    """Escaped text with `code` spans, the only Markdown the report's paragraphs use."""
    parts = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(table: _Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in table.headers)
    body = []
    for n, row in enumerate(table.rows):
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in table.align_right else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        cls = ' class="best"' if n in table.highlight else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_block(block: str | _Table | _Figure) -> str:
    if isinstance(block, _Table):
        return _html_table(block)
    if isinstance(block, _Figure):
        return (
            f'<figure><img src="{_data_uri(block.path)}" alt="{_e(block.caption)}">'
            f"<figcaption>{_e(block.caption)}</figcaption></figure>"
        )
    return f"<p>{_inline(block)}</p>" if block else ""


def _html(title: str, card: list[str], sections: list[_Section]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        *card,
    ]
    for section in sections:
        parts.append(f"<h2>{_e(section.heading)}</h2>")
        parts += [_html_block(b) for b in section.blocks]
    parts.append("</main></body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def _headline(label: str, value: str, sub: str = "", second: bool = False) -> str:
    cls = "value second" if second else "value"
    sub_html = f'<div class="sub">{_e(sub)}</div>' if sub else ""
    return f'<div class="headline"><div class="label">{_e(label)}</div><div class="{cls}">{_e(value)}</div>{sub_html}</div>'


def _run_html(run: _Run) -> str:
    summary = _summary(run)
    r = run.results
    after, t = _number(r.get("test_ece_calibrated")), _number(r.get("temperature"))
    ece_sub = (
        f"{after * 100:.2f}% after temperature {t:.3f}"
        if after is not None and t is not None
        else "no temperature"
    )
    ci = _ci(r)
    card = [
        '<section class="card"><div class="headlines">',
        _headline(
            "Test accuracy",
            summary[0][1],
            f"95% CI {ci[0] * 100:.2f}% to {ci[1] * 100:.2f}%" if ci else "",
        ),
        _headline("Calibration error (ECE)", _pct(r.get("test_ece")), ece_sub, second=True),
        "</div>",
        '<dl class="facts">'
        + "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in summary[3:])
        + "</dl>",
        "</section>",
        f'<p class="note">{_e(_protocol_sentence(run))}</p>',
    ]
    return _html(f"Run report: {run.name}", card, _sections(run))


# ----------------------------------------------------------------------------- entry points: one run


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write run_dir/report.md and a self-contained run_dir/report.html from the run directory's files."""
    run = _load_run(Path(run_dir))
    md, page = _run_markdown(run), _run_html(run)  # both built before either is written
    paths = Run(run.path).file("report_md"), Run(run.path).file("report_html")
    write_atomic(paths[0], md)
    write_atomic(paths[1], page)
    return paths


# ----------------------------------------------------------------------------- several runs

# (results.json key, label, formatter) of the metrics summarised over runs.
COMPARED: list[tuple[str, str, Callable[[Any], str]]] = [
    ("test_accuracy", "test accuracy", _pct),
    ("test_top2_accuracy", "top-2 accuracy", _pct),
    ("macro_f1", "macro F1", _pct),
    ("test_loss", "test NLL", _float),
    ("test_brier", "Brier score", _float),
    ("test_ece", "ECE", _pct),
    ("test_ece_calibrated", "ECE after temperature", _pct),
    ("temperature", "temperature", lambda v: _float(v, 3)),
    ("mean_corruption_accuracy", "mean corruption accuracy", _pct),
    ("train_seconds", "train time", _duration),
]


def _group_key(run: _Run) -> str:
    """Runs of one recipe: the same config but for the seed (and where they ran)."""
    config = {k: v for k, v in run.config.items() if k not in ("seed", "device")}
    if not config:
        config = {"model": run.results.get("model"), "recipe": run.results.get("recipe")}
    return json.dumps(config, sort_keys=True, default=str)


def _group_name(runs: list[_Run]) -> str:
    c, r = runs[0].config, runs[0].results
    return (
        f"recipe {_value(c.get('recipe', r.get('recipe')))}, model {_value(c.get('model', r.get('model')))}"
    )


def expand_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run directories from paths; a `--seeds` output directory (summary.json) stands for its runs."""
    out: list[Path] = []
    for p in map(Path, paths):
        summary = p / SEEDS_SUMMARY
        if p.is_dir() and summary.is_file() and not Run(p).file("results").exists():
            runs = read_json(summary).get("runs") or []
            found = [p / Path(str(r)).name for r in runs]
            out += [r for r in found if r.is_dir()] or sorted(
                d for d in p.iterdir() if Run(d).file("results").is_file()
            )
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _load_comparable(paths: Sequence[Path]) -> list[_Run]:
    """Every run loaded and checked before anything is written: results present, one class list."""
    runs = [_load_run(p) for p in paths]
    for run in runs:
        if _number(run.results.get("test_accuracy")) is None:
            raise ReportError(
                f"run {run.path} has no test results yet; evaluate it first: cifar10 evaluate {run.path}"
            )
    first = _class_names(runs[0].results)
    for run in runs[1:]:
        names = _class_names(run.results)
        if names != first:
            raise ReportError(
                f"runs {runs[0].path} and {run.path} have different class lists ({', '.join(first)} vs "
                f"{', '.join(names)}); compare runs of the same classes only"
            )
    return runs


def _comparison_names(runs: list[_Run]) -> list[str]:
    """Each run's path relative to the runs' common folder (unique where the folder names alone are not)."""
    resolved = [r.path.resolve() for r in runs]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    names = [str(p.relative_to(common)) if p != common else p.name for p in resolved]
    return [n if n != "." else r.name for n, r in zip(names, runs, strict=True)]


def _comparison_paths(runs: list[_Run], out: str | os.PathLike | None) -> tuple[Path, Path, Path]:
    """(report.md, report.html, folder of figures): by default report.html in the runs' common folder."""
    if out is None:
        out = Path(os.path.commonpath([r.path.resolve() for r in runs])) / "report.html"
    html_path = Path(out)
    if html_path.suffix.lower() != ".html":
        html_path = html_path / "report.html" if html_path.is_dir() else html_path.with_suffix(".html")
    return html_path.with_suffix(".md"), html_path, html_path.with_name(f"{html_path.stem}_plots")


def _comparison_figures(runs: list[_Run], names: list[str], fig_dir: Path) -> list[_Figure]:
    """Accuracy with intervals, overlaid training curves and robustness by severity, drawn into fig_dir."""
    link = f"{fig_dir.name}/"
    results = [r.results for r in runs]
    plots.plot_run_comparison(
        names, [r["test_accuracy"] for r in results], [_ci(r) for r in results], fig_dir / "accuracy.png",
        ece=[_number(r.get("test_ece")) for r in results],
    )  # fmt: skip
    figures = [_Figure(fig_dir / "accuracy.png", "Test accuracy of each run with its 95% interval, "
                       "and its expected calibration error.", link + "accuracy.png")]  # fmt: skip
    curves = {name: run.metrics for name, run in zip(names, runs, strict=True) if run.metrics}
    if curves:
        plots.plot_runs_curves(curves, fig_dir / "curves.png")
        figures.append(
            _Figure(fig_dir / "curves.png", "Training curves of all runs overlaid.", link + "curves.png")
        )
    robust = {name: run.robustness for name, run in zip(names, runs, strict=True) if run.robustness}
    if robust:
        plots.plot_corruptions(
            {n: r["mean_by_severity"] for n, r in robust.items()},
            {n: r["clean_accuracy"] for n, r in robust.items()},
            fig_dir / "corruptions.png",
            title="Mean accuracy over the corruptions by severity, per run (regenerated CIFAR-10-C approximation)",
            mean_label="mean over runs",
        )
        figures.append(_Figure(fig_dir / "corruptions.png", "Mean accuracy over the 10 corruptions by severity, "
                               "one line per run.", link + "corruptions.png"))  # fmt: skip
    return figures


def _comparison_headlines(runs: list[_Run], names: list[str]) -> tuple[list[str], list[str]]:
    """The headline of the Markdown page and the summary card of the HTML page."""
    results = [r.results for r in runs]
    best = max(range(len(runs)), key=lambda i: results[i]["test_accuracy"])
    md = [
        f"**{len(runs)} runs; best test accuracy {_pct(results[best]['test_accuracy'])} ({names[best]})**",
        "",
    ]
    s = summarize([r["test_accuracy"] for r in results])
    card = [
        '<section class="card"><div class="headlines">',
        _headline(
            "Mean test accuracy",
            _pct(s["mean"]),
            f"± {s['std'] * 100:.2f} points (std), min {_pct(s['min'])}, max {_pct(s['max'])}",
        ),
        "</div>",
        '<dl class="facts">'
        + "".join(
            f"<div><dt>{_e(n)}</dt><dd>{_e(_pct(r['test_accuracy']))}, ECE {_e(_pct(r.get('test_ece')))}</dd></div>"
            for n, r in zip(names, results, strict=True)
        )
        + "</dl></section>",
    ]
    return md, card


def write_comparison(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """report.md and a self-contained report.html comparing several runs; figures in <out stem>_plots/.

    Runs of one recipe (same config but the seed) are summarised as mean ± std, min and max.
    """
    runs = _load_comparable([Path(p) for p in paths])
    if len(runs) < 2:
        raise ReportError("a comparison needs at least two runs")
    names = _comparison_names(runs)
    md_path, html_path, fig_dir = _comparison_paths(runs, out)
    fig_dir.mkdir(parents=True, exist_ok=True)
    sections = _comparison_sections(runs, names, _comparison_figures(runs, names, fig_dir))
    title = f"Comparison of {len(runs)} runs"
    headline_md, card = _comparison_headlines(runs, names)
    md, page = _markdown(title, headline_md, sections), _html(title, card, sections)
    write_atomic(md_path, md)
    write_atomic(html_path, page)
    return md_path, html_path


def _runs_table(runs: list[_Run], names: list[str]) -> _Table:
    """One row per run: what it is and its headline figures."""
    rows = []
    for name, run in zip(names, runs, strict=True):
        r, c = run.results, run.config
        rows.append([
            name,
            _value(r.get("model", c.get("model"))),
            _value(c.get("recipe", r.get("recipe"))),
            _value(c.get("seed")),
            _int(r.get("epochs_run")),
            _duration(r.get("train_seconds")),
            f"{_pct(r.get('test_accuracy'))} ({_ci_text(r)})",
            _float(r.get("test_loss")),
            _pct(r.get("test_ece")),
            _pct(r.get("test_ece_calibrated")),
            _float(r.get("temperature"), 3),
            _pct(r.get("mean_corruption_accuracy")) if run.robustness else NA,
        ])  # fmt: skip
    headers = ["run", "model", "recipe", "seed", "epochs", "train time", "test accuracy (95% interval)",
               "test NLL", "ECE", "ECE after T", "temperature T", "mean corruption acc."]  # fmt: skip
    return _Table(headers, rows, set(range(3, len(headers))))


def _group_stats(group: list[_Run]) -> _Table:
    """Mean ± sample std, min and max over the runs of one recipe, per compared metric."""
    rows = []
    for key, label, fmt in COMPARED:
        # Robustness counts only where it was measured on the weights evaluated.
        values = [
            _number(run.results.get(key))
            for run in group
            if key != "mean_corruption_accuracy" or run.robustness
        ]
        values = [v for v in values if v is not None]
        if not values:
            continue
        s = summarize(values)
        std = f"{s['std'] * 100:.2f} points" if fmt is _pct else fmt(s["std"])
        rows.append([label, f"{fmt(s['mean'])} ± {std}", fmt(s["min"]), fmt(s["max"]), str(s["n"])])
    return _Table(["metric", "mean ± std", "min", "max", "runs"], rows, {1, 2, 3, 4})


def _recipe_section(runs: list[_Run], names: list[str]) -> _Section:
    """The runs grouped by recipe; each group of two or more summarised."""
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(_group_key(run), []).append(i)
    section = _Section("Runs of one recipe: mean ± std over seeds")
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


def _per_class_comparison(runs: list[_Run], names: list[str]) -> _Table:
    rows = []
    for c in _class_names(runs[0].results):
        row = [c]
        for run in runs:
            pc = run.results.get("per_class_accuracy")
            row.append(_pct(pc.get(c)) if isinstance(pc, dict) else NA)
        rows.append(row)
    return _Table(["class", *names], rows, set(range(1, len(names) + 1)))


def _comparison_sections(runs: list[_Run], names: list[str], figures: list[_Figure]) -> list[_Section]:
    """The comparison page's sections in reading order."""
    links = [f"{name}: `{Run(run.path).file('report_html')}`" for name, run in zip(names, runs, strict=True)]
    return [
        _Section("Runs", [_runs_table(runs, names)]),
        _recipe_section(runs, names),
        _Section("Plots", list(figures)),
        _Section("Per-class test accuracy", [_per_class_comparison(runs, names)]),
        _Section("Each run's own report", ["; ".join(links)]),
    ]


def write_reports(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> list[Path]:
    """The CLI's `report`: one run's report.md/html rebuilt, or several runs compared; returns the HTML paths."""
    runs = expand_runs(paths)
    if len(runs) == 1:
        if out is not None:
            raise UserError(
                "--out names the comparison page of several runs; one run's report stays in its directory"
            )
        return [write_report(runs[0])[1]]
    return [write_comparison(runs, out)[1]]
