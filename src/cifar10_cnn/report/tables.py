"""The tables of one run's report, from its checked files (load.RunData); None where the data is missing."""

from __future__ import annotations

from typing import Any

from .fmt import NA, count, flt, lr, pct, value
from .load import RunData, class_names, number
from .model import Table

# Above this many classes the report lists the most frequent confusions instead of the whole count matrix.
MATRIX_CLASSES = 20
CONFUSED_PAIRS = 20


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


def _mapping(results: dict[str, Any], key: str) -> dict[str, Any]:
    v = results.get(key)
    return v if isinstance(v, dict) else {}


def per_class_table(run: RunData) -> Table | None:
    r = run.results
    names = class_names(r)
    per_class, scores = _mapping(r, "per_class_accuracy"), _mapping(r, "per_class")
    cm = r.get("confusion_matrix")
    valid_cm = _valid_cm(cm, len(names))
    if not per_class and not valid_cm:
        return None
    rows = []
    for i, name in enumerate(names):
        acc, correct, confused = per_class.get(name), NA, NA
        if valid_cm:
            counts = [number(v) or 0.0 for v in cm[i]]
            total = sum(counts)
            correct = f"{int(counts[i]):,} / {int(total):,}"
            if acc is None and total:
                acc = counts[i] / total
            confused = _most_confused(counts, i, names)
        s = scores.get(name) if isinstance(scores.get(name), dict) else {}
        rows.append([name, pct(acc), pct(s.get("precision")), pct(s.get("f1")), correct, confused])
    headers = ["class", "accuracy (recall)", "precision", "F1", "correct / total", "most often predicted as"]
    return Table(headers, rows, {1, 2, 3, 4})


def confusion_table(run: RunData) -> Table | None:
    names = class_names(run.results)
    cm = run.results.get("confusion_matrix")
    if not _valid_cm(cm, len(names)):
        return None
    if len(names) > MATRIX_CLASSES:  # a 100 x 100 table reads as noise: the largest confusions instead
        return _confused_pairs(names, [[number(v) or 0.0 for v in row] for row in cm])
    rows = [[f"true {name}"] + [count(v) for v in row] for name, row in zip(names, cm, strict=True)]
    return Table(["counts", *names], rows, set(range(1, len(names) + 1)))


def _confused_pairs(names: list[str], cm: list[list[float]]) -> Table:
    """The CONFUSED_PAIRS largest off-diagonal cells: true class, predicted class, count, share of the class."""
    cells = sorted((-v, i, j) for i, row in enumerate(cm) for j, v in enumerate(row) if i != j and v > 0)
    rows = [
        [names[i], names[j], count(-v), pct(-v / sum(cm[i])) if sum(cm[i]) else NA]
        for v, i, j in cells[:CONFUSED_PAIRS]
    ]
    return Table(["true class", "predicted as", "images", "% of the true class"], rows, {2, 3})


def calibration_table(run: RunData) -> Table | None:
    cal = _mapping(run.evaluation, "calibration")
    if not isinstance(cal.get("uncalibrated"), dict):
        return None
    before, after = cal["uncalibrated"], cal.get("calibrated") or {}
    rows = [
        ["accuracy", pct(before.get("accuracy")), pct(after.get("accuracy"))],
        ["negative log-likelihood (nats)", flt(before.get("nll")), flt(after.get("nll"))],
        ["Brier score (0 to 2)", flt(before.get("brier")), flt(after.get("brier"))],
        ["expected calibration error (ECE)", pct(before.get("ece")), pct(after.get("ece"))],
        ["maximum calibration error (MCE)", pct(before.get("mce")), pct(after.get("mce"))],
        ["mean confidence", pct(before.get("mean_confidence")), pct(after.get("mean_confidence"))],
    ]
    t = number(cal.get("temperature"))
    after_head = (
        f"after temperature scaling (T = {t:.3f})" if t is not None else "after (no temperature fitted)"
    )
    return Table(["test set", "before", after_head], rows, {1, 2})


def robustness_table(run: RunData) -> Table | None:
    """Accuracy per corruption and severity (load.py checked that the table is whole)."""
    rob = run.robustness
    table = rob.get("accuracy")
    if not isinstance(table, dict) or not table:
        return None
    severities = rob.get("severities") or list(range(1, len(next(iter(table.values()))) + 1))
    rows = [
        [name.replace("_", " ")] + [pct(v, 1) for v in values] + [pct(sum(values) / len(values), 1)]
        for name, values in table.items()
    ]
    rows.append(
        ["mean over corruptions"]
        + [pct(v, 1) for v in rob.get("mean_by_severity") or []]
        + [pct(rob.get("mean_corruption_accuracy"), 1)]
    )
    headers = ["corruption"] + [f"severity {value(s)}" for s in severities] + ["mean"]
    return Table(headers, rows, set(range(1, len(headers))), {len(rows) - 1})


def metrics_table(run: RunData) -> Table | None:
    if not run.metrics:
        return None
    best = number(run.results.get("best_epoch"))
    rows, highlight = [], set()
    for i, m in enumerate(run.metrics):
        row = [
            count(m.get("epoch")),
            flt(m.get("train_loss")),
            pct(m.get("train_acc")),
            flt(m.get("val_loss")),
            pct(m.get("val_acc")),
            lr(m.get("lr")),
            flt(m.get("seconds"), 1),
        ]
        if best is not None and number(m.get("epoch")) == best:
            row[0] += " (best)"
            highlight.add(i)
        rows.append(row)
    headers = ["epoch", "train loss", "train acc", "val loss", "val acc", "lr", "seconds"]
    return Table(headers, rows, set(range(len(headers))), highlight)


def config_table(run: RunData) -> Table | None:
    if not run.config:
        return None
    # An explicit null in the config means "off" (e.g. no subset), not "unknown".
    rows = [[str(k), "none" if v is None else value(v)] for k, v in run.config.items()]
    return Table(["setting", "value"], rows)
