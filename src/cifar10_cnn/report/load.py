"""Reading a run directory for the report: bounded in bytes, checked in shape, never trusted.

A file that cannot be read at all (not a regular file, too large, not JSON or CSV, not an object, nested too
deep) is a one-line `FileError` naming it: files.py and runs.read_metrics_csv read every run file, bounded.
A value of the wrong kind inside a file (NaN or 1e999 where a number goes, a string, a list where an object
goes) is dropped and named in `RunData.unreadable`: the report says what it could not read, and a comparison,
which needs each run's test accuracy, refuses a run whose accuracy is unreadable.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import CLASSES
from ..errors import UserError
from ..files import read_json_object
from ..runs import RUN_FILES, SEEDS_SUMMARY, Run, number, read_metrics_csv

# A figure of ours is under 1 MB; with the bounds of files.py and runs.py, they bound one report's memory.
MAX_PNG_BYTES = 16 * 2**20
MAX_EXTRA_PLOTS = 24
MAX_CLASSES = 1000


class RunNotFound(UserError, FileNotFoundError):
    """A path that is not a run directory."""


class ReportError(UserError, ValueError):
    """Run files that cannot make a report (unreadable JSON, runs that cannot be compared)."""


@dataclass
class RunData:
    """What the report needs from a run directory, as plain data."""

    name: str
    path: Path = field(default_factory=Path)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, float | None]] = field(default_factory=list)  # metrics.csv
    results: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval/metrics.json
    robustness: dict[str, Any] = field(default_factory=dict)  # eval/robustness.json, for these weights
    figures: dict[str, Path] = field(default_factory=dict)  # FIGURES key -> file
    extra_plots: list[tuple[Path, str]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "results.json: test_accuracy is NaN, not a number"


# ----------------------------------------------------------------------------- kinds of values

NUM, STR, BOOL, LIST, OBJ = "a number", "a string", "true or false", "a list", "an object"
NUMS, NAMES = "a list of numbers", f"a list of at most {MAX_CLASSES} class names"


def _found(value: Any) -> str:
    """What a value is, in a few words (never the value itself, which may be huge)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "NaN" if value != value else ("infinite" if abs(value) == math.inf else "out of range")
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _fits(value: Any, kind: str) -> bool:
    if kind == NUM:
        return isinstance(value, (int, float)) and number(value) is not None
    if kind == NUMS:
        return isinstance(value, list) and bool(value) and all(_fits(v, NUM) for v in value)
    if kind == NAMES:
        return (
            isinstance(value, list)
            and 0 < len(value) <= MAX_CLASSES
            and all(isinstance(v, str) for v in value)
        )
    types = {STR: str, BOOL: bool, LIST: list, OBJ: dict}[kind]
    return isinstance(value, types)


def checked(
    obj: dict[str, Any], schema: dict[str, Any], where: str, unreadable: list[str], prefix: str = ""
) -> dict[str, Any]:
    """obj without the values that do not fit schema (key -> kind, kinds, or a nested schema); null fits all.

    Each dropped value is named in unreadable; keys the schema does not know are kept as they are.
    """
    out = dict(obj)
    for key, kind in schema.items():
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(kind, dict):
            if isinstance(value, dict):
                out[key] = checked(value, kind, where, unreadable, f"{prefix}{key}.")
                continue
            kinds: tuple[str, ...] = (OBJ,)
        else:
            kinds = kind if isinstance(kind, tuple) else (kind,)
        if not any(_fits(value, k) for k in kinds):
            del out[key]
            unreadable.append(f"{where}: {prefix}{key} is {_found(value)}, not {' or '.join(kinds)}")
    return out


# What the report reads from each file, by kind (what eval_files.py and train.py write).
_NUMBERS = [
    "test_accuracy", "test_top2_accuracy", "test_loss", "macro_f1", "test_brier", "test_ece",
    "test_ece_calibrated", "temperature", "mean_corruption_accuracy", "train_seconds", "eval_seconds",
    "headline_seconds", "best_val_accuracy", "tta_margin", "tta_share", "params", "train_size", "val_size",
    "test_size", "epochs_run", "best_epoch",
]  # fmt: skip
RESULTS = {
    **dict.fromkeys(_NUMBERS, NUM),
    **dict.fromkeys(("model", "recipe", "device", "weights", "created"), STR),
    "tta": (NUM, BOOL),
    "stopped_early": BOOL,
    "test_accuracy_ci95": NUMS,
    "class_names": NAMES,
    "confusion_matrix": LIST,
    "per_class_accuracy": OBJ,
    "per_class": OBJ,
    "data": OBJ,
}
EVALUATION = {
    "model_fingerprint": STR,
    "calibration": {"uncalibrated": OBJ, "calibrated": OBJ, "temperature": NUM, "note": STR, "warning": STR},
    "explanations": {"images": LIST, "method": STR, "layer": STR, "seconds": NUM, "note": STR},
}
ROBUSTNESS = {
    "model_fingerprint": STR,
    "note": STR,
    "seed": NUM,
    "images": NUM,
    "severities": NUMS,
    "clean_accuracy": NUM,
    "accuracy": OBJ,
    "mean_corruption_accuracy": NUM,
    "mean_by_severity": NUMS,
}
CONFIG = {"epochs": NUM, "val_size": NUM, **dict.fromkeys(("model", "recipe", "device"), STR)}
FIGURE_KEYS = [key for key in RUN_FILES if key.endswith("_png")]


def _robustness(rob: dict[str, Any], where: str, unreadable: list[str]) -> dict[str, Any]:
    """The robustness record if its table is whole: a list of accuracies per corruption, all of one length."""
    rob = checked(rob, ROBUSTNESS, where, unreadable)
    if not rob:
        return {}
    table, by_severity = rob.get("accuracy"), rob.get("mean_by_severity")
    lengths = {len(v) if _fits(v, NUMS) else -1 for v in table.values()} if isinstance(table, dict) else {-1}
    n = next(iter(lengths)) if len(lengths) == 1 else -1
    if n < 1 or not by_severity or len(by_severity) != n or len(rob.get("severities") or by_severity) != n:
        unreadable.append(f"{where}: not a table of accuracies by corruption and severity (not shown)")
        return {}
    return rob


def _figures(run: Run, unreadable: list[str]) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """The known figures on disk (FIGURE_KEYS -> file), and the other PNGs in plots/ with captions."""

    def fits(path: Path) -> bool:
        if path.stat().st_size <= MAX_PNG_BYTES:
            return True
        unreadable.append(
            f"{path.relative_to(run.path)}: larger than {MAX_PNG_BYTES // 2**20} MB (not shown)"
        )
        return False

    figures = {key: run.file(key) for key in FIGURE_KEYS if run.file(key).is_file() and fits(run.file(key))}
    plots_dir, known = run.dir("plots"), {run.file(key) for key in FIGURE_KEYS}
    found = sorted(p for p in plots_dir.glob("*.png") if p not in known) if plots_dir.is_dir() else []
    if len(found) > MAX_EXTRA_PLOTS:
        unreadable.append(
            f"plots/: the {len(found) - MAX_EXTRA_PLOTS:,} PNGs after the first {MAX_EXTRA_PLOTS} (not shown)"
        )
    extra = [(p, p.stem.replace("_", " ").capitalize() + ".") for p in found[:MAX_EXTRA_PLOTS]]
    return figures, [(p, caption) for p, caption in extra if p.is_file() and fits(p)]


def explained(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The images of eval/metrics.json's Grad-CAM figure (none: not computed, or Captum missing)."""
    x = evaluation.get("explanations")
    images = x.get("images") if isinstance(x, dict) else None
    return [i for i in images if isinstance(i, dict)] if isinstance(images, list) else []


def load_run(run_dir: Path) -> RunData:
    """A run directory's files as checked plain data; see the module docstring for what is refused."""
    run = Run(Path(run_dir))
    if not run.path.is_dir():
        raise RunNotFound(f"run directory {run.path} does not exist; pass the directory of a training run")
    names = [RUN_FILES[key] for key in ("config", "metrics", "results")]
    if not any((run.path / n).exists() for n in names):
        raise RunNotFound(f"{run.path} is not a run directory: none of {', '.join(names)} found")
    unreadable: list[str] = []

    def read(key: str, schema: dict[str, Any]) -> dict[str, Any]:
        return checked(read_json_object(run.file(key)), schema, RUN_FILES[key], unreadable)

    config, results, evaluation = (
        read("config", CONFIG),
        read("results", RESULTS),
        read("evaluation", EVALUATION),
    )
    robustness = _robustness(read_json_object(run.file("robustness")), RUN_FILES["robustness"], unreadable)
    if robustness.get("model_fingerprint") != evaluation.get("model_fingerprint"):
        robustness = {}  # measured on other weights than the ones evaluated
    metrics = read_metrics_csv(run.file("metrics"), unreadable)
    figures, extra = _figures(run, unreadable)
    if not robustness:
        figures.pop("corruptions_png", None)
    if not explained(evaluation):
        figures.pop("explanations_png", None)  # not from this evaluation
    name = run.path.resolve().name
    return RunData(
        name, run.path, config, metrics, results, evaluation, robustness, figures, extra, unreadable
    )


def class_names(results: dict[str, Any]) -> list[str]:
    """The run's classes: as results.json lists them, else its per-class keys, else CIFAR-10's."""
    names = results.get("class_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    per_class = results.get("per_class_accuracy")
    if isinstance(per_class, dict) and 0 < len(per_class) <= MAX_CLASSES:
        return [str(n) for n in per_class]
    return list(CLASSES)


def expand_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """Run directories from paths; a `--seeds` output directory (summary.json) stands for its runs."""
    out: list[Path] = []
    for p in map(Path, paths):
        summary = p / SEEDS_SUMMARY
        if p.is_dir() and summary.is_file() and not Run(p).file("results").exists():
            runs = read_json_object(summary).get("runs")
            found = [p / Path(str(r)).name for r in runs] if isinstance(runs, list) else []
            out += [r for r in found if r.is_dir()] or sorted(
                d for d in p.iterdir() if Run(d).file("results").is_file()
            )
        else:
            out.append(p)
    return list(dict.fromkeys(out))
