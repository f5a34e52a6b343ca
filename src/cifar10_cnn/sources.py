"""Where a dataset comes from: the registry of sources, CIFAR-10's loader, and the verified cache.

Every CIFAR-10 source (the official download, that archive on disk, its extracted folder, or a
train.npz/test.npz pair) ends up as the same arrays: images (N, 32, 32, 3) uint8 RGB and labels (N,) int64,
checked against the content sha256 of the real CIFAR-10. They are cached as plain .npy files, re-hashed on
every read. A new kind of dataset (an image folder, CIFAR-100) is a `Source` added with `register_source`:
`load_dataset` then finds it by name, or by the folder it is given.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .archive import extract_archive, remove_stale_extractions
from .constants import CLASSES
from .download import ARCHIVE, ARCHIVE_SIZE, DATA_ENV, MD5, URL, fetch_archive, remove_stale_downloads
from .errors import DataError
from .readers import (
    ARRAY_NAMES,
    BATCHES_DIR,
    IMAGE_SHAPE,
    MAX_IMAGES,
    SHA256,
    TEST_BATCH,
    TRAIN_BATCHES,
    check_arrays,
    content_sha256,
    join_batches,
    open_regular,
    read_batch,
    read_capped,
    read_npy,
    read_npz,
)
from .runs import write_atomic

CACHE_ENV = "CIFAR10_CACHE"
MAX_META_JSON = 2**16


@dataclass
class Dataset:
    """A dataset as numpy arrays, its class names, where it came from, and whether its sha256 is the known one."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    verified: bool
    sha256: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] = CLASSES

    def provenance(self) -> dict:
        """Source, verified, and the sha256 of each array, for a run's records."""
        return {"source": self.source, "verified": self.verified, "sha256": self.sha256}

    def check(self) -> str:
        """What was checked, for the run's header: "verified" only if the checksum is the published one."""
        return "verified" if self.verified else "UNVERIFIED"


CIFAR10 = Dataset  # the name it had when CIFAR-10 was the only dataset


# --- the registry: a name, a loader, and how to recognise a folder that holds the dataset -----------------


@dataclass(frozen=True)
class Source:
    """A kind of dataset: load(data_dir, **options) returns a Dataset; holds(folder) says whether it is there.

    options are load_cifar10's keywords (download, allow_unverified, cache_dir, progress); a loader takes
    them all (**_ for those it has no use for), so that callers need not know which source they get.
    """

    name: str
    load: Callable[..., Dataset]
    holds: Callable[[Path], bool]


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> None:
    """Add a source; load_dataset tries the sources in the order they were registered."""
    SOURCES[source.name] = source


def load_dataset(name_or_path: str | os.PathLike | None = None, **options) -> Dataset:
    """The dataset of a registered source by name (options may hold its data_dir), or the one in a folder.

    A str that is a registered name is that name (write ./cifar10 for a folder of that name); anything else
    is a folder, given to the first source that holds it. One that none recognises goes to CIFAR-10, which
    downloads the archive there (or says what is missing). options go to the source's loader.
    """
    if isinstance(name_or_path, str) and name_or_path in SOURCES:
        return SOURCES[name_or_path].load(**options)
    root = resolve_data_dir(name_or_path)
    source = next((s for s in SOURCES.values() if s.holds(root)), SOURCES["cifar10"])
    return source.load(root, **options)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CIFAR10_DATA, else ./data."""
    return Path(data_dir or os.environ.get(DATA_ENV) or "data").expanduser()


# --- CIFAR-10 ------------------------------------------------------------------------------------------------


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    allow_unverified: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str = URL,
    md5: str = MD5,
    size: int = ARCHIVE_SIZE,
) -> Dataset:
    """Load CIFAR-10 from the first source found in data_dir, downloading the archive if there is none.

    `verified` is computed from the arrays returned, on every load (the cache is re-hashed too). url, md5
    and size (the most bytes the download may take) name another copy of the archive, e.g. a mirror.
    """
    root = resolve_data_dir(data_dir)
    remove_stale_downloads(root)  # what killed downloads and extractions left, and only that
    remove_stale_extractions(root)
    kind, paths = find_source(root)
    if kind is None:
        if not download:
            raise DataError(f"no CIFAR-10 found in {root}; put the data there or allow the download")
        paths = [fetch_archive(root, url=url, md5=md5, progress=progress, size=size)]
        kind = "archive"
    source = f"{kind}:{paths[0]}"
    cache = _cache_path(kind, paths, cache_dir)
    found = read_cache(cache, source) if cache else None
    if found is None:
        arrays = _read_source(kind, paths, root)
        check_arrays(arrays, source)
        found = arrays, content_sha256(arrays)
        if cache:
            write_cache(cache, source, *found)
    arrays, sha = found
    data = Dataset(**arrays, source=source, verified=sha == SHA256, sha256=sha)
    if not data.verified and not allow_unverified:
        bad = [name for name in ARRAY_NAMES if data.sha256.get(name) != SHA256[name]]
        raise DataError(
            f"the data from {data.source} is not the real CIFAR-10 ({', '.join(bad)} differ in sha256); "
            "replace it, or pass --allow-unverified to use it anyway"
        )
    return data


def find_source(root: Path) -> tuple[str | None, list[Path]]:
    """The first usable source in root: npz pair, extracted batches, or the archive."""
    if (root / "train.npz").is_file() and (root / "test.npz").is_file():
        return "npz", [root / "train.npz", root / "test.npz"]
    batches = root / BATCHES_DIR
    if batches.is_dir():
        return "batches", [batches]
    if (root / ARCHIVE).is_file():
        return "archive", [root / ARCHIVE]
    return None, []


def _read_source(kind: str, paths: list[Path], root: Path) -> dict[str, np.ndarray]:
    if kind == "archive":
        return extract_archive(paths[0], root)
    if kind == "batches":
        return join_batches({name: read_batch(paths[0] / name) for name in (*TRAIN_BATCHES, TEST_BATCH)})
    arrays = {}
    for split, path in zip(("train", "test"), paths, strict=True):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = read_npz(path, split)
    return arrays


register_source(Source("cifar10", load_cifar10, lambda root: find_source(root)[0] is not None))


# --- cache: the arrays as .npy, re-hashed on every read, so that the second run starts in about a second ----


def _cache_path(kind: str, paths: list[Path], cache_dir: str | os.PathLike | None) -> Path | None:
    base = cache_dir or os.environ.get(CACHE_ENV)
    if base == "off":
        return None
    base = (
        Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar10-cnn"
    )
    if kind == "batches":
        paths = [paths[0] / name for name in (*TRAIN_BATCHES, TEST_BATCH)]
    stamp = [kind]
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        stamp.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return base / hashlib.sha1("\n".join(stamp).encode()).hexdigest()[:16]


def read_cache(path: Path, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """(arrays, sha256) cached for source if they are intact: hashed again, equal to the recorded sha256."""
    try:
        meta = json.loads(read_capped(path / "meta.json", MAX_META_JSON, "cache"))
        sha = meta["sha256"] if isinstance(meta, dict) and meta.get("source") == source else None
        if not isinstance(sha, dict) or set(sha) != set(ARRAY_NAMES):
            return None
        arrays = {}
        for name in ARRAY_NAMES:
            split, part = name.split("_")
            with open_regular(path / f"{name}.npy", "cache") as f:
                if part == "images":
                    arrays[name] = read_npy(f, name, MAX_IMAGES[split], IMAGE_SHAPE, np.uint8)
                else:
                    arrays[name] = read_npy(f, name, MAX_IMAGES[split], (), np.int64)
        check_arrays(arrays, "cache")
        found = content_sha256(arrays)
    except (DataError, OSError, ValueError, UnicodeError):
        return None
    return (arrays, found) if found == sha else None  # changed since it was written: rebuild from the source


def write_cache(path: Path, source: str, arrays: dict[str, np.ndarray], sha: dict[str, str]) -> None:
    """Best effort: a read-only or full disk only costs the speed-up. meta.json, written last, marks it whole."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)
        for name in ARRAY_NAMES:
            buffer = io.BytesIO()
            np.save(buffer, arrays[name])
            write_atomic(path / f"{name}.npy", buffer.getbuffer())
        write_atomic(path / "meta.json", json.dumps({"source": source, "sha256": sha, "time": time.time()}))
    except OSError:
        pass  # write_atomic removed its own temporary file
