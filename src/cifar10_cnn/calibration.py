"""Calibration: how far the model's confidence is from its accuracy, and temperature scaling to close the gap.

Pure functions on numpy arrays (logits or probabilities (N, C), integer labels (N,)). The temperature that
predict and serve use is fitted at training time and stored with the weights; evaluation only reports.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

N_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Log-probabilities of logits / temperature, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of logits / temperature."""
    return np.exp(log_softmax(logits, temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels (the cross-entropy loss), in nats."""
    labels = np.asarray(labels)
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance between the probability vector and the one-hot label (0 to 2)."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), np.asarray(labels)] = 1.0
    return float(((probs - onehot) ** 2).sum(1).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict[str, list]:
    """Per confidence bin (lo, hi]: image count, mean confidence and accuracy (None where a bin is empty)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(labels)
    # Bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 joins the first bin.
    index = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)

    def mean(total: np.ndarray) -> list[float | None]:
        return [float(t / c) if c else None for t, c in zip(total, count, strict=True)]

    return {
        "edges": [b / n_bins for b in range(n_bins + 1)],
        "count": count.tolist(),
        "confidence": mean(conf_sum),
        "accuracy": mean(correct_sum),
    }


def calibration_errors(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> tuple[float, float]:
    """(ECE, MCE): the count-weighted mean and the maximum |accuracy - confidence| over non-empty bins."""
    bins = reliability(probs, labels, n_bins)
    n = sum(bins["count"])
    gaps = [
        (c, abs(a - p))
        for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
        if c
    ]
    if not gaps:
        raise ValueError("calibration_errors: no images")
    return sum(c * g for c, g in gaps) / n, max(g for _, g in gaps)


def calibration_metrics(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, n_bins: int = N_BINS
) -> dict[str, Any]:
    """Accuracy, NLL, Brier score, ECE, MCE and the reliability bins of logits / temperature."""
    labels = np.asarray(labels)
    probs = softmax(logits, temperature)
    ece, mce = calibration_errors(probs, labels, n_bins)
    return {
        "temperature": float(temperature),
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "nll": nll(logits, labels, temperature),
        "brier": brier_score(probs, labels),
        "ece": ece,
        "mce": mce,
        "mean_confidence": float(probs.max(1).mean()),
        "reliability": reliability(probs, labels, n_bins),
    }


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature T in bounds that minimises the NLL of softmax(logits / T) on these labels.

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search finds the optimum to float
    precision, deterministically and without gradients.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("fit_temperature: no images to fit on")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return nll(logits, labels, math.exp(log_t))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(100):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def calibration_at(logits: np.ndarray, labels: np.ndarray, temperature: float | None) -> dict[str, Any]:
    """Calibration of predictions as they are and with their logits divided by a given temperature (None: none)."""
    return {
        "bins": N_BINS,
        "uncalibrated": calibration_metrics(logits, labels),
        "calibrated": None if temperature is None else calibration_metrics(logits, labels, temperature),
        "temperature": None if temperature is None else float(temperature),
    }


def temperature_scaling(
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    val_logits: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Calibration of the test predictions before and after a temperature fitted on the validation logits.

    No validation logits (or none at all): no temperature, since the test set is never used for fitting.
    """
    if val_logits is None or val_labels is None or len(val_labels) == 0:
        return {
            **calibration_at(test_logits, test_labels, None),
            "val_size": 0,
            "note": NO_VALIDATION,
        }
    temperature = fit_temperature(val_logits, val_labels)
    return {
        **calibration_at(test_logits, test_labels, temperature),
        "val_size": len(val_labels),
        "note": f"Temperature fitted on the validation split ({len(val_labels):,} images held out of the "
        "training set) by minimising its NLL; the test set was not used for fitting.",
    }


FEW_FIT_IMAGES = 500  # a temperature fitted on fewer validation images than this is warned as uncertain


def few_images_warning(n: int) -> str | None:
    """The one-line warning of a temperature fitted on fewer than FEW_FIT_IMAGES images (None: enough)."""
    if not 0 < n < FEW_FIT_IMAGES:
        return None
    return (
        f"warning: the softmax temperature was fitted on only {n:,} validation images (under "
        f"{FEW_FIT_IMAGES}), so it is uncertain and the calibrated probabilities may be no better than the "
        "raw ones; hold out more with --val-size N"
    )


NO_VALIDATION = (
    "The run has no validation split (val_size 0), so no temperature was fitted: the test set "
    "is never used for fitting. Probabilities are the model's own."
)
