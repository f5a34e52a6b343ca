"""Your own images: a folder of class subfolders -> the same uint8 arrays as CIFAR-10's.

    PATH/<class>/*.png|jpg|...                    a test split is drawn from it (stratified, fixed seed)
    PATH/train/<class>/...  and  PATH/test/<class>/...   (test/ optional)

The class names are the folder names, sorted (as torchvision's ImageFolder does). Every file is read with
images.py's bounded reader and decoder (the one predict and serve use), so an image bomb is refused by the
same bound. Files that are not readable images are skipped and counted, never fatal. A symbolic link is
followed only if it leads to a place inside PATH. The decoded arrays are cached under a key made of every
file's name, size and mtime (stat only: a second run loads in about a second); the cache holds the sha256
of the arrays, re-hashed on every read, and the sha256 of the source bytes, which identifies the data in the
run's records. Which files are test files is recorded in the run (`test_files`), so that `evaluate` later
uses the same ones even if the folder has grown.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import images as I
from .errors import DataError, first_line
from .readers import open_regular, read_capped, read_npy
from .sources import CACHE_ENV, Dataset

DEFAULT_MAX_CLASSES = 1000
MAX_CLASS_NAME = 200  # characters, as weights.MAX_TEXT
# At most this many bytes of decoded pixels (all images together): bounds memory whatever the folder holds.
MAX_ARRAY_BYTES = 4 * 2**30
MAX_SCANNED = 2_000_000  # directory entries looked at, all folders together
TEST_FRACTION = 0.2  # of each class, when there is no test/ folder
SPLIT_SEED = 0  # fixed: the same folder always gives the same test files
SHOWN = 3  # skipped files named in a message
MAX_META_JSON = 256 * 2**20
DECODE_WORKERS: int | None = None  # processes that read and decode files (None: the CPUs, at most 8)
PROCESS_MIN = 2000  # fewer files are decoded in this process (starting workers costs about a second)
CHUNK = 1000  # files per task of a worker


@dataclass
class Scan:
    """What a scan of PATH found: the classes and each image file (relative path, class index, split)."""

    root: Path
    layout: str  # "flat" (PATH/<class>) or "split" (PATH/train, PATH/test)
    classes: tuple[str, ...]
    files: list[tuple[str, int, str]]  # (path relative to root, class index, "train" | "test" | "")
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)


@dataclass
class FolderData(Dataset):
    """The arrays of a folder (as every Dataset holds them), which files are test files, and what was skipped.

    verified: there is nothing to check a folder against; the arrays are those of its files (or of a cache
    that matched them).
    """

    root: str = ""
    test_files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0  # test images equal (decoded) to a training image
    seconds: float = 0.0
    cached: bool = False

    def provenance(self) -> dict:
        return {
            "source": self.source,
            "kind": "folder",
            "root": self.root,
            "verified": self.verified,
            "sha256": self.sha256,
            "classes": list(self.classes),
            "skipped": len(self.skipped),
            "skipped_first": [f"{name}: {why}" for name, why in self.skipped[:SHOWN]],
            "train_test_duplicates": self.duplicates,
        }

    def summary(self) -> str:
        """One line: how many images of how many classes, and how long they took to read."""
        n = len(self.train_labels) + len(self.test_labels)
        how = "from the cache" if self.cached else "decoded, and cached for the next run"
        return f"{n:,} images of {len(self.classes)} classes read in {self.seconds:.1f} s ({how})"

    def notes(self) -> list[str]:
        """The lines a run prints about this data: skipped files and leakage."""
        out = []
        if self.skipped:
            first = "; ".join(f"{shown(n)}: {why}" for n, why in self.skipped[:SHOWN])
            out.append(f"skipped {len(self.skipped):,} files that are not readable images (first: {first})")
        if self.duplicates:
            out.append(
                f"warning: {self.duplicates:,} test images are identical to training images (leakage: the "
                "test accuracy will be optimistic); remove the copies from one side"
            )
        return out


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


# --- scan: the layout, the classes and their files, bounded and without leaving PATH -------------------------


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


# --- decode: every file with the bounded reader and decoder of predict and serve, in parallel ---------------


def decode_files(
    root: Path, rels: Sequence[str], size: int = I.IMAGE_SIZE, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str | None], str]:
    """uint8 (N, size, size, 3) of the files, a mask of those decoded, the reason for each failure, and the
    sha256 of all the files' names and bytes (in order).

    Decoding a small image is mostly Python (Pillow's per-file overhead), so threads do not help: a large set
    is decoded in chunks by worker processes, each with its share of the budget. They are forked, as
    PyTorch's DataLoader workers are on Linux: spawned ones would import the main module again, which runs a
    user's script a second time unless it has an `if __name__ == "__main__"` guard.
    """
    # 50,000 PNGs on 2 CPUs (benchmarks/folder_load.py): 9.5 s in one process, 6.9 s in two (on a machine
    # busy with other work, 19 s and 22 s: processes help when the second core is free).
    n = workers or DECODE_WORKERS or min(8, os.cpu_count() or 1)
    if n > 1 and len(rels) >= PROCESS_MIN and _can_fork():
        parts = _in_processes(str(root), list(rels), size, n)
    else:
        parts = [_decode_chunk(str(root), list(rels), size, I.DECODE_BUDGET)]
    out = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, size, size, 3), np.uint8)
    errors = [e for p in parts for e in p[1]]
    total = hashlib.sha256()
    for rel, d in zip(rels, (d for p in parts for d in p[2]), strict=True):
        total.update(os.fsencode(rel) + b"\0" + d)
    ok = np.array([e is None for e in errors], bool)
    return out, ok, errors, total.hexdigest()


def _decode_chunk(
    root: str, rels: list[str], size: int, budget_bytes: int
) -> tuple[np.ndarray, list[str | None], list[bytes]]:
    """The pixels, errors and sha256 digests of some files, one after another (also a worker's job)."""
    out = np.zeros((len(rels), size, size, 3), np.uint8)
    errors: list[str | None] = [None] * len(rels)
    digests = [b""] * len(rels)
    budget = I.DecodeBudget(budget_bytes)
    for i, rel in enumerate(rels):
        try:
            payload = I.read_file(os.path.join(root, rel))
            digests[i] = hashlib.sha256(payload).digest()
            out[i] = I.load_image(payload, budget=budget, size=size)
        except I.ImageError as e:
            errors[i] = str(e).split(" (PNG, ")[0]  # the list of supported formats, once is enough
    return out, errors, digests


def _can_fork() -> bool:
    """Linux, and no other Python thread that a fork could catch holding a lock (elsewhere: one process)."""
    import threading

    return sys.platform.startswith("linux") and threading.active_count() == 1


def _in_processes(root: str, rels: list[str], size: int, n: int) -> list:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    chunks = [rels[i : i + CHUNK] for i in range(0, len(rels), CHUNK)]
    k = len(chunks)
    try:
        with ProcessPoolExecutor(min(n, k), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_decode_chunk, [root] * k, chunks, [size] * k, [I.DECODE_BUDGET // n] * k))
    except BrokenProcessPool:
        raise DataError(
            f"a process decoding the images of {shown(root)} died (out of memory?); retry with fewer at once"
        ) from None


# --- the whole source: scan -> cache or decode -> test split -----------------------------------------------


def load_folder(
    root: str | os.PathLike,
    *,
    max_classes: int = DEFAULT_MAX_CLASSES,
    image_size: int = I.IMAGE_SIZE,
    test_files: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> FolderData:
    """The images of a folder of class subfolders as arrays, split into train and test.

    test_files (a run's record) names the test files of a flat layout; without it they are drawn anew,
    stratified with a fixed seed, so the same folder always gives the same split.
    """
    started = time.perf_counter()
    s = scan(root, max_classes=max_classes)
    limit = MAX_ARRAY_BYTES // (image_size * image_size * 3)
    if len(s.files) > limit:
        raise DataError(
            f"{shown(str(s.root))} holds {len(s.files):,} image files; at most {limit:,} fit in memory"
        )
    key = _cache_key(s, image_size)
    path = _cache_path(key, cache_dir)
    decoded = _read_cache(path, key, image_size) if path else None
    cached = decoded is not None
    if decoded is None:
        if progress:
            print(
                f"reading {len(s.files):,} images of {shown(str(s.root))} (cached for the next run)",
                file=sys.stderr,
            )
        decoded = _hashed(_decode_scan(s, image_size))
        if path:
            _write_cache(path, key, decoded)
    data = _split(s, decoded, test_files)
    data.seconds, data.cached = time.perf_counter() - started, cached
    return data


@dataclass
class _Decoded:
    """The readable files of a scan: their names, labels, splits, pixels; the failures; the bytes' sha256."""

    rels: list[str]
    labels: np.ndarray
    splits: list[str]
    images: np.ndarray
    skipped: list[tuple[str, str]]
    files_sha256: str
    sha256: dict[str, str] = field(default_factory=dict)  # of the images and labels arrays


def _decode_scan(s: Scan, size: int) -> _Decoded:
    rels = [f[0] for f in s.files]
    pixels, ok, errors, files_sha = decode_files(s.root, rels, size)
    failed = [(rel, err) for rel, err in zip(rels, errors, strict=True) if err is not None]
    keep = np.flatnonzero(ok)
    return _Decoded(
        rels=[rels[i] for i in keep],
        labels=np.array([s.files[i][1] for i in keep], np.int64),
        splits=[s.files[i][2] for i in keep],
        images=pixels[keep] if len(keep) < len(rels) else pixels,
        skipped=sorted(s.skipped + failed),
        files_sha256=files_sha,
    )


def _hashed(d: _Decoded) -> _Decoded:
    d.sha256 = {"images": _sha(d.images), "labels": _sha(d.labels)}
    return d


def _split(s: Scan, d: _Decoded, test_files: Sequence[str] | None) -> FolderData:
    """Train/test of the decoded files: test/ in a split layout, else the recorded or a fresh stratified set."""
    empty = [c for i, c in enumerate(s.classes) if not np.any(d.labels[_is_train(s, d)] == i)]
    if empty:
        raise DataError(
            f"class folder {shown(empty[0])} of {shown(str(s.root))} holds no readable image"
            + (f" ({len(empty) - 1} more classes neither)" if len(empty) > 1 else "")
            + _skip_hint(d.skipped)
        )
    if s.layout == "split":
        test = np.array([sp == "test" for sp in d.splits], bool)
    elif test_files is not None:
        test = _recorded_test(s, d, test_files)
    else:
        test = _stratified_test(d.labels, TEST_FRACTION, SPLIT_SEED)
    if not test.any():
        raise DataError(f"{shown(str(s.root))}: no readable test image{_skip_hint(d.skipped)}")
    train = ~test
    duplicates = _duplicates(d.images, train, test)
    arrays = {
        "train_images": d.images[train],
        "train_labels": d.labels[train],
        "test_images": d.images[test],
        "test_labels": d.labels[test],
    }
    return FolderData(
        **arrays,
        classes=s.classes,
        source=f"folder:{s.root}",
        verified=True,
        root=str(s.root.resolve()),
        sha256={"files": d.files_sha256, **d.sha256},  # the source bytes, and the decoded arrays
        test_files=[r for r, t in zip(d.rels, test, strict=True) if t],
        skipped=d.skipped,
        duplicates=duplicates,
    )


def _duplicates(images: np.ndarray, train: np.ndarray, test: np.ndarray) -> int:
    """How many test images equal some training image, pixel for pixel.

    A 64-bit fingerprint of each image (a random linear map, vectorised) finds the candidates; each candidate
    is then compared exactly, so a fingerprint collision never counts.
    """
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    words = flat.view(np.uint64) if flat.shape[1] % 8 == 0 else flat.astype(np.uint64)  # 8 pixels a word
    weights = np.random.default_rng(0).integers(1, 2**63, words.shape[1], dtype=np.uint64) | np.uint64(1)
    fp = np.zeros(len(flat), np.uint64)
    for start in range(0, len(flat), 4096):  # in blocks, to keep the product small
        fp[start : start + 4096] = (words[start : start + 4096] * weights).sum(axis=1, dtype=np.uint64)
    by_fp: dict[int, list[int]] = {}
    for i in np.flatnonzero(train):
        by_fp.setdefault(int(fp[i]), []).append(int(i))
    return sum(
        1
        for i in np.flatnonzero(test)
        if any(np.array_equal(flat[i], flat[j]) for j in by_fp.get(int(fp[i]), ()))
    )


def _is_train(s: Scan, d: _Decoded) -> np.ndarray:
    return np.array([sp != "test" for sp in d.splits], bool)


def _skip_hint(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    name, why = skipped[0]
    return f"; {len(skipped):,} files were skipped (first: {shown(name)}: {why})"


def _recorded_test(s: Scan, d: _Decoded, test_files: Sequence[str]) -> np.ndarray:
    wanted = set(test_files)
    test = np.array([r in wanted for r in d.rels], bool)
    missing = len(wanted) - int(test.sum())
    if missing:
        gone = sorted(wanted - set(d.rels))
        raise DataError(
            f"{missing:,} of the run's {len(wanted):,} test files are no longer readable images in "
            f"{shown(str(s.root))} (first: {shown(gone[0])}); the test set would differ from the run's"
        )
    return test


def _stratified_test(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A mask of the test images: round(fraction) of each class by seed, leaving each class 1 training image."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx) - 1, max(1, round(len(idx) * fraction))) if len(idx) > 1 else 0
        test[rng.permutation(idx)[:k]] = True
    return test


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


# --- the cache: keyed by every file's name, size and mtime; its arrays re-hashed on every read --------------


def _cache_key(s: Scan, size: int) -> str:
    """sha256 of the root, layout, classes, image size and each file's name, split, size and mtime."""
    h = hashlib.sha256(
        f"folder-v1\0{s.root.resolve()}\0{s.layout}\0{size}\0".encode("utf-8", "surrogateescape")
    )
    h.update("\0".join(s.classes).encode() + b"\n")
    base = os.path.join(s.root, "")
    for rel, label, split in s.files:
        try:
            st = os.stat(base + rel)
            stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_mode}"
        except OSError as e:
            stamp = f"error {e.errno}"
        h.update(os.fsencode(rel) + f"\0{label}\0{split}\0{stamp}\n".encode())
    return h.hexdigest()


def _cache_path(key: str, cache_dir: str | os.PathLike | None) -> Path | None:
    base = cache_dir or os.environ.get(CACHE_ENV)
    if base == "off":
        return None
    base = (
        Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar10-cnn"
    )
    return base / "folders" / key[:24]


def _read_cache(path: Path, key: str, size: int) -> _Decoded | None:
    """The cached decode if it is whole and intact (its sha256 as recorded), else None."""
    try:
        meta = json.loads(read_capped(path / "meta.json", MAX_META_JSON, "cache"))
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        n = len(meta["rels"])
        with open_regular(path / "images.npy", "cache") as f:
            images = read_npy(f, "cache", n, (size, size, 3), np.uint8)
        with open_regular(path / "labels.npy", "cache") as f:
            labels = read_npy(f, "cache", n, (), np.int64)
        sha = {"images": _sha(images), "labels": _sha(labels)}
        if len(images) != n or len(labels) != n or sha != meta["sha256"]:
            return None
        return _Decoded(
            rels=[str(r) for r in meta["rels"]],
            labels=labels,
            splits=[str(x) for x in meta["splits"]],
            images=images,
            skipped=[(str(a), str(b)) for a, b in meta["skipped"]],
            files_sha256=str(meta["files_sha256"]),
            sha256=sha,
        )
    except (DataError, OSError, ValueError, KeyError, TypeError, UnicodeError):
        return None


def _write_cache(path: Path, key: str, d: _Decoded) -> None:
    """Best effort (a read-only or full disk only costs the speed-up); meta.json, written last, marks it whole."""
    from .runs import write_atomic

    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)
        for name, array in (("images", d.images), ("labels", d.labels)):
            buffer = io.BytesIO()
            np.save(buffer, array)
            write_atomic(path / f"{name}.npy", buffer.getbuffer())
        meta = {
            "key": key,
            "sha256": d.sha256,
            "rels": d.rels,
            "splits": d.splits,
            "skipped": d.skipped,
            "files_sha256": d.files_sha256,
            "time": time.time(),
        }
        write_atomic(path / "meta.json", json.dumps(meta))
    except OSError:
        pass  # write_atomic removed its own temporary file
