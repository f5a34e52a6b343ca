"""Your own images: a folder of class subfolders -> the same uint8 arrays as CIFAR-10's.

    PATH/<class>/*.png|jpg|...                    a test split is drawn from it (stratified, fixed seed)
    PATH/train/<class>/...  and  PATH/test/<class>/...   (test/ optional)

The class names are the folder names, sorted (as torchvision's ImageFolder does). Every file is read with
images.py's bounded reader and decoder (the one predict and serve use), so an image bomb is refused by the
same bound. Files that are not readable images are skipped and counted, never fatal. A symbolic link is
followed only if it leads to a place inside PATH (folder_scan.py). The decoded arrays are cached under a key
made of every file's name, size and mtime (folder_cache.py); the sha256 of the source bytes identifies the
data in the run's records. Which files are test files is recorded in the run (`test_files`), so that
`evaluate` later uses the same ones even if the folder has grown.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import images as I
from .errors import DataError
from .folder_cache import cache_key, cache_path, read_cache, write_cache
from .folder_decode import Decoded, decode_scan, hashed
from .folder_scan import DEFAULT_MAX_CLASSES, SHOWN, Scan, scan, shown
from .sources import Dataset

# At most this many bytes of decoded pixels (all images together): bounds memory whatever the folder holds.
MAX_ARRAY_BYTES = 4 * 2**30
TEST_FRACTION = 0.2  # of each class, when there is no test/ folder
SPLIT_SEED = 0  # fixed: the same folder always gives the same test files


@dataclass
class FolderData(Dataset):
    """The arrays of a folder (as every Dataset holds them), which files are test files, and what was skipped.

    verified is False: there is no published checksum of your images to check them against. What was checked
    is check(): the files' bytes hashed as they were read, or a cache whose key (every file's name, size and
    mtime) matched and whose arrays were re-hashed.
    """

    root: str = ""
    test_files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0  # test images equal (decoded) to a training image
    seconds: float = 0.0
    cached: bool = False
    files: int = 0  # the image files scanned (those read, or matched by the cache's key)
    cache: str = ""  # the cache's key (its first 12 hex digits), "" without a cache

    def check(self) -> str:
        """What was checked of the arrays (never "verified": nothing published to check them against)."""
        cache = f", cache {self.cache}" if self.cache else ""
        if self.cached:
            return f"cache hit, re-hashed: {self.files:,} files unchanged in name, size and mtime{cache}"
        return f"read from the folder: {self.files:,} files hashed{cache}"

    def provenance(self) -> dict:
        return {
            "source": self.source,
            "kind": "folder",
            "root": self.root,
            "verified": self.verified,
            "checked": self.check(),
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
            k = len(self.skipped)
            files = (
                "1 file that is not a readable image"
                if k == 1
                else f"{k:,} files that are not readable images"
            )
            out.append(f"skipped {files} (first: {first})")
        if self.duplicates:
            out.append(
                f"warning: {self.duplicates:,} test images are identical to training images (leakage: the "
                "test accuracy will be optimistic); remove the copies from one side"
            )
        return out


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
    key = cache_key(s, image_size)
    path = cache_path(key, cache_dir)
    decoded = read_cache(path, key, image_size) if path else None
    cached = decoded is not None
    if decoded is None:
        if progress:
            print(
                f"reading {len(s.files):,} images of {shown(str(s.root))} (cached for the next run)",
                file=sys.stderr,
            )
        decoded = hashed(decode_scan(s, image_size))
        if path:
            write_cache(path, key, decoded)
    data = _split(s, decoded, test_files)
    data.seconds, data.cached = time.perf_counter() - started, cached
    data.files, data.cache = len(s.files), key[:12] if path else ""
    return data


def _split(s: Scan, d: Decoded, test_files: Sequence[str] | None) -> FolderData:
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
        verified=False,  # nothing published to verify your images against (check() says what was checked)
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


def _is_train(s: Scan, d: Decoded) -> np.ndarray:
    return np.array([sp != "test" for sp in d.splits], bool)


def _skip_hint(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    name, why = skipped[0]
    return f"; {len(skipped):,} files were skipped (first: {shown(name)}: {why})"


def _recorded_test(s: Scan, d: Decoded, test_files: Sequence[str]) -> np.ndarray:
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
