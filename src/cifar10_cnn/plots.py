"""Matplotlib figures for a run: arrays in, one PNG out.

Figures are built on ``matplotlib.figure.Figure`` directly, never through ``pyplot``, so no global
figure state is created or leaked and no backend has to be selected: ``Figure.savefig`` renders PNGs
with Agg on its own. Style is applied with ``rc_context`` so the caller's rcParams are left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "CORRECT_COLOR",
    "WRONG_COLOR",
    "plot_confusion",
    "plot_curves",
    "plot_image_grid",
    "plot_per_class",
    "plot_predictions",
]

DPI = 130
TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
BEST_COLOR = "#2ca02c"
BAR_COLOR = "#4c72b0"
MEAN_COLOR = "#c44e52"
# Saturated on purpose: titles must read as right/wrong at a glance (and be detectable in tests).
CORRECT_COLOR = "#008a00"
WRONG_COLOR = "#d00000"

_STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.titlesize": 13,
    "figure.titleweight": "bold",
    "legend.fontsize": 9,
    "legend.frameon": False,
    "savefig.facecolor": "white",
}


def _figure(figsize: tuple[float, float]) -> Figure:
    """A white, constrained-layout figure that is not registered with pyplot."""
    return Figure(figsize=figsize, layout="constrained", facecolor="white")


def _save(fig: Figure, out: Path) -> Path:
    """Write the figure as PNG (creating parent directories) and release its memory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.15)
    fig.clear()
    return out


def _num(value: Any) -> float:
    """A metrics cell as float; empty strings and None (no validation split) become NaN."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([_num(row.get(key)) for row in rows], dtype=float)


def plot_curves(rows: list[dict], out: Path) -> Path:
    """Loss and accuracy (%) by epoch for train and validation, with the best validation epoch marked."""
    if not rows:
        raise ValueError("plot_curves: metrics has no rows; train for at least one epoch first")
    epochs = _column(rows, "epoch")
    if np.isnan(epochs).any():
        epochs = np.arange(1, len(rows) + 1, dtype=float)
    train_loss, val_loss = _column(rows, "train_loss"), _column(rows, "val_loss")
    train_acc, val_acc = _column(rows, "train_acc"), _column(rows, "val_acc")
    # metrics.csv stores fractions; tolerate files that already store percentages.
    accs = np.concatenate([train_acc, val_acc])
    scale = 1.0 if np.isfinite(accs).any() and np.nanmax(accs) > 1.0 else 100.0
    train_acc, val_acc = train_acc * scale, val_acc * scale
    marker = "o" if len(rows) <= 40 else None

    with matplotlib.rc_context(_STYLE):
        fig = _figure((11.0, 4.3))
        ax_loss, ax_acc = fig.subplots(1, 2)
        for ax, train, val, name in (
            (ax_loss, train_loss, val_loss, "loss"),
            (ax_acc, train_acc, val_acc, "accuracy"),
        ):
            if np.isfinite(train).any():
                ax.plot(epochs, train, marker=marker, ms=4, color=TRAIN_COLOR, label=f"train {name}")
            if np.isfinite(val).any():
                ax.plot(epochs, val, marker=marker, ms=4, color=VAL_COLOR, label=f"val {name}")
            ax.set_xlabel("Epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if len(rows) == 1:
                ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
                ax.set_xticks([epochs[0]])
        ax_loss.set_title("Loss")
        ax_loss.set_ylabel("Loss")
        ax_acc.set_title("Accuracy")
        ax_acc.set_ylabel("Accuracy (%)")

        if np.isfinite(val_acc).any():
            best = int(np.nanargmax(val_acc))
            for ax in (ax_loss, ax_acc):
                ax.axvline(epochs[best], color=BEST_COLOR, ls=":", lw=1.2)
            ax_acc.plot(
                epochs[best],
                val_acc[best],
                marker="*",
                ms=14,
                color=BEST_COLOR,
                ls="none",
                label=f"best val {val_acc[best]:.2f}% (epoch {epochs[best]:g})",
            )
        for ax in (ax_loss, ax_acc):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        title = "Training curves" if np.isfinite(val_acc).any() else "Training curves (no validation split)"
        fig.suptitle(title)
        return _save(fig, out)


def plot_confusion(cm: np.ndarray, class_names: list[str], out: Path, normalize: bool = True) -> Path:
    """Confusion-matrix heatmap (rows true, columns predicted), annotated with row-% or counts."""
    cm = np.asarray(cm, dtype=float)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"plot_confusion: expected a {n}x{n} matrix for {n} classes, got shape {cm.shape}")
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        values = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0) * 100.0
        vmax, label = 100.0, "% of true class"
    else:
        values = cm
        vmax, label = max(float(cm.max()), 1.0), "Count"
    title = "Confusion matrix (row-normalised %)" if normalize else "Confusion matrix (counts)"
    total = cm.sum()
    if total > 0 and np.allclose(cm, np.round(cm)):
        title += f"\naccuracy {100.0 * np.trace(cm) / total:.2f}% on {int(total):,} images"
    fontsize = 8 if n <= 10 else max(4, 80 // n)
    side = max(5.0, 0.62 * n + 2.2)

    with matplotlib.rc_context(_STYLE):
        fig = _figure((side + 1.0, side))
        ax = fig.subplots()
        image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                if v == 0:
                    text, color = "0", "#b0b0b0"
                else:
                    text = f"{v:.1f}%" if normalize else f"{round(v):d}"
                    color = "white" if v > 0.55 * vmax else "#1a1a1a"
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
        ax.set_xticks(range(n), labels=class_names, rotation=40, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), labels=class_names)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8, label=label)
        return _save(fig, out)


def plot_per_class(acc: dict[str, float], out: Path) -> Path:
    """Horizontal bars of per-class accuracy in %, labelled, with the mean as a dashed line."""
    if not acc:
        raise ValueError("plot_per_class: no per-class accuracies given")
    names = list(acc)
    fractions = np.array([float(acc[k]) for k in names])
    if np.isnan(fractions).any() or fractions.min() < 0 or fractions.max() > 1.0 + 1e-9:
        raise ValueError("plot_per_class: expected accuracies as fractions in [0, 1]")
    values = fractions * 100.0
    mean = float(values.mean())
    y = np.arange(len(names))

    with matplotlib.rc_context(_STYLE):
        fig = _figure((7.5, 0.42 * len(names) + 1.8))
        ax = fig.subplots()
        bars = ax.barh(y, values, height=0.65, color=BAR_COLOR)
        # White boxes keep the value labels readable where the mean line crosses them.
        ax.bar_label(
            bars,
            labels=[f"{v:.1f}%" for v in values],
            padding=3,
            fontsize=9,
            zorder=4,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0},
        )
        ax.axvline(mean, color=MEAN_COLOR, ls="--", lw=1.5, zorder=3, label=f"mean {mean:.2f}%")
        ax.set_yticks(y, labels=names)
        ax.invert_yaxis()  # first class at the top, same order as the confusion matrix
        ax.set_xlim(0, 112)  # room for the value labels of bars near 100%
        ax.set_xticks(range(0, 101, 20))
        ax.set_xlabel("Accuracy (%)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.tick_params(axis="y", length=0)
        ax.set_title("Per-class accuracy")
        fig.legend(loc="outside lower center", ncols=1)
        return _save(fig, out)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.floating) and images.size and np.nanmax(images) > 1.0:
        # Floats on the 0-255 scale: imshow would clip them to [0, 1] and show a white grid.
        images = np.clip(images, 0, 255).astype(np.uint8)
    if images.ndim == 3:  # (N, H, W) grayscale
        return images
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected images as (N, H, W, C) with C in 1/3/4 (NHWC), got shape {images.shape}")
    return images[..., 0] if images.shape[-1] == 1 else images


def _grid(n: int, ncols: int, cell: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    if n == 0:
        raise ValueError("no images to plot")
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    fig = _figure((cell[0] * ncols, cell[1] * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def _grid_title_size(n: int, ncols: int) -> float:
    """Smaller overall titles for narrow grids, so the title does not dwarf one or two images."""
    return 13.0 if min(n, ncols) >= 4 else 10.0


def _show(ax: Any, image: np.ndarray) -> None:
    ax.imshow(image, interpolation="nearest", cmap="gray" if image.ndim == 2 else None)
    ax.set_axis_off()


def plot_predictions(
    images: np.ndarray,
    true: np.ndarray,
    pred: np.ndarray,
    class_names: list[str],
    out: Path,
    probs: np.ndarray | None = None,
    ncols: int = 8,
) -> Path:
    """Grid of images titled "pred (conf%)\\ntrue: x", green when right and red when wrong."""
    images = _check_images(images)
    true = np.asarray(true).astype(int).ravel()
    pred = np.asarray(pred).astype(int).ravel()
    n = len(images)
    if len(true) != n or len(pred) != n:
        raise ValueError(f"plot_predictions: {n} images but {len(true)} labels and {len(pred)} predictions")
    conf = None
    if probs is not None:
        probs = np.asarray(probs, dtype=float)
        # Accept full (N, C) probability rows too: take the predicted class's probability.
        conf = probs[np.arange(n), pred] if probs.ndim == 2 else probs.ravel()
        if len(conf) != n:
            raise ValueError(f"plot_predictions: {n} images but {len(conf)} confidences")
    correct = pred == true

    with matplotlib.rc_context(_STYLE):
        fig, axes = _grid(n, ncols, (1.45, 1.8))
        for k, ax in enumerate(axes):
            _show(ax, images[k])
            head = class_names[pred[k]] + (f" ({100.0 * conf[k]:.0f}%)" if conf is not None else "")
            ax.set_title(
                f"{head}\ntrue: {class_names[true[k]]}",
                fontsize=8,
                pad=3,
                color=CORRECT_COLOR if correct[k] else WRONG_COLOR,
                fontweight="normal" if correct[k] else "bold",  # not colour alone
            )
        fig.suptitle(
            f"Predictions: {int(correct.sum())}/{n} correct (green right, red wrong)",
            fontsize=_grid_title_size(n, ncols),
        )
        return _save(fig, out)


def plot_image_grid(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    out: Path,
    title: str,
    ncols: int = 8,
) -> Path:
    """Plain grid of images, each captioned with its class name, under an overall title."""
    images = _check_images(images)
    labels = np.asarray(labels).astype(int).ravel()
    if len(labels) != len(images):
        raise ValueError(f"plot_image_grid: {len(images)} images but {len(labels)} labels")

    with matplotlib.rc_context(_STYLE):
        fig, axes = _grid(len(images), ncols, (1.35, 1.55))
        for ax, image, label in zip(axes, images, labels, strict=True):
            _show(ax, image)
            ax.set_title(class_names[label], fontsize=8, pad=3)
        fig.suptitle(title, fontsize=_grid_title_size(len(images), ncols))
        return _save(fig, out)
