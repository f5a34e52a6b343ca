"""Bounded readers of the CIFAR-10 file formats: python batch pickles, .npz/.npy, and the checks on the arrays.

Nothing read from a file sizes an allocation without a bound: a file is opened only if it is a regular file,
batch files have a size cap, .npy headers are checked before any data is read, and pickles are never trusted.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import files
from .constants import CLASSES
from .errors import DataError, first_line

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

# A batch file in an extracted folder: the real ones are 31 MB; one re-pickled by Python 3 is at most ~1.5x.
MAX_BATCH_FILE = 64 * 2**20
BATCH_IMAGES = 10_000
# CIFAR-10 has 50,000 training and 10,000 test images: no source may hold more (this bounds memory).
MAX_IMAGES = {"train": 50_000, "test": 10_000}
IMAGE_SHAPE = (32, 32, 3)


# --- files: regular files only, each with a size bound -----------------------------------------------------


def open_regular(path: Path, what: str) -> BinaryIO:
    """path opened for reading if it is a regular file (files.open_regular); what: the hint of each message."""
    try:
        return files.open_regular(path)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {what}") from None
    except files.NotRegularFile as e:
        raise DataError(f"{path} is not a regular file ({e.kind}); {what}") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({first_line(e)}); {what}") from None


def read_capped(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most limit bytes."""
    with open_regular(path, what) as f:
        payload = f.read(limit + 1)
    if len(payload) > limit:
        raise DataError(f"{path} is larger than {limit:,} bytes; {what}")
    return payload


# --- batch files: safe unpickling, every field checked ---------------------------------------------------


class SafeUnpickler(pickle.Unpickler):
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


UNPICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError, AttributeError,
    MemoryError, OverflowError, RecursionError, UnicodeError,
)  # fmt: skip


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file -> (images NHWC uint8, labels int64), without trusting the pickle."""
    return parse_batch(
        read_capped(path, MAX_BATCH_FILE, "the CIFAR-10 batches folder is incomplete"), str(path)
    )


def parse_batch(payload: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of one batch file -> (images NHWC uint8, labels int64); where names it in errors."""
    try:
        batch = SafeUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except UNPICKLE_ERRORS as e:
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


def join_batches(batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        "train_images": np.concatenate([batches[name][0] for name in TRAIN_BATCHES]),
        "train_labels": np.concatenate([batches[name][1] for name in TRAIN_BATCHES]),
        "test_images": batches[TEST_BATCH][0],
        "test_labels": batches[TEST_BATCH][1],
    }


# --- .npz and .npy: the header is checked (shape, dtype, bound) before any data is read ------------------


_NPZ_ERRORS = (
    zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, ValueError, OSError, NotImplementedError,
    RuntimeError,  # an encrypted member
)  # fmt: skip


def read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels int64) from an .npz holding 'images' (N,32,32,3) uint8 and integer 'labels' (N,)."""
    what = f"it should hold the CIFAR-10 {split} set as numpy.savez writes it (arrays 'images' and 'labels')"
    with open_regular(path, what) as f:
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


def check_arrays(arrays: dict[str, np.ndarray], where: str, n_classes: int = len(CLASSES)) -> None:
    """Shapes, dtypes, sizes (1 to the CIFAR-10 count) and label range (0..n_classes-1) of the four arrays."""
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
        if labels.min() < 0 or labels.max() >= n_classes:
            raise DataError(f"{where}: {split} labels outside 0..{n_classes - 1}")


def content_sha256(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of each array's bytes in C order (equal to hashing arr.tobytes(), without the copy)."""
    return {
        name: hashlib.sha256(memoryview(np.ascontiguousarray(arrays[name])).cast("B")).hexdigest()
        for name in ARRAY_NAMES
    }
