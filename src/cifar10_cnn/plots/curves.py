"""Training curves: one run's loss and accuracy by epoch, and several runs' overlaid."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator

from .style import BEST_COLOR, SERIES_COLORS, STYLE, TRAIN_COLOR, VAL_COLOR, column, figure, save_figure


def plot_curves(rows: list[dict], out: Path) -> Path:
    """Loss and accuracy (%) by epoch for train and validation, with the best validation epoch marked."""
    if not rows:
        raise ValueError("plot_curves: metrics has no rows; train for at least one epoch first")
    epochs = column(rows, "epoch")
    if np.isnan(epochs).any():
        epochs = np.arange(1, len(rows) + 1, dtype=float)
    train_loss, val_loss = column(rows, "train_loss"), column(rows, "val_loss")
    train_acc, val_acc = column(rows, "train_acc"), column(rows, "val_acc")
    # metrics.csv stores fractions; tolerate files that already store percentages.
    accs = np.concatenate([train_acc, val_acc])
    scale = 1.0 if np.isfinite(accs).any() and np.nanmax(accs) > 1.0 else 100.0
    train_acc, val_acc = train_acc * scale, val_acc * scale
    marker = "o" if len(rows) <= 40 else None

    with matplotlib.rc_context(STYLE):
        fig = figure((11.0, 4.3))
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
        return save_figure(fig, out)


def plot_runs_curves(runs: Mapping[str, list[dict]], out: Path) -> Path:
    """Training curves of several runs overlaid: loss (train solid, validation dashed) and accuracy (%)."""
    if not runs or not any(runs.values()):
        raise ValueError("plot_runs_curves: no runs with metrics given")
    with matplotlib.rc_context(STYLE):
        fig = figure((11.5, 4.6))
        ax_loss, ax_acc = fig.subplots(1, 2)
        for k, (name, rows) in enumerate(runs.items()):
            if not rows:
                continue
            color = SERIES_COLORS[k % 10]
            epochs = column(rows, "epoch")
            scale = 100.0 if np.nanmax(np.append(column(rows, "train_acc"), 0)) <= 1.0 else 1.0
            for key, ax, ls, suffix in (
                ("train_loss", ax_loss, "-", "train"),
                ("val_loss", ax_loss, "--", "val"),
                ("train_acc", ax_acc, "-", "train"),
                ("val_acc", ax_acc, "--", "val"),
            ):
                values = column(rows, key) * (scale if key.endswith("acc") else 1.0)
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
        return save_figure(fig, out)
