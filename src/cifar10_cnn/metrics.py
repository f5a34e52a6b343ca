"""Classification metrics as pure functions on arrays: logits (N, C), integer labels (N,), confusion matrices.

No files and no model here; `evaluate` runs the model and writes what these compute.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from .calibration import nll
from .constants import CLASSES


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    return np.bincount(num_classes * np.asarray(true) + np.asarray(pred), minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the share of a true class given to each prediction); empty rows stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (the diagonal over the row sums); NaN for a class with no images."""
    totals = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)


def precision_recall_f1(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix; 0 where undefined (0 / 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, predicted, actual = np.diag(cm), cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual.astype(int)}


def accuracy_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy of correct / n (95% for z = 1.96); sound near 0% and 100% too."""
    if n <= 0:
        raise ValueError("accuracy_interval: no images")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k highest logits."""
    top = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(1).mean())


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[str] = CLASSES
) -> dict[str, Any]:
    """Accuracy (with its 95% Wilson interval), top-2, loss, per-class scores and the confusion matrix."""
    labels = np.asarray(labels)
    pred = np.asarray(logits).argmax(1)
    cm = confusion_matrix(labels, pred, len(classes))
    scores = precision_recall_f1(cm)
    correct = int((pred == labels).sum())
    return {
        "test_accuracy": correct / len(labels),
        "test_accuracy_ci95": list(accuracy_interval(correct, len(labels))),
        "test_top2_accuracy": topk_accuracy(logits, labels, 2),
        "test_loss": nll(logits, labels),
        "per_class_accuracy": {c: float(a) for c, a in zip(classes, per_class_accuracy(cm), strict=True)},
        "per_class": {
            c: {k: float(scores[k][i]) if k != "support" else int(scores[k][i]) for k in scores}
            for i, c in enumerate(classes)
        },
        "macro_f1": float(scores["f1"].mean()),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": normalize_rows(cm).round(6).tolist(),
    }


def confident_errors(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n wrong predictions with the highest confidence, most confident first."""
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != np.asarray(labels))
    return wrong[np.argsort(-conf[wrong], kind="stable")[:n]]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and n of a non-empty list of values."""
    if not values:
        raise ValueError("summarize: no values")
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }
