"""Every dataset the product trains on: CIFAR-10, CIFAR-100 and your own folder of images, through one call.

`load_data(data_dir, dataset=..., ...)` is what the pipeline (one run, seeds, cross-validation), tuning and
evaluation call. The folder and CIFAR-100 sources are registered here (sources.py knows only CIFAR-10), in the
order a folder is recognised: CIFAR-10's files, then CIFAR-100's, then class subfolders. A run on a folder
records which files were its test files (test_files.json), so that `evaluate` uses the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import cifar100, folder_scan, folders
from .constants import IMAGE_SIZE
from .errors import DataError, UserError
from .files import read_json_object
from .runs import Run, write_json
from .sources import SOURCES, Dataset, Source, load_cifar10, register_source, resolve_data_dir


def _cifar100(
    data_dir=None, *, labels: str = "fine", allow_unverified: bool = False, progress: bool = True, **_
):
    return cifar100.load_cifar100(
        data_dir, labels=labels, allow_unverified=allow_unverified, progress=progress
    )


def _folder(
    data_dir=None,
    *,
    max_classes: int = 1000,
    image_size: int = IMAGE_SIZE,
    test_files=None,
    progress: bool = True,
    **_,
):
    return folders.load_folder(resolve_data_dir(data_dir), max_classes=max_classes, image_size=image_size,
                               test_files=test_files, progress=progress)  # fmt: skip


def _cifar10(data_dir=None, *, allow_unverified: bool = False, progress: bool = True, **_):
    return load_cifar10(data_dir, allow_unverified=allow_unverified, progress=progress)


def _holds_cifar100(root: Path) -> bool:
    return (root / cifar100.ARCHIVE).is_file() or (root / cifar100.FOLDER).is_dir()


register_source(Source("cifar100", _cifar100, _holds_cifar100))
register_source(Source("folder", _folder, folder_scan.is_image_folder))


def detect(root: Path) -> str:
    """The kind of dataset root holds: the first source that recognises it, else cifar10 (downloaded there)."""
    return next((s.name for s in SOURCES.values() if s.holds(root)), "cifar10")


def load_data(
    data_dir: str | os.PathLike | None = None,
    *,
    dataset: str = "auto",
    labels: str = "fine",
    max_classes: int = folder_scan.DEFAULT_MAX_CLASSES,
    image_size: int = IMAGE_SIZE,
    allow_unverified: bool = False,
    progress: bool = True,
    test_files: Sequence[str] | None = None,
) -> Dataset:
    """The dataset in data_dir (dataset auto: whatever it holds), as the same arrays for every kind; a folder's
    images resized to image_size (CIFAR's are 32x32: another size for them is refused)."""
    root = resolve_data_dir(data_dir)
    kind = detect(root) if dataset == "auto" else dataset
    if kind not in SOURCES:
        raise UserError(f"unknown dataset {dataset!r}; choose one of auto, {', '.join(SOURCES)}")
    if labels != "fine" and kind != "cifar100":
        raise UserError(f"--labels {labels} is for CIFAR-100; {root} holds {kind} data")
    if image_size != IMAGE_SIZE and kind != "folder":
        raise UserError(
            f"--image-size {image_size} is for a folder of your own images; {root} holds {kind} data, whose "
            f"images are {IMAGE_SIZE}x{IMAGE_SIZE} (leave --image-size out)"
        )
    loader = {"cifar10": _cifar10, "cifar100": _cifar100, "folder": _folder}.get(kind, SOURCES[kind].load)
    return loader(root, labels=labels, max_classes=max_classes, image_size=image_size,
                  allow_unverified=allow_unverified, progress=progress, test_files=test_files)  # fmt: skip


def notes(data: Dataset) -> list[str]:
    """What a run should print about its data (skipped files, leakage); nothing for CIFAR."""
    return [data.summary(), *data.notes()] if isinstance(data, folders.FolderData) else []


# --- the run's record of its test files ------------------------------------------------------------------------


def record_test_files(run: Run, data: Dataset) -> None:
    """test_files.json: the folder and the files of a folder run's test set (nothing for CIFAR)."""
    if isinstance(data, folders.FolderData):
        write_json(run.file("test_files"), {"root": data.root, "test_files": data.test_files})


def recorded(run_dir: Path) -> tuple[str | None, list[str] | None]:
    """(folder, test files) a run recorded, or (None, None) for a run that has no such record."""
    # A folder's test files: up to about a million names (the record of a run of ours, bounded all the same).
    record = read_json_object(Run(run_dir).file("test_files"), limit=64 * 2**20)
    if not record:
        return None, None
    root, files = record.get("root"), record.get("test_files")
    if not isinstance(root, str) or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise DataError(f"{Run(run_dir).file('test_files')} is not a record of test files; it was changed")
    return root, files


def load_run_data(
    run_dir: Path | None, cfg_args: dict[str, Any], data_dir: str | os.PathLike | None, **kw: Any
) -> Dataset:
    """The data of a run (to evaluate or resume it): its recorded folder and test files when it has them."""
    root, files = recorded(run_dir) if run_dir is not None else (None, None)
    if data_dir is None:
        data_dir = root or (_cifar100_dir(run_dir) if run_dir is not None else None)
    return load_data(data_dir, **cfg_args, test_files=files, **kw)


def _cifar100_dir(run_dir: Path) -> str | None:
    """Where a CIFAR-100 run's data was (results.json: data.source), if it is there still."""
    data = Run(run_dir).read_results().get("data")
    source = data.get("source") if isinstance(data, dict) and data.get("kind") == "cifar100" else None
    if not isinstance(source, str) or ":" not in source:
        return None
    path = Path(source.split(":", 1)[1])
    return str(path.parent) if path.exists() else None
