"""Scanning a folder of class subfolders: its layout, classes and image files, bounded and inside PATH.

    PATH/<class>/*.png|jpg|...    or    PATH/train/<class>/...  and  PATH/test/<class>/...   (test/ optional)

The class names are the folder names, sorted (as torchvision's ImageFolder does). At most MAX_SCANNED entries
are looked at; a symbolic link is followed only if it leads to a place inside PATH. Nothing is read here but
directory entries: decoding is folder_decode.py's.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import images as I
from .errors import DataError, first_line

DEFAULT_MAX_CLASSES = 1000
MAX_CLASS_NAME = 200  # characters, as weights.MAX_TEXT
MAX_SCANNED = 2_000_000  # directory entries looked at, all folders together
SHOWN = 3  # skipped files named in a message


@dataclass
class Scan:
    """What a scan of PATH found: the classes and each image file (relative path, class index, split)."""

    root: Path
    layout: str  # "flat" (PATH/<class>) or "split" (PATH/train, PATH/test)
    classes: tuple[str, ...]
    files: list[tuple[str, int, str]]  # (path relative to root, class index, "train" | "test" | "")
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)


def shown(name: str) -> str:
    """A file name as a message can show it: one line, printable, whatever bytes it has."""
    text = ascii(name)[1:-1] if not _printable(name) else name
    return text if len(text) <= 120 else text[:117] + "..."


def _printable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 byte, as os.fsdecode keeps it (a lone surrogate)
        return False
    return not any(unicodedata.category(c).startswith("C") for c in name)


def is_image_folder(root: Path) -> bool:
    """True if root holds at least one sub-folder that is not hidden (a layout of class folders)."""
    try:
        with os.scandir(root) as it:
            return any(not e.name.startswith(".") and e.is_dir(follow_symlinks=False) for e in it)
    except OSError:
        return False


def scan(root: str | os.PathLike, *, max_classes: int = DEFAULT_MAX_CLASSES) -> Scan:
    """The layout of root, its classes (sorted folder names) and image files; DataError if it has none."""
    root = Path(root)
    real = _real_dir(root)
    budget = [MAX_SCANNED]
    names = _subdirs(root, real, budget)
    if "train" in names:
        classes = _classes(root / "train", real, max_classes, budget)
        files, skipped = _class_files(root, "train", classes, real, budget)
        if "test" in names:
            test_classes = _classes(root / "test", real, max_classes, budget)
            unknown = sorted(set(test_classes) - set(classes))
            if unknown:
                raise DataError(
                    f"{root / 'test'} has class folders that {root / 'train'} lacks "
                    f"({', '.join(map(shown, unknown[:SHOWN]))}); the classes must be the same"
                )
            more, more_skipped = _class_files(root, "test", classes, real, budget, only=test_classes)
            files += more
            skipped += more_skipped
        return _checked(Scan(root, "split", tuple(classes), files, skipped))
    classes = _classes(root, real, max_classes, budget)
    files, skipped = _class_files(root, "", classes, real, budget)
    return _checked(Scan(root, "flat", tuple(classes), files, skipped))


def _real_dir(root: Path) -> Path:
    try:
        mode = root.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{root} does not exist; pass --data-dir a folder of class subfolders") from None
    except OSError as e:
        raise DataError(f"cannot read {root} ({first_line(e)})") from None
    if not stat.S_ISDIR(mode):
        raise DataError(f"{root} is not a folder; pass --data-dir a folder of class subfolders")
    return root.resolve()


def _entries(folder: Path, budget: list[int]) -> list[os.DirEntry]:
    """The non-hidden entries of folder, sorted by name; a one-line error if it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            out = []
            for e in it:
                budget[0] -= 1
                if budget[0] < 0:
                    raise DataError(f"{folder}: more than {MAX_SCANNED:,} files and folders; refusing it")
                if not e.name.startswith("."):
                    out.append(e)
    except PermissionError as e:
        raise DataError(f"cannot list {shown(str(folder))} ({e.strerror}); check its permissions") from None
    except OSError as e:
        raise DataError(f"cannot list {shown(str(folder))} ({first_line(e)})") from None
    return sorted(out, key=lambda e: e.name)


def _inside(path: str, real_root: Path) -> bool:
    """Whether path, with every symbolic link resolved, is real_root or under it."""
    return Path(os.path.realpath(path)).is_relative_to(real_root)


def _subdirs(folder: Path, real_root: Path, budget: list[int]) -> list[str]:
    """Names of the sub-folders of folder (a link to a folder counts only if it stays inside the root)."""
    out = []
    for e in _entries(folder, budget):
        if e.is_symlink() and not _inside(e.path, real_root):
            continue
        if e.is_dir():
            out.append(e.name)
    return out


def _classes(folder: Path, real_root: Path, max_classes: int, budget: list[int]) -> list[str]:
    names = _subdirs(folder, real_root, budget)
    if not names:
        raise DataError(
            f"{shown(str(folder))} has no class folders; it should hold one folder of images per class "
            "(PATH/<class>/*.png), or train/ and test/ folders of them"
        )
    if len(names) < 2:
        raise DataError(
            f"{shown(str(folder))} has one class folder only ({shown(names[0])}); a classifier needs 2 or more"
        )
    if len(names) > max_classes:
        raise DataError(
            f"{shown(str(folder))} has {len(names):,} class folders, more than --max-classes {max_classes:,}"
        )
    for name in names:
        if not _printable(name) or len(name) > MAX_CLASS_NAME:
            raise DataError(
                f"class folder {shown(name)!r} in {shown(str(folder))}: a class name must be printable UTF-8 "
                f"text of at most {MAX_CLASS_NAME} characters (no newlines); rename the folder"
            )
    return names


def _class_files(
    root: Path,
    split: str,
    classes: Sequence[str],
    real_root: Path,
    budget: list[int],
    only: Iterable[str] | None = None,
) -> tuple[list[tuple[str, int, str]], list[tuple[str, str]]]:
    """The candidate image files of each class folder (recursively), and the entries skipped on the way."""
    exts = I.image_extensions()
    files: list[tuple[str, int, str]] = []
    skipped: list[tuple[str, str]] = []
    base = root / split if split else root
    for name in only if only is not None else classes:
        label = classes.index(name)
        stack = [(base / name, f"{split}/{name}/" if split else f"{name}/")]
        while stack:
            folder, prefix = stack.pop()
            for e in _entries(folder, budget):
                rel = prefix + e.name
                if e.is_symlink():
                    if not _inside(e.path, real_root):
                        skipped.append((rel, "a symbolic link leading outside the folder; not followed"))
                        continue
                    if e.is_dir():
                        skipped.append((rel, "a symbolic link to a folder; not followed"))
                        continue
                if e.is_dir(follow_symlinks=False):
                    stack.append((Path(e.path), rel + "/"))
                elif os.path.splitext(e.name)[1].lower() in exts or not e.is_file():
                    files.append((rel, label, split))  # special files are refused (and counted) when read
                else:
                    skipped.append((rel, "not an image file"))
    files.sort()
    return files, skipped


def _checked(s: Scan) -> Scan:
    if not s.files:
        raise DataError(f"{shown(str(s.root))} holds no image files under its class folders")
    return s
