"""Matplotlib figures for a run: arrays in, one PNG out, written atomically (style.save_figure).

style.py    colours, rcParams, the figure builder and the one PNG writer
curves.py   training curves (one run, several runs)
scores.py   confusion matrix, per-class scores, reliability diagram, robustness, runs compared
grids.py    captioned image grids (predictions, augmentations; explain.py draws its bands with them)
"""

from .curves import plot_curves, plot_runs_curves
from .grids import captioned_grid, grid_shape, plot_image_grid, plot_predictions
from .scores import plot_confusion, plot_corruptions, plot_per_class, plot_reliability, plot_run_comparison
from .style import (
    BAR_COLOR,
    BEST_COLOR,
    CORRECT_COLOR,
    DPI,
    MEAN_COLOR,
    TRAIN_COLOR,
    VAL_COLOR,
    WRONG_COLOR,
    save_figure,
)

__all__ = [
    "BAR_COLOR",
    "BEST_COLOR",
    "CORRECT_COLOR",
    "DPI",
    "MEAN_COLOR",
    "TRAIN_COLOR",
    "VAL_COLOR",
    "WRONG_COLOR",
    "captioned_grid",
    "grid_shape",
    "plot_confusion",
    "plot_corruptions",
    "plot_curves",
    "plot_image_grid",
    "plot_per_class",
    "plot_predictions",
    "plot_reliability",
    "plot_run_comparison",
    "plot_runs_curves",
    "save_figure",
]
