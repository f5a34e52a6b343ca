"""Calibration: how far the model's confidence is from its accuracy, and temperature scaling to close the gap.

Pure functions on numpy arrays (logits or probabilities (N, C), integer labels (N,)), and one function that
stores a fitted temperature in a weights file, where predict and serve read it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
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


def write_temperature(weights: Path, temperature: float) -> None:
    """Store the temperature in a safetensors file's metadata (key "temperature", a JSON float), atomically.

    Tensors and every other metadata entry are kept as they are; predict and serve divide logits by it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from .runs import write_atomic

    with safe_open(str(weights), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(weights))
    metadata["temperature"] = json.dumps(float(temperature))
    write_atomic(Path(weights), save(tensors, metadata=metadata))
