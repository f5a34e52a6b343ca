"""Figures of test scores: confusion, per-class scores, reliability, robustness, runs compared."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from .style import (
    BAR_COLOR,
    DIAGONAL_COLOR,
    F1_COLOR,
    GAP_COLOR,
    MEAN_COLOR,
    PRECISION_COLOR,
    SERIES_COLORS,
    SERIES_MARKERS,
    STYLE,
    figure,
    save_figure,
)

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

    with matplotlib.rc_context(STYLE):
        fig = figure((side + 1.0, side))
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
        return save_figure(fig, out)


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
    # Many classes (e.g. CIFAR-100): recall only, in thin bars (precision and F1 are in the report).
    many = len(names) > MATRIX_NUMBERS
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

    with matplotlib.rc_context(STYLE):
        per_bar = 0.17 if many else 0.42 if len(series) == 1 else 0.62
        fig = figure((7.5 if len(series) == 1 else 8.5, per_bar * len(names) + 1.8))
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
        return save_figure(fig, out)


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
    with matplotlib.rc_context(STYLE):
        fig = figure((5.6 * len(panels), 6.4))
        axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=(3.2, 1.0), sharex="col")
        for k, (name, metrics) in enumerate(panels):
            title = f"{name}\nECE {metrics['ece'] * 100:.2f}%   MCE {metrics['mce'] * 100:.2f}%"
            _reliability_panel(axes[0, k], axes[1, k], metrics["reliability"], title)
        n_bins = len(before["reliability"]["count"])
        fig.suptitle(f"Reliability diagram ({n_bins} equal-width confidence bins, test set)")
        return save_figure(fig, out)


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
    with matplotlib.rc_context(STYLE):
        fig = figure((9.5, 5.2))
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
        return save_figure(fig, out)


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
    with matplotlib.rc_context(STYLE):
        fig = figure((5.2 * panels + 1.5, 0.5 * len(names) + 2.0))
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
        return save_figure(fig, out)
