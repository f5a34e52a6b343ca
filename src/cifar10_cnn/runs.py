"""The run directory: every file a run holds (named here and nowhere else), one atomic writer, and readers.

    runs/<run>/
      .cifar10-run          marker: written first, proof that the folder is a run of ours (--force trusts only it)
      config.json           the TrainConfig            metrics.csv    one row per epoch
      results.json          the run's figures          model.safetensors  final weights (+ temperature)
      checkpoints/          last.pt, best.pt           tb/            TensorBoard events
      plots/, eval/         figures and evaluation     report.md, report.html

A folder is ours only if we made it, or found it empty (`create_run`, `claim_dir`): any other folder with
something in it is refused, left as it was. `--force` deletes only the files in RUN_FILES (and our temporary
and TensorBoard files), and only in a folder that holds the marker; anything else a user put there stays.
`Run.update_results` is the one place where results.json is merged. Every run file is read back bounded
(files.py; `read_metrics_csv` here): a FIFO, a device, a huge or deeply nested file is one line.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import FileError, UserError, first_line
from .files import read_bounded, read_json_object

MARKER = ".cifar10-run"
METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")

# Every file a run writes, by key; the values are paths relative to the run directory.
RUN_FILES = {
    "config": "config.json",
    "metrics": "metrics.csv",
    "results": "results.json",
    "weights": "model.safetensors",
    "report_md": "report.md",
    "report_html": "report.html",
    "last": "checkpoints/last.pt",
    "best": "checkpoints/best.pt",
    "evaluation": "eval/metrics.json",
    "robustness": "eval/robustness.json",
    "reliability_png": "eval/reliability.png",
    "confident_errors_png": "eval/confident_errors.png",
    "corruptions_png": "eval/corruptions.png",
    "explanations_png": "eval/explanations.png",
    "curves_png": "plots/curves.png",
    "confusion_png": "plots/confusion.png",
    "per_class_png": "plots/per_class.png",
    "predictions_png": "plots/predictions.png",
    "augmentations_png": "plots/augmentations.png",
    "test_files": "test_files.json",  # a run on a folder of images: which files are its test set
}
RUN_DIRS = ("checkpoints", "eval", "plots", "tb")
# The summary files of a group of runs (experiments.py): --seeds and --cv.
SEEDS_SUMMARY, CV_SUMMARY = "summary.json", "cv.json"
TMP_PATTERN = re.compile(r"^\..+\.tmp-\d+$")  # write_atomic's temporary files
TB_PATTERN = re.compile(r"^events\.out\.tfevents\.")
# Far above what a run of ours writes (a 10,000-epoch metrics.csv is ~800 KB); they bound a reader's memory.
MAX_CSV_BYTES = 2 * 2**20
MAX_EPOCH_ROWS = 10_000
MAX_MAGNITUDE = 1e15  # beyond every figure of ours; keeps each formatted cell short


# --- the one atomic writer ------------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike, payload: bytes | bytearray | memoryview | str) -> None:
    """Write to a temporary file beside path, fsync, then rename: path is always whole, new or old."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = payload.encode() if isinstance(payload, str) else payload
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def metrics_csv(history: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_FIELDS})
    return out.getvalue()


def number(value: Any) -> float | None:
    """A finite float of plausible size, or None for missing, null, NaN, infinite, huge and non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) and abs(x) <= MAX_MAGNITUDE else None


def read_metrics_csv(
    path: str | os.PathLike, unreadable: list[str] | None = None
) -> list[dict[str, float | None]]:
    """metrics.csv's known columns as numbers ([] without the file), bounded in bytes and rows.

    Values that are not numbers (NaN, infinite, huge, text) read None; the rows after MAX_EPOCH_ROWS are left
    out, and said in unreadable when given.
    """
    path = Path(path)
    data = read_bounded(path, MAX_CSV_BYTES)
    if data is None:
        return []
    rows: list[dict[str, float | None]] = []
    try:
        for row in csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")):
            if len(rows) == MAX_EPOCH_ROWS:
                if unreadable is not None:
                    unreadable.append(f"{path.name}: rows after the first {MAX_EPOCH_ROWS:,} (not shown)")
                break
            rows.append({k: number(row.get(k)) for k in METRIC_FIELDS if k in row})
    except (UnicodeDecodeError, csv.Error) as e:
        raise FileError(f"{path} is not a readable metrics file ({first_line(e)})") from None
    return rows


# --- a run directory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A run directory and the files in it."""

    path: Path

    def file(self, key: str) -> Path:
        return self.path / RUN_FILES[key]

    def dir(self, name: str) -> Path:
        assert name in RUN_DIRS, name
        return self.path / name

    @property
    def is_ours(self) -> bool:
        return (self.path / MARKER).is_file()

    @property
    def started(self) -> bool:
        """Whether an epoch finished (a checkpoint) or the run is done (weights): then it is worth keeping."""
        return self.file("last").exists() or self.file("weights").exists()

    def read_config(self) -> TrainConfig:
        return TrainConfig.load(self.file("config"))

    def write_config(self, cfg: TrainConfig) -> None:
        write_json(self.file("config"), cfg.to_dict())

    def read_results(self) -> dict[str, Any]:
        return read_json_object(self.file("results"))

    def update_results(self, fields: dict[str, Any]) -> dict[str, Any]:
        """results.json merged with fields (the only place it is written); returns the new whole."""
        results = {**self.read_results(), **fields}
        write_json(self.file("results"), results)
        return results

    def read_metrics(self) -> list[dict[str, float | None]]:
        return read_metrics_csv(self.file("metrics"))

    def write_metrics(self, history: Iterable[dict[str, Any]]) -> None:
        write_atomic(self.file("metrics"), metrics_csv(history))

    def mkdir(self, name: str) -> Path:
        path = self.dir(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files that a killed writer of ours left behind (ours by name pattern)."""
        removed = []
        for folder in (self.path, *(self.path / d for d in RUN_DIRS)):
            if folder.is_dir():
                for p in folder.iterdir():
                    if TMP_PATTERN.match(p.name) and p.is_file() and not p.is_symlink():
                        p.unlink(missing_ok=True)
                        removed.append(p)
        return removed

    def clear(self) -> None:
        """Delete what a run of ours wrote here (RUN_FILES, our temporaries and TensorBoard events), no more."""
        for rel in RUN_FILES.values():
            p = self.path / rel
            if p.is_file() or p.is_symlink():
                p.unlink()
        self.remove_stale_temporaries()
        tb = self.dir("tb")
        if tb.is_dir():
            for p in tb.iterdir():
                if TB_PATTERN.match(p.name) and p.is_file():
                    p.unlink()
        for name in RUN_DIRS:
            with contextlib.suppress(OSError):  # only if empty: a user's files keep their folder
                self.dir(name).rmdir()


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.recipe}"


def check_writable_dir(
    path: str | os.PathLike, flag: str = "--out", shown: str | os.PathLike | None = None
) -> None:
    """Refuse (one line) a folder path that cannot be made or written: it, or a folder above it, is a file (or
    a device, FIFO ...), or the nearest existing one is read-only. shown: the path the message names."""
    path = Path(path)
    shown = path if shown is None else shown
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "a file" if parent.is_file() else "a device, FIFO or socket"
                raise UserError(f"{flag} {shown}: {parent} is {what}, not a folder; choose another {flag}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(
                    f"{flag} {shown}: cannot write in {parent} (read-only); choose another {flag}"
                )
            return


def create_run(path: str | os.PathLike, cfg: TrainConfig, *, force: bool) -> Run:
    """A new run directory holding the marker and config.json.

    A folder is ours only if we made it: a new folder, or an existing empty one, gets the marker (an empty
    folder holds nothing --force could ever remove). A folder that holds the marker and a finished epoch is
    refused unless force, which then clears only what that run wrote. Any other folder with something in it
    (a symlink to one included) is refused, and left as it was.
    """
    run = Run(Path(path))
    check_writable_dir(run.path)
    if run.is_ours:
        if run.started and not force:
            raise UserError(
                f"{run.path} already holds a run; pass --resume {run.path} to continue it, "
                "--force to replace it, or choose another --out"
            )
        run.clear()
    elif run.path.is_dir():
        _refuse_foreign(run)
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        write_atomic(run.path / MARKER, "cifar10-cnn run directory\n")
        run.write_config(cfg)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the CLI words these
            raise
        raise UserError(f"cannot create the run directory {run.path} ({first_line(e)})") from None
    return run


def _refuse_foreign(run: Run) -> None:
    """Refuse an existing folder without our marker unless it is empty: it is not ours to write into."""
    taken = [rel for rel in (*RUN_FILES.values(), *RUN_DIRS) if (run.path / rel).exists()]
    if taken:
        raise UserError(
            f"{run.path} holds files that no run of ours wrote ({', '.join(taken[:3])}); "
            "nothing was changed: move them away or choose another --out"
        )
    try:
        entries = sorted(p.name for p in run.path.iterdir())
    except OSError as e:
        raise UserError(
            f"--out {run.path} cannot be listed ({first_line(e)}); choose another --out"
        ) from None
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(
            f"--out {run.path} is a folder that is not empty ({shown}) and holds no run of ours (no {MARKER}); "
            "nothing was changed: give a new or empty folder"
        )


def check_claimable(path: str | os.PathLike) -> None:
    """Refuse (one line, nothing changed) a folder that is not ours to write a run's files into: one under a
    file, read-only, or existing with something in it and no marker."""
    run = Run(Path(path))
    check_writable_dir(run.path)
    if run.path.is_dir() and not run.is_ours:
        _refuse_foreign(run)


def claim_dir(path: str | os.PathLike) -> Run:
    """A folder for a run's files (e.g. the evaluation of a weights file), checked as check_claimable does,
    made and marked as ours (so a later --force may clear what we wrote there)."""
    run = Run(Path(path))
    check_claimable(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.is_ours:
        write_atomic(run.path / MARKER, "cifar10-cnn run directory\n")
    return run


def open_run(path: str | os.PathLike) -> Run:
    """An existing run directory (for --resume, evaluate, report)."""
    run = Run(Path(path))
    if not run.file("config").exists():  # one that is there but unreadable is read_config's one line
        raise UserError(f"{run.path} is not a run directory (no {RUN_FILES['config']})")
    return run
