"""CIFAR-10 data: sources -> verified uint8 arrays (cached) -> splits -> device tensors -> batch augmentation.

Every source (the official download, that archive on disk, its extracted folder, or a train.npz/test.npz
pair) ends up as the same arrays: images (N, 32, 32, 3) uint8 RGB and labels (N,) int64, checked against
the content sha256 of the real CIFAR-10. They are cached as plain .npy files, re-hashed on every read.
Nothing read from a file sizes an allocation without a bound: every file is opened only if it is a regular
file, archive members and batch files have size caps, and .npy headers are checked before any data is read.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import DataError, first_line
from .runs import write_atomic

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

# sha256 of arr.tobytes() of the real CIFAR-10 in its original order (images NHWC uint8, labels int64).
SHA256 = {
    "train_images": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
    "train_labels": "f5cfe00b0f00968c0cc5ff3b1d2de51b10e33efa277c2986f4e0fa63e58c9f4f",
    "test_images": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
    "test_labels": "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb",
}
ARRAY_NAMES = tuple(SHA256)

# The true per-channel statistics of the 50,000 training images, pixels scaled to [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

DATA_ENV = "CIFAR10_DATA"
CACHE_ENV = "CIFAR10_CACHE"


# The members of the real cifar-10-python.tar.gz and their sizes in bytes: nothing else is extracted, and
# nothing larger (a repacked archive may hold smaller batches, e.g. a subset).
MEMBER_SIZES = {
    "data_batch_1": 31035704,
    "data_batch_2": 31035320,
    "data_batch_3": 31035999,
    "data_batch_4": 31035696,
    "data_batch_5": 31035623,
    "test_batch": 31035526,
    "batches.meta": 158,
    "readme.html": 88,
}
# All that a tar of those members may unpack to, headers and padding included.
UNPACKED_LIMIT = sum(MEMBER_SIZES.values()) + 2**20
# A batch file in an extracted folder: the real ones are 31 MB; one re-pickled by Python 3 is at most ~1.5x.
MAX_BATCH_FILE = 64 * 2**20
BATCH_IMAGES = 10_000
# CIFAR-10 has 50,000 training and 10,000 test images: no source may hold more (this bounds memory).
MAX_IMAGES = {"train": 50_000, "test": 10_000}
IMAGE_SHAPE = (32, 32, 3)
MAX_META_JSON = 2**16


@dataclass
class CIFAR10:
    """The dataset as numpy arrays, where it came from, and whether its content sha256 is the real CIFAR-10."""

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


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CIFAR10_DATA, else ./data."""
    return Path(data_dir or os.environ.get(DATA_ENV) or "data").expanduser()


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    allow_unverified: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str = URL,
    md5: str = MD5,
) -> CIFAR10:
    """Load CIFAR-10 from the first source found in data_dir, downloading the archive if there is none.

    `verified` is computed from the arrays returned, on every load (the cache is re-hashed too).
    """
    root = resolve_data_dir(data_dir)
    kind, paths = find_source(root)
    if kind is None:
        if not download:
            raise DataError(f"no CIFAR-10 found in {root}; put the data there or allow the download")
        paths = [fetch_archive(root, url=url, md5=md5, progress=progress)]
        kind = "archive"
    source = f"{kind}:{paths[0]}"
    cache = _cache_path(kind, paths, cache_dir)
    data = _read_cache(cache, source) if cache else None
    if data is None:
        arrays = _read_source(kind, paths, root)
        check_arrays(arrays, source)
        sha = content_sha256(arrays)
        data = CIFAR10(**arrays, source=source, verified=sha == SHA256, sha256=sha)
        if cache:
            _write_cache(cache, data)
    if not data.verified and not allow_unverified:
        bad = [name for name in ARRAY_NAMES if data.sha256.get(name) != SHA256[name]]
        raise DataError(
            f"the data from {data.source} is not the real CIFAR-10 ({', '.join(bad)} differ in sha256); "
            "replace it, or pass --allow-unverified to use it anyway"
        )
    return data


def content_sha256(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of each array's bytes in C order (equal to hashing arr.tobytes(), without the copy)."""
    return {
        name: hashlib.sha256(memoryview(np.ascontiguousarray(arrays[name])).cast("B")).hexdigest()
        for name in ARRAY_NAMES
    }


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


def fetch_archive(root: Path, *, url: str = URL, md5: str = MD5, progress: bool = True) -> Path:
    """Download the archive into root, checking its md5; the file appears only when complete and right."""
    import pooch  # imported here: only the download needs it
    import requests

    pooch.get_logger().setLevel("WARNING")  # the progress bar says it; errors are ours to word
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = pooch.retrieve(url, known_hash=f"md5:{md5}", fname=ARCHIVE, path=root, progressbar=progress)
    except ValueError as e:  # pooch's hash mismatch
        raise DataError(
            f"download of {url} failed its md5 check ({first_line(e)}); nothing was kept"
        ) from None
    except (requests.RequestException, OSError) as e:
        cause = _root_cause(e)
        if isinstance(cause, OSError) and cause.errno in _WRITE_ERRNOS:
            raise DataError(
                f"cannot download into {root} ({first_line(cause)}); the archive needs 163 MB there: "
                f"free some space or pass --data-dir (or set {DATA_ENV}) to a writable folder"
            ) from None
        raise DataError(
            f"cannot download {url} ({first_line(cause)}); check the network, or put the data in {root} "
            f"(or pass --data-dir / set {DATA_ENV})"
        ) from None
    return Path(path)


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (a refused connection rather than the retry wrapper around it)."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    return e


# --- reading files: regular files only, each with a size bound ---------------------------------------------


def _open_regular(path: Path, what: str) -> BinaryIO:
    """path opened for reading if it is a regular file (never blocks on a FIFO, never reads a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {what}") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({first_line(e)}); {what}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{path} is not a regular file ({_file_kind(mode)}); {what}")
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a device",
        stat.S_ISBLK: "a device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most limit bytes."""
    with _open_regular(path, what) as f:
        payload = f.read(limit + 1)
    if len(payload) > limit:
        raise DataError(f"{path} is larger than {limit:,} bytes; {what}")
    return payload


# --- the archive: only the known members, each within its known size; kept only when verified -------------


class _Capped(io.RawIOBase):
    """A read-only stream that fails once more than limit bytes were read from it (a decompression bomb)."""

    def __init__(self, f: BinaryIO, limit: int, archive: Path) -> None:
        self._f, self._left, self._archive = f, limit, archive

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        self._left -= n
        if self._left < 0:
            raise DataError(
                f"{self._archive} unpacks to more than {UNPACKED_LIMIT:,} bytes, more than the real CIFAR-10 "
                "python archive; refusing it"
            )
        return n


def extract_archive(archive: Path, target: Path) -> dict[str, np.ndarray]:
    """The arrays of a CIFAR-10 python archive, read member by member in memory.

    Only the known members are read, each within its known size; links, devices, unknown names and
    duplicates are refused. The members are also staged in target/.extract-*, and moved into place as
    target/cifar-10-batches-py/ only if the arrays are the real CIFAR-10 (sha256): an unverified folder
    would shadow the archive as a source on later runs. Staging is best effort: a read-only or full disk
    only means that nothing is kept.
    """
    stage = _Stage(target)
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with (
            _open_regular(archive, "the CIFAR-10 python archive is needed") as raw,
            gzip.GzipFile(fileobj=raw) as gz,
            tarfile.open(fileobj=_Capped(gz, UNPACKED_LIMIT, archive), mode="r|") as tar,
        ):
            for member in tar:
                name = _member_name(member, archive)
                if name is None:
                    continue
                if name in stage.seen:
                    raise DataError(f"archive member {member.name!r} appears twice in {archive}; refusing it")
                payload = tar.extractfile(member).read()
                stage.add(name, payload)
                if name in (*TRAIN_BATCHES, TEST_BATCH):
                    batches[name] = parse_batch(payload, f"{archive}:{member.name}")
        missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if name not in batches]
        if missing:
            raise DataError(f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-10 python archive")
        arrays = _join_batches(batches)
        stage.keep(target / BATCHES_DIR, content_sha256(arrays) == SHA256)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{archive} is not a readable CIFAR-10 archive ({first_line(e)}); delete it and retry"
        ) from None
    finally:
        stage.discard()
    return arrays


def _member_name(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The file name of a member we extract, None for the batches folder entry itself; refuse anything else."""
    parts = member.name.replace("\\", "/").split("/")
    if member.name.startswith("/") or ".." in parts:
        raise DataError(
            f"archive member {member.name!r} of {archive} would be written outside the target folder; refusing it"
        )
    if member.name.removeprefix("./").rstrip("/") in (BATCHES_DIR, ".") and member.isdir():
        return None
    if not member.isfile():
        raise DataError(
            f"archive member {member.name!r} of {archive} is {_member_kind(member)}; the CIFAR-10 archive holds "
            "only regular files; refusing it"
        )
    path = member.name.removeprefix("./")  # as `tar -C dir .` would write it
    name = path.removeprefix(f"{BATCHES_DIR}/")
    if name not in MEMBER_SIZES or path != f"{BATCHES_DIR}/{name}":
        raise DataError(
            f"archive member {member.name!r} of {archive} is not part of the CIFAR-10 archive; refusing it"
        )
    if member.size > MEMBER_SIZES[name]:
        raise DataError(
            f"archive member {member.name!r} of {archive} is {member.size:,} bytes, more than the "
            f"{MEMBER_SIZES[name]:,} of the real file; refusing it"
        )
    return name


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.isdev():
        return "a FIFO" if member.isfifo() else "a device"
    return "a folder" if member.isdir() else "a special entry"


class _Stage:
    """target/.extract-*/cifar-10-batches-py, written as the members are read; best effort throughout."""

    def __init__(self, target: Path) -> None:
        self.seen: set[str] = set()
        try:
            self.root: Path | None = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
            (self.root / BATCHES_DIR).mkdir()
        except OSError:  # read-only, full, or not a folder: the arrays are read in memory all the same
            self.root = None

    def add(self, name: str, payload: bytes) -> None:
        self.seen.add(name)
        if self.root is None:
            return
        try:
            with open(self.root / BATCHES_DIR / name, "xb") as f:
                f.write(payload)
        except OSError:  # e.g. the disk is full: keep nothing
            self.discard()

    def keep(self, final: Path, verified: bool) -> None:
        """Move the staged folder to final if the arrays verified and final does not exist (no clobbering)."""
        if self.root is None or not verified or final.exists() or final.is_symlink():
            return
        with contextlib.suppress(OSError):  # e.g. final appeared meanwhile: it is not ours to replace
            os.rename(self.root / BATCHES_DIR, final)

    def discard(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)  # our own mkdtemp folder
            self.root = None


# --- batch files: safe unpickling, every field checked ---------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batch dicts and nothing else: no arbitrary classes or functions."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


_UNPICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError, AttributeError,
    MemoryError, OverflowError, RecursionError, UnicodeError,
)  # fmt: skip


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file -> (images NHWC uint8, labels int64), without trusting the pickle."""
    return parse_batch(
        _read_capped(path, MAX_BATCH_FILE, "the CIFAR-10 batches folder is incomplete"), str(path)
    )


def parse_batch(payload: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of one batch file -> (images NHWC uint8, labels int64); where names it in errors."""
    try:
        batch = _SafeUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except _UNPICKLE_ERRORS as e:
        raise DataError(f"{where} is not a CIFAR-10 batch file ({first_line(e)})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where} is not a CIFAR-10 batch file (no dict with b'data' and b'labels')")
    data, labels = batch[b"data"], batch[b"labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(data) > BATCH_IMAGES
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"{where} holds data of {got}, expected uint8 (N, 3072) with N at most {BATCH_IMAGES:,}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), _batch_labels(labels, len(data), where)


def _batch_labels(labels: object, n: int, where: str) -> np.ndarray:
    """The labels of a batch: a list (or integer array) of n class indices."""
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.shape == (n,):
        ok = n == 0 or (labels.min() >= 0 and labels.max() < len(CLASSES))
    elif isinstance(labels, list) and len(labels) == n:
        ok = all(type(v) is int and 0 <= v < len(CLASSES) for v in labels)
    else:
        ok = False
    if not ok:
        raise DataError(f"{where}: its labels must be {n} integers in 0..{len(CLASSES) - 1}")
    return np.array(labels, dtype=np.int64)


def _join_batches(batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        "train_images": np.concatenate([batches[name][0] for name in TRAIN_BATCHES]),
        "train_labels": np.concatenate([batches[name][1] for name in TRAIN_BATCHES]),
        "test_images": batches[TEST_BATCH][0],
        "test_labels": batches[TEST_BATCH][1],
    }


def _read_source(kind: str, paths: list[Path], root: Path) -> dict[str, np.ndarray]:
    if kind == "archive":
        return extract_archive(paths[0], root)
    if kind == "batches":
        return _join_batches({name: read_batch(paths[0] / name) for name in (*TRAIN_BATCHES, TEST_BATCH)})
    arrays = {}
    for split, path in zip(("train", "test"), paths, strict=True):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = read_npz(path, split)
    return arrays


# --- .npz and .npy: the header is checked (shape, dtype, bound) before any data is read ------------------


_NPZ_ERRORS = (
    zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, ValueError, OSError, NotImplementedError,
    RuntimeError,  # an encrypted member
)  # fmt: skip


def read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels int64) from an .npz holding 'images' (N,32,32,3) uint8 and integer 'labels' (N,)."""
    what = f"it should hold the CIFAR-10 {split} set as numpy.savez writes it (arrays 'images' and 'labels')"
    with _open_regular(path, what) as f:
        if f.read(6) == b"\x93NUMPY":
            raise DataError(f"{path} is a single .npy array, not an .npz archive; {what}")
        try:
            f.seek(0)
            with zipfile.ZipFile(f) as npz:
                with npz.open("images.npy") as member:
                    images = read_npy(member, f"{path}:images", MAX_IMAGES[split], IMAGE_SHAPE, np.uint8)
                with npz.open("labels.npy") as member:
                    labels = read_npy(member, f"{path}:labels", MAX_IMAGES[split], (), None)
        except KeyError:
            raise DataError(f"{path} lacks an array 'images' or 'labels'; {what}") from None
        except _NPZ_ERRORS as e:
            raise DataError(f"{path} is not a readable .npz file ({first_line(e)}); {what}") from None
    return images, labels.astype(np.int64)


def read_npy(
    f: BinaryIO, where: str, max_rows: int, row_shape: tuple[int, ...], dtype: type | None
) -> np.ndarray:
    """One .npy array from f: (N, *row_shape) with N <= max_rows, of dtype (None: any integer type).

    The header is checked before anything is allocated, so a header claiming a huge shape costs nothing.
    """
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, found = header(f)
    dtype_ok = found == dtype if dtype is not None else found.kind in "iu"
    expected = (
        f"{np.dtype(dtype).name if dtype else 'integer'} (N, {', '.join(map(str, row_shape))})".replace(
            ", )", ")"
        )
    )
    if not dtype_ok or len(shape) != 1 + len(row_shape) or tuple(shape[1:]) != row_shape:
        raise DataError(f"{where} is {found} {str(shape)[:80]}, expected {expected}")
    if not 0 <= shape[0] <= max_rows:
        raise DataError(f"{where} holds {shape[0]:,} rows; CIFAR-10 has at most {max_rows:,}")
    flat = np.empty(int(np.prod(shape)), dtype=found)
    view, got = memoryview(flat.view(np.uint8)), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise DataError(f"{where} is truncated ({got:,} of {len(view):,} data bytes)")
        got += n
    if f.read(1):  # also makes a zip member check its CRC
        raise DataError(f"{where} holds more bytes than its header says")
    return flat.reshape(shape, order="F" if fortran else "C")


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    """Shapes, dtypes, sizes (1 to the CIFAR-10 count) and label range of the four arrays."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{where}: {split} images are {images.dtype} {images.shape}, expected uint8 (N,32,32,3)"
            )
        if labels.shape != (len(images),):
            raise DataError(f"{where}: {len(labels)} {split} labels for {len(images)} images")
        if not 1 <= len(images) <= MAX_IMAGES[split]:
            raise DataError(
                f"{where}: the {split} set holds {len(images):,} images; it needs 1 to {MAX_IMAGES[split]:,}"
            )
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            raise DataError(f"{where}: {split} labels outside 0..{len(CLASSES) - 1}")


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


def _read_cache(path: Path, source: str) -> CIFAR10 | None:
    """The cached arrays if they are intact: their sha256 equals the one recorded for source; else None."""
    try:
        meta = json.loads(_read_capped(path / "meta.json", MAX_META_JSON, "cache"))
        sha = meta["sha256"] if isinstance(meta, dict) and meta.get("source") == source else None
        if not isinstance(sha, dict) or set(sha) != set(ARRAY_NAMES):
            return None
        arrays = {}
        for name in ARRAY_NAMES:
            split, part = name.split("_")
            with _open_regular(path / f"{name}.npy", "cache") as f:
                if part == "images":
                    arrays[name] = read_npy(f, name, MAX_IMAGES[split], IMAGE_SHAPE, np.uint8)
                else:
                    arrays[name] = read_npy(f, name, MAX_IMAGES[split], (), np.int64)
        check_arrays(arrays, "cache")
        found = content_sha256(arrays)
    except (DataError, OSError, ValueError, UnicodeError):
        return None
    if found != sha:  # changed since it was written: rebuild from the source
        return None
    return CIFAR10(**arrays, source=source, verified=found == SHA256, sha256=found)


def _write_cache(path: Path, data: CIFAR10) -> None:
    """Best effort: a read-only or full disk only costs the speed-up. meta.json, written last, marks it whole."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)
        for name in ARRAY_NAMES:
            buffer = io.BytesIO()
            np.save(buffer, getattr(data, name))
            write_atomic(path / f"{name}.npy", buffer.getbuffer())
        write_atomic(
            path / "meta.json",
            json.dumps({"source": data.source, "sha256": data.sha256, "time": time.time()}),
        )
    except OSError:
        pass  # write_atomic removed its own temporary file


# --- splits -----------------------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): val_size images held out with classes in proportion, chosen by seed."""
    n = len(labels)
    if not 0 <= val_size < n:
        raise DataError(f"--val-size {val_size} must be less than the {n} training images")
    if val_size == 0:
        return np.arange(n), np.arange(0)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation so that the per-class shares add up to val_size exactly.
    exact = counts * val_size / n
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: val_size - take.sum()]] += 1
    val = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    )
    val.sort()
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train, val


def stratified_fold(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of fold `fold` of `folds` stratified folds.

    Each class is shuffled by seed; the classes, one after another, are dealt to the folds in turn, so the folds
    partition the images, their sizes differ by one at most and each keeps the class proportions.
    """
    if not 2 <= folds <= len(labels) or not 0 <= fold < folds:
        raise DataError(f"fold {fold} of {folds} is not possible with {len(labels)} training images")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    val = np.sort(order[fold::folds])
    return np.setdiff1d(np.arange(len(labels)), val, assume_unique=True), val


@dataclass
class Split:
    """Images (N, 3, 32, 32) uint8 in channels_last memory, and labels, on the training device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def to_split(images: np.ndarray, labels: np.ndarray, device: torch.device | str = "cpu") -> Split:
    """NHWC numpy -> an NCHW tensor view whose memory is channels_last (no copy on CPU)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return Split(x.to(device, non_blocking=True), y.to(device, non_blocking=True))


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split


def make_splits(
    data: CIFAR10,
    *,
    val_size: int,
    split_seed: int,
    subset: int | None = None,
    folds: int = 0,
    fold: int = 0,
    device: torch.device | str = "cpu",
) -> Splits:
    """Train/validation from the (first `subset`) training images; the test set as it is.

    With folds (cross-validation), validation is fold `fold` of that many stratified folds, not val_size.
    """
    images, labels = data.train_images, data.train_labels
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    if folds:
        train_idx, val_idx = stratified_fold(labels, folds, fold, split_seed)
    else:
        train_idx, val_idx = stratified_split(labels, val_size, split_seed)
    return Splits(
        train=to_split(images[train_idx], labels[train_idx], device),
        val=to_split(images[val_idx], labels[val_idx], device),
        test=to_split(data.test_images, data.test_labels, device),
    )


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Index batches over n items: shuffled with the generator, in order without one."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
