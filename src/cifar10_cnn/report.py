"""The run report: Markdown and one self-contained HTML file, built from the run directory alone.

Reads ``config.json``, ``metrics.csv``, ``results.json`` and ``plots/*.png``; never a trainer or model.
Any of them may be missing or incomplete (a run stopped before evaluation): absent values read "n/a".
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["CIFAR10_CLASSES", "write_report"]

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
NA = "n/a"

# Known plots in reading order, with captions; any other PNG in plots/ follows, captioned by its name.
PLOT_CAPTIONS = {
    "curves.png": "Loss and accuracy per epoch (train and validation); the dotted line marks the best "
    "validation epoch.",
    "confusion.png": "Confusion matrix on the test set: rows are true classes, columns predicted classes.",
    "per_class.png": "Test accuracy per class; the dashed line is the mean over classes.",
    "predictions.png": "Sample test predictions with confidence: green titles are right, red are wrong.",
    "augmentations.png": "Training images as the model sees them, after augmentation.",
}

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


@dataclass
class _Run:
    """What the report needs from a run directory, as plain data."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, str]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    plots: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    align_right: set[int] = field(default_factory=set)
    highlight: set[int] = field(default_factory=set)  # row indices to emphasise


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run evaluation to rewrite it") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if any((v or "").strip() for v in row.values())]


def _load_run(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist; pass the directory of a training run"
        )
    names = ("config.json", "metrics.csv", "results.json")
    if not any((run_dir / n).exists() for n in names):
        raise FileNotFoundError(f"{run_dir} is not a run directory: none of {', '.join(names)} found")
    config = _read_json(run_dir / "config.json")
    plots_dir = run_dir / "plots"
    found = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    known = [plots_dir / n for n in PLOT_CAPTIONS if (plots_dir / n).is_file()]
    extra = [p for p in found if p.name not in PLOT_CAPTIONS]
    plots = [
        (p, PLOT_CAPTIONS.get(p.name, p.stem.replace("_", " ").capitalize() + ".")) for p in known + extra
    ]
    name = str(config.get("run_name") or config.get("name") or run_dir.resolve().name)
    return _Run(
        name, config, _read_metrics(run_dir / "metrics.csv"), _read_json(run_dir / "results.json"), plots
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


# ----------------------------------------------------------------------------- content


def _class_names(results: dict[str, Any]) -> list[str]:
    names = results.get("class_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    per_class = results.get("per_class_accuracy")
    if isinstance(per_class, dict) and per_class:
        return [str(n) for n in per_class]
    return list(CIFAR10_CLASSES)


def _data_source(results: dict[str, Any]) -> str:
    data = results.get("data")
    if not isinstance(data, dict):
        return NA
    source = str(data.get("source") or NA)
    verified = data.get("verified")
    check = NA if verified is None else ("sha256 verified" if verified else "NOT verified")
    return f"{source} ({check})"


def _interval(accuracy: Any, n: Any) -> str:
    """Normal-approximation 95% interval of an accuracy measured on n images: one run is one sample."""
    p, size = _number(accuracy), _number(n)
    if p is None or size is None or size < 1 or not 0.0 <= p <= 1.0:
        return NA
    half = 1.96 * math.sqrt(p * (1.0 - p) / size)
    return f"±{half * 100:.2f} points ({max(p - half, 0.0) * 100:.2f}% to {min(p + half, 1.0) * 100:.2f}%)"


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
        ("95% interval (binomial)", _interval(r.get("test_accuracy"), r.get("test_size"))),
        ("Test loss", _float(r.get("test_loss"))),
        ("Best validation accuracy", best),
        ("Model", _value(r.get("model", c.get("model")))),
        ("Parameters", _params(r.get("params"))),
        ("Recipe", _value(c.get("recipe"))),
        ("Device", _value(r.get("device", c.get("device")))),
        ("Data", _data_source(r)),
        (
            "Train / val / test images",
            " / ".join(_int(r.get(k)) for k in ("train_size", "val_size", "test_size")),
        ),
        ("Epochs run", epochs),
        ("Stopped early", _yes_no(r.get("stopped_early"))),
        ("Weights evaluated", _value(r.get("weights"))),
        ("Test-time augmentation", _yes_no(r.get("tta"))),
        ("Train time", _duration(r.get("train_seconds"))),
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
            f"(best epoch, early stopping) used the validation split of {int(val):,} images held out "
            "from the training set."
        )
    return (
        f"{test_part} was used only for this final evaluation. No validation split was held out, "
        "so no model selection was done: the weights are those of the last epoch."
    )


def _per_class_table(run: _Run) -> _Table | None:
    r = run.results
    names = _class_names(r)
    per_class = r.get("per_class_accuracy") if isinstance(r.get("per_class_accuracy"), dict) else {}
    cm = r.get("confusion_matrix")
    valid_cm = (
        isinstance(cm, list)
        and len(cm) == len(names)
        and all(isinstance(row, list) and len(row) == len(names) for row in cm)
    )
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
            others = [(v, j) for j, v in enumerate(counts) if j != i]
            if others and total:
                v, j = max(others)
                confused = f"{names[j]} ({v / total * 100:.1f}%)" if v > 0 else "none"
        rows.append([name, _pct(acc), correct, confused])
    return _Table(["class", "accuracy", "correct / total", "most often predicted as"], rows, {1, 2})


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


def _sections(run: _Run) -> list[tuple[str, str, _Table | None]]:
    """(heading, note, table) for each tabular section, in report order."""
    return [
        (
            "Per-class test accuracy",
            "" if run.results else "results.json not found: no evaluation yet.",
            _per_class_table(run),
        ),
        ("Per-epoch metrics", "" if run.metrics else "metrics.csv not found or empty.", _metrics_table(run)),
        ("Configuration", "" if run.config else "config.json not found.", _config_table(run)),
    ]


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


def _markdown(run: _Run) -> str:
    out = [f"# Run report: {run.name}", ""]
    out += [f"**Test accuracy: {_pct(run.results.get('test_accuracy'))}**", ""]
    out += [_md_table(_Table(["summary", "value"], [[k, v] for k, v in _summary(run)])), ""]
    out += [_protocol_sentence(run), ""]
    for heading, note, table in _sections(run):
        out += [f"## {heading}", ""]
        out += [_md_table(table) if table else f"_{note or 'n/a'}_", ""]
    out += ["## Plots", ""]
    if not run.plots:
        out += ["_No plots found in plots/._", ""]
    for path, caption in run.plots:
        out += [f"![{caption}](plots/{quote(path.name)})", "", f"*{caption}*", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- HTML

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 26px; margin: 8px 0 16px; word-break: break-word; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.card { display: flex; flex-wrap: wrap; gap: 24px; align-items: center; background: #fff;
  border: 1px solid var(--line); border-radius: 10px; padding: 20px 24px; }
.headline { min-width: 190px; }
.headline .value { font-size: 44px; font-weight: 700; color: var(--accent); line-height: 1.1; }
.headline .label { color: var(--muted); font-size: 13px; text-transform: uppercase; letter-spacing: .05em; }
.facts { flex: 1; display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 8px 20px;
  margin: 0; }
.facts div { min-width: 0; }
.facts dt { color: var(--muted); font-size: 12px; }
.facts dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
.note { background: #fff8c5; border: 1px solid #eac54f; border-radius: 6px; padding: 8px 12px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; background: #fff; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; }
th { background: #eef1f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td { overflow-wrap: anywhere; }
tr.best td { background: #dafbe1; }
figure { margin: 16px 0 28px; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 14px; margin-top: 8px; text-align: center; }
.muted { color: var(--muted); }
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


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


def _html(run: _Run) -> str:
    summary = _summary(run)
    headline = summary[0][1]
    facts = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in summary[1:])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Run report: {_e(run.name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>Run report: {_e(run.name)}</h1>",
        '<section class="card">',
        f'<div class="headline"><div class="label">Test accuracy</div><div class="value">{_e(headline)}</div></div>',
        f'<dl class="facts">{facts}</dl>',
        "</section>",
        f'<p class="note">{_e(_protocol_sentence(run))}</p>',
    ]
    for heading, note, table in _sections(run):
        parts.append(f"<h2>{_e(heading)}</h2>")
        parts.append(_html_table(table) if table else f'<p class="muted">{_e(note or NA)}</p>')
    parts.append("<h2>Plots</h2>")
    if not run.plots:
        parts.append('<p class="muted">No plots found in plots/.</p>')
    for path, caption in run.plots:
        parts.append(
            f'<figure><img src="{_data_uri(path)}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- entry point


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file so a crash never leaves half a report behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write run_dir/report.md and a self-contained run_dir/report.html from the run directory's files."""
    run_dir = Path(run_dir)
    run = _load_run(run_dir)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _write_atomic(md_path, _markdown(run))
    _write_atomic(html_path, _html(run))
    return md_path, html_path
