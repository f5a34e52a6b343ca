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
    "plot_corruptions",
    "plot_curves",
    "plot_image_grid",
    "plot_per_class",
    "plot_predictions",
    "plot_reliability",
    "plot_run_comparison",
    "plot_runs_curves",
]

DPI = 130
TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
BEST_COLOR = "#2ca02c"
BAR_COLOR = "#4c72b0"
MEAN_COLOR = "#c44e52"
PRECISION_COLOR = "#8fb3de"
F1_COLOR = "#2b4a7a"
GAP_COLOR = "#e8878a"
DIAGONAL_COLOR = "#555555"
# Ten distinct colours (matplotlib's tab10) with markers, so lines stay apart in grey print too.
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
SERIES_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
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


def _save(fig: Figure, out: Path, tight: bool = True) -> Path:
    """Write the figure as PNG (creating parent directories) and release its memory.

    tight: crop to the drawn content (a second layout pass); figures laid out by hand skip it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", bbox_inches="tight" if tight else None, pad_inches=0.15)
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


MATRIX_NUMBERS = 20  # classes up to which every cell of the confusion heatmap is annotated


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
    numbers = n <= MATRIX_NUMBERS
    if not numbers:  # e.g. CIFAR-100: a heatmap whose every class has a (small) label, and no numbers
        side, fontsize = 0.13 * n + 4.0, 6.0  # a cell 0.13 in (9 pt) high: room for a 6-pt label
        title += f"\n{n} classes: cell numbers left out (the report lists the most frequent confusions)"

    with matplotlib.rc_context(_STYLE):
        fig = _figure((side + 1.0, side))
        ax = fig.subplots()
        image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
        for i in range(n if numbers else 0):
            for j in range(n):
                v = values[i, j]
                if v == 0:
                    text, color = "0", "#b0b0b0"
                else:
                    text = f"{v:.1f}%" if normalize else f"{round(v):d}"
                    color = "white" if v > 0.55 * vmax else "#1a1a1a"
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
        rotation = 40 if numbers else 90
        ax.set_xticks(range(n), labels=class_names, rotation=rotation, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), labels=class_names)
        if not numbers:
            ax.tick_params(labelsize=fontsize)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8, label=label)
        return _save(fig, out)


def plot_per_class(
    acc: dict[str, float],
    out: Path,
    precision: dict[str, float] | None = None,
    f1: dict[str, float] | None = None,
) -> Path:
    """Horizontal bars of per-class accuracy (recall) in %, labelled, with the mean as a dashed line.

    Given precision and F1 too, each class gets three bars (precision, recall, F1); recall keeps its colour.
    """
    if not acc:
        raise ValueError("plot_per_class: no per-class accuracies given")
    names = list(acc)
    many = (
        len(names) > MATRIX_NUMBERS
    )  # e.g. CIFAR-100: recall only, in thin bars (precision and F1 in the report)
    if many:
        precision = f1 = None
    series = [("recall (accuracy)" if precision or f1 else None, acc, BAR_COLOR)]
    if precision:
        series.insert(0, ("precision", precision, PRECISION_COLOR))
    if f1:
        series.append(("F1", f1, F1_COLOR))
    for _, values, _ in series:
        fractions = np.array([float(values.get(k, np.nan)) for k in names])
        if np.isnan(fractions).any() or fractions.min() < 0 or fractions.max() > 1.0 + 1e-9:
            raise ValueError("plot_per_class: expected accuracies as fractions in [0, 1] for every class")
    mean = float(np.mean([acc[k] for k in names])) * 100.0
    y = np.arange(len(names))
    height = 0.65 / len(series)

    with matplotlib.rc_context(_STYLE):
        per_bar = 0.17 if many else 0.42 if len(series) == 1 else 0.62
        fig = _figure((7.5 if len(series) == 1 else 8.5, per_bar * len(names) + 1.8))
        ax = fig.subplots()
        for k, (label, values, color) in enumerate(series):
            v = np.array([float(values[n]) for n in names]) * 100.0
            offset = (k - (len(series) - 1) / 2) * height
            bars = ax.barh(y + offset, v, height=height * 0.92, color=color, label=label)
            # White boxes keep the value labels readable where the mean line crosses them.
            ax.bar_label(
                bars,
                labels=[f"{x:.1f}%" for x in v],
                padding=3,
                fontsize=6 if many else 9 if len(series) == 1 else 7.5,
                zorder=4,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
            )
        ax.axvline(mean, color=MEAN_COLOR, ls="--", lw=1.5, zorder=3, label=f"mean accuracy {mean:.2f}%")
        ax.set_yticks(y, labels=names)
        if many:
            ax.tick_params(axis="y", labelsize=6)
        ax.invert_yaxis()  # first class at the top, same order as the confusion matrix
        ax.set_xlim(0, 112)  # room for the value labels of bars near 100%
        ax.set_xticks(range(0, 101, 20))
        ax.set_xlabel("Accuracy (%)" if len(series) == 1 else "Score (%)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.tick_params(axis="y", length=0)
        ax.set_title("Per-class accuracy" if len(series) == 1 else "Per-class precision, recall and F1")
        fig.legend(loc="outside lower center", ncols=len(series) + 1)
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


def _grid_title_size(n: int, ncols: int) -> float:
    """Smaller overall titles for narrow grids, so the title does not dwarf one or two images."""
    return 13.0 if min(n, ncols) >= 4 else 10.0


def _spacing(scale: float, lines: int, fontsize: float) -> tuple[int, int]:
    """Pixels between images, and of the caption band above each, at scale inches per pixel."""
    return max(1, round(0.1 / scale)), round((fontsize / 72 * 1.25 * lines + 0.06) / scale)


def captioned_grid(
    ax: Any,
    images: np.ndarray,
    captions: Sequence[str],
    *,
    ncols: int,
    scale: float,
    lines: int,
    fontsize: float = 8,
    colors: Sequence[str] | None = None,
    bold: Sequence[bool] | None = None,
) -> None:
    """Draw images (N, H, W, C) in a grid, each under a caption of `lines` lines, as one canvas in ax.

    One image drawn once is far faster than an axes per image (a 32-image grid: 0.3 s against 2.7 s).
    scale: inches per image pixel; grid_shape gives the canvas size in inches.
    """
    n = len(images)
    ncols = max(1, min(int(ncols), n))
    nrows, (h, w) = math.ceil(n / ncols), images.shape[1:3]
    gap, band = _spacing(scale, lines, fontsize)
    white = 1.0 if np.issubdtype(images.dtype, np.floating) else 255
    canvas = np.full((nrows * (h + band), ncols * (w + gap), images.shape[-1]), white, images.dtype)
    for k in range(n):
        r, c = divmod(k, ncols)
        canvas[r * (h + band) + band :][:h, c * (w + gap) + gap // 2 :][:, :w] = images[k]
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for k, caption in enumerate(captions):
        r, c = divmod(k, ncols)
        ax.text(c * (w + gap) + gap / 2 + w / 2, r * (h + band) + band - 0.03 / scale, caption,
                ha="center", va="bottom", fontsize=fontsize, color=colors[k] if colors else "black",
                fontweight="bold" if bold and bold[k] else "normal")  # fmt: skip


def grid_shape(
    n: int, ncols: int, side: int, scale: float, lines: int, fontsize: float = 8
) -> tuple[float, float]:
    """(width, height) in inches of captioned_grid's canvas for n images of side pixels."""
    ncols = max(1, min(int(ncols), n))
    gap, band = _spacing(scale, lines, fontsize)
    return ncols * (side + gap) * scale, math.ceil(n / ncols) * (side + band) * scale


def _mosaic(
    images: np.ndarray,
    captions: Sequence[str],
    out: Path,
    title: str,
    *,
    ncols: int,
    cell: float,
    lines: int,
    colors: Sequence[str] | None = None,
    bold: Sequence[bool] | None = None,
) -> Path:
    """A captioned grid of images under a title, as a PNG. cell: inches per image side."""
    images, n = _check_images(images), len(images)
    if n == 0:
        raise ValueError("no images to plot")
    if images.ndim == 3:  # grayscale -> RGB
        images = np.repeat(images[..., None], 3, axis=-1)
    scale = cell / max(images.shape[1:3])
    width, height = grid_shape(n, ncols, max(images.shape[1:3]), scale, lines)
    title_height = 0.45
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height + title_height), facecolor="white")
        ax = fig.add_axes((0, 0, 1, height / (height + title_height)))
        captioned_grid(ax, images, captions, ncols=ncols, scale=scale, lines=lines, colors=colors, bold=bold)
        fig.suptitle(
            title, fontsize=_grid_title_size(n, ncols), y=1 - 0.1 / (height + title_height), va="top"
        )
        return _save(fig, out, tight=False)


def _confidence(p: float) -> str:
    """A probability as a short percentage that still tells 99.5% from 99.99% (confident errors)."""
    if p < 0.995:
        return f"{100.0 * p:.0f}%"
    return ">99.99%" if p > 0.99995 else f"{100.0 * p:.2f}%"


def plot_predictions(
    images: np.ndarray,
    true: np.ndarray,
    pred: np.ndarray,
    class_names: list[str],
    out: Path,
    probs: np.ndarray | None = None,
    ncols: int = 8,
    title: str | None = None,
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
    captions = [
        class_names[pred[k]]
        + (f" ({_confidence(conf[k])})" if conf is not None else "")
        + f"\ntrue: {class_names[true[k]]}"
        for k in range(n)
    ]
    return _mosaic(
        images,
        captions,
        out,
        title or f"Predictions: {int(correct.sum())}/{n} correct (green right, red wrong)",
        ncols=ncols,
        cell=1.35,
        lines=2,
        colors=[CORRECT_COLOR if c else WRONG_COLOR for c in correct],
        bold=list(~correct),  # not colour alone
    )


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
    return _mosaic(images, [class_names[i] for i in labels], out, title, ncols=ncols, cell=1.25, lines=1)


def _reliability_panel(ax_rel: Any, ax_hist: Any, bins: Mapping[str, Any], title: str) -> None:
    edges = np.asarray(bins["edges"], dtype=float)
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    count = np.asarray(bins["count"], dtype=float)
    acc = np.array([np.nan if a is None else a for a in bins["accuracy"]], dtype=float)
    conf = np.array([np.nan if c is None else c for c in bins["confidence"]], dtype=float)
    filled = count > 0
    ax_rel.bar(
        centres[filled],
        acc[filled],
        width=width[filled],
        color=BAR_COLOR,
        edgecolor="white",
        label="accuracy",
    )
    # The gap between confidence and accuracy, drawn from accuracy up (over-) or down (under-confident).
    ax_rel.bar(
        centres[filled],
        (conf - acc)[filled],
        bottom=acc[filled],
        width=width[filled],
        color=GAP_COLOR,
        alpha=0.55,
        edgecolor=MEAN_COLOR,
        hatch="//",
        lw=0.6,
        label="gap to confidence",
    )
    ax_rel.plot([0, 1], [0, 1], ls="--", color=DIAGONAL_COLOR, lw=1.2, label="perfect calibration")
    # Sparse bins swing the MCE: say how few images they hold.
    for x, a, c, n in zip(centres, acc, conf, count, strict=True):
        if 0 < n < 50:
            ax_rel.text(
                x, min(max(a, c) + 0.02, 0.97), f"n={int(n)}", ha="center", fontsize=7, color="#333333"
            )
    ax_rel.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy", title=title)
    ax_rel.set_aspect("auto")
    ax_rel.grid(True, alpha=0.3)
    ax_rel.legend(loc="upper left")
    share = count / max(count.sum(), 1) * 100.0
    ax_hist.bar(centres, share, width=width, color="#999999", edgecolor="white")
    ax_hist.set(xlim=(0, 1), xlabel="Confidence (probability of the predicted class)", ylabel="% of images")
    ax_hist.grid(True, axis="y", alpha=0.3)


def plot_reliability(
    before: Mapping[str, Any],
    out: Path,
    after: Mapping[str, Any] | None = None,
    temperature: float | None = None,
) -> Path:
    """Reliability diagram(s): accuracy against confidence per bin, with the share of images per bin below.

    before/after are calibration_metrics() dicts (keys reliability, ece, mce); after is the same under
    temperature scaling, drawn beside it when given.
    """
    panels = [("Before temperature scaling", before)]
    if after is not None:
        label = (
            f"After temperature scaling (T = {temperature:.3f})"
            if temperature
            else "After temperature scaling"
        )
        panels.append((label, after))
    with matplotlib.rc_context(_STYLE):
        fig = _figure((5.6 * len(panels), 6.4))
        axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=(3.2, 1.0), sharex="col")
        for k, (name, metrics) in enumerate(panels):
            title = f"{name}\nECE {metrics['ece'] * 100:.2f}%   MCE {metrics['mce'] * 100:.2f}%"
            _reliability_panel(axes[0, k], axes[1, k], metrics["reliability"], title)
        n_bins = len(before["reliability"]["count"])
        fig.suptitle(f"Reliability diagram ({n_bins} equal-width confidence bins, test set)")
        return _save(fig, out)


def plot_corruptions(
    table: Mapping[str, Sequence[float]],
    clean: float | Mapping[str, float],
    out: Path,
    title: str | None = None,
    mean_label: str = "mean",
) -> Path:
    """Accuracy (%) against corruption severity, one line per corruption (or run); severity 0 is clean.

    clean is the accuracy on the clean images: one for all lines, or one per line.
    """
    if not table:
        raise ValueError("plot_corruptions: no corruptions given")
    names = list(table)
    start = {n: float(clean[n] if isinstance(clean, Mapping) else clean) for n in names}
    severities = np.arange(len(next(iter(table.values()))) + 1)
    lines = {n: np.concatenate([[start[n]], np.asarray(table[n], dtype=float)]) * 100.0 for n in names}
    mean = np.mean(list(lines.values()), axis=0)
    with matplotlib.rc_context(_STYLE):
        fig = _figure((9.5, 5.2))
        ax = fig.subplots()
        for k, name in enumerate(names):
            ax.plot(
                severities,
                lines[name],
                color=SERIES_COLORS[k % 10],
                marker=SERIES_MARKERS[k % 10],
                ms=5,
                lw=1.4,
                label=name.replace("_", " "),
            )
        if len(names) > 1:
            ax.plot(
                severities,
                mean,
                color="black",
                ls="--",
                lw=2.6,
                label=f"{mean_label} ({mean[1:].mean():.1f}% over severities 1-5)",
            )
        ax.set_xticks(severities, labels=["clean"] + [str(s) for s in severities[1:]])
        ax.set(xlabel="Severity", ylabel="Test accuracy (%)", ylim=(0, 100))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_title(title or "Accuracy under common corruptions (regenerated CIFAR-10-C approximation)")
        return _save(fig, out)


def plot_runs_curves(runs: Mapping[str, list[dict]], out: Path) -> Path:
    """Training curves of several runs overlaid: loss (train solid, validation dashed) and accuracy (%)."""
    if not runs or not any(runs.values()):
        raise ValueError("plot_runs_curves: no runs with metrics given")
    with matplotlib.rc_context(_STYLE):
        fig = _figure((11.5, 4.6))
        ax_loss, ax_acc = fig.subplots(1, 2)
        for k, (name, rows) in enumerate(runs.items()):
            if not rows:
                continue
            color = SERIES_COLORS[k % 10]
            epochs = _column(rows, "epoch")
            scale = 100.0 if np.nanmax(np.append(_column(rows, "train_acc"), 0)) <= 1.0 else 1.0
            for key, ax, ls, suffix in (
                ("train_loss", ax_loss, "-", "train"),
                ("val_loss", ax_loss, "--", "val"),
                ("train_acc", ax_acc, "-", "train"),
                ("val_acc", ax_acc, "--", "val"),
            ):
                values = _column(rows, key) * (scale if key.endswith("acc") else 1.0)
                if np.isfinite(values).any():
                    ax.plot(epochs, values, color=color, ls=ls, lw=1.5, label=f"{name} ({suffix})")
        for ax, name in ((ax_loss, "Loss"), (ax_acc, "Accuracy (%)")):
            ax.set_xlabel("Epoch")
            ax.set_ylabel(name)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        ax_loss.set_title("Loss (solid train, dashed validation)")
        ax_acc.set_title("Accuracy (solid train, dashed validation)")
        handles, labels = ax_acc.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), fontsize=8)
        fig.suptitle(f"Training curves of {len(runs)} runs")
        return _save(fig, out)


def plot_run_comparison(
    names: Sequence[str],
    accuracy: Sequence[float],
    interval: Sequence[tuple[float, float] | None],
    out: Path,
    ece: Sequence[float | None] | None = None,
) -> Path:
    """Test accuracy of each run as a dot with its 95% interval (and ECE beside it when given)."""
    if not names:
        raise ValueError("plot_run_comparison: no runs given")
    y = np.arange(len(names))
    acc = np.asarray(accuracy, dtype=float) * 100.0
    panels = 2 if ece is not None and any(e is not None for e in ece) else 1
    with matplotlib.rc_context(_STYLE):
        fig = _figure((5.2 * panels + 1.5, 0.5 * len(names) + 2.0))
        axes = fig.subplots(1, panels, squeeze=False, sharey=True)[0]
        ax = axes[0]
        lo = np.array([a - (i[0] * 100 if i else a) for a, i in zip(acc, interval, strict=True)])
        hi = np.array([(i[1] * 100 if i else a) - a for a, i in zip(acc, interval, strict=True)])
        ax.errorbar(acc, y, xerr=[lo, hi], fmt="o", color=BAR_COLOR, ecolor=BAR_COLOR, capsize=4, ms=6)
        for a, yy, h in zip(acc, y, hi, strict=True):
            ax.annotate(
                f"{a:.2f}%", (a + h, yy), xytext=(6, 0), textcoords="offset points", va="center", fontsize=9
            )
        if len(names) > 1:
            ax.axvline(acc.mean(), color=MEAN_COLOR, ls="--", lw=1.3, label=f"mean {acc.mean():.2f}%")
            ax.legend(loc="lower left")
        span = max((acc + hi).max() - (acc - lo).min(), 1.0)
        ax.set_xlim((acc - lo).min() - 0.15 * span, (acc + hi).max() + 0.45 * span)
        ax.set_yticks(y, labels=list(names))
        ax.invert_yaxis()
        ax.set(xlabel="Test accuracy (%) with 95% interval", title="Test accuracy")
        ax.grid(True, axis="x", alpha=0.3)
        if panels == 2:
            e = np.array([np.nan if v is None else v * 100.0 for v in ece], dtype=float)
            bars = axes[1].barh(y, np.nan_to_num(e), height=0.55, color=GAP_COLOR)
            axes[1].bar_label(
                bars, labels=["n/a" if np.isnan(v) else f"{v:.2f}%" for v in e], padding=3, fontsize=9
            )
            axes[1].set_xlim(0, np.nanmax(np.append(e, 1.0)) * 1.3)
            axes[1].set(xlabel="Expected calibration error (%)", title="ECE (before temperature scaling)")
            axes[1].grid(True, axis="x", alpha=0.3)
        fig.suptitle(f"{len(names)} runs compared on the test set")
        return _save(fig, out)
