"""The figures' shared look and their one writer: colours, rcParams, a figure builder, an atomic PNG save.

Figures are built on ``matplotlib.figure.Figure`` directly, never through ``pyplot``, so no global
figure state is created or leaked and no backend has to be selected: ``Figure.savefig`` renders PNGs
with Agg on its own. Style is applied with ``rc_context`` so the caller's rcParams are left untouched.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..runs import write_atomic

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

STYLE: dict[str, Any] = {
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


def figure(figsize: tuple[float, float]) -> Figure:
    """A white, constrained-layout figure that is not registered with pyplot."""
    return Figure(figsize=figsize, layout="constrained", facecolor="white")


def save_figure(fig: Figure, out: str | Path, tight: bool = True) -> Path:
    """Write the figure as PNG (creating parent directories) and release its memory.

    Rendered in memory, then written by runs.write_atomic: a failed or killed write leaves the old file
    (or none), never a partial PNG. tight: crop to the drawn content (a second layout pass); figures laid
    out by hand skip it.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=DPI, format="png", bbox_inches="tight" if tight else None, pad_inches=0.15)
    finally:
        fig.clear()
    write_atomic(out, png.getbuffer())
    return out


def num(value: Any) -> float:
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


def column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([num(row.get(key)) for row in rows], dtype=float)
