"""CIFAR-10 data: sources -> verified uint8 arrays (cached) -> splits -> device tensors -> batch augmentation.

Every source (the official download, that archive on disk, its extracted folder, or a train.npz/test.npz
pair) ends up as the same arrays: images (N, 32, 32, 3) uint8 RGB and labels (N,) int64, checked against
the content sha256 of the real CIFAR-10 once and then cached as plain .npy files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

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


@dataclass
class CIFAR10:
    """The verified dataset as numpy arrays, and where it came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    verified: bool
    sha256: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] = CLASSES

    def describe(self) -> dict:
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
    """Load CIFAR-10 from the first source found in data_dir, downloading the archive if there is none."""
    root = resolve_data_dir(data_dir)
    kind, paths = find_source(root)
    if kind is None:
        if not download:
            raise DataError(f"no CIFAR-10 found in {root}; put the data there or allow the download")
        paths = [fetch_archive(root, url=url, md5=md5, progress=progress)]
        kind = "archive"
    cache = _cache_path(kind, paths, cache_dir)
    data = _read_cache(cache) if cache else None
    if data is None:
        arrays = _read_source(kind, paths, root)
        _check_arrays(arrays, f"{kind} {paths[0]}")
        sha = {name: hashlib.sha256(arr.tobytes()).hexdigest() for name, arr in arrays.items()}
        verified = sha == SHA256
        data = CIFAR10(**arrays, source=f"{kind}:{paths[0]}", verified=verified, sha256=sha)
        if cache:
            _write_cache(cache, data)
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


def fetch_archive(root: Path, *, url: str = URL, md5: str = MD5, progress: bool = True) -> Path:
    """Download the archive into root, checking its md5; the file appears only when complete and right."""
    import pooch  # imported here: only the download needs it
    import requests

    root.mkdir(parents=True, exist_ok=True)
    pooch.get_logger().setLevel("WARNING")  # the progress bar says it; errors are ours to word
    try:
        path = pooch.retrieve(url, known_hash=f"md5:{md5}", fname=ARCHIVE, path=root, progressbar=progress)
    except ValueError as e:  # pooch's hash mismatch
        raise DataError(
            f"download of {url} failed its md5 check ({_first_line(e)}); nothing was kept"
        ) from None
    except (requests.RequestException, OSError) as e:
        raise DataError(
            f"cannot download {url} ({_first_line(_root_cause(e))}); check the network, or put the data in {root} "
            f"(or pass --data-dir / set {DATA_ENV})"
        ) from None
    return Path(path)


def extract_archive(archive: Path, target: Path) -> Path:
    """Extract the archive's batches folder into target safely and atomically; return the folder."""
    final = target / BATCHES_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    _check_member(member, tmp)
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(
                f"{archive} is not a readable CIFAR-10 archive ({_first_line(e)}); delete it and retry"
            ) from None
        if not (tmp / BATCHES_DIR).is_dir():
            raise DataError(f"{archive} has no {BATCHES_DIR}/ folder; it is not the CIFAR-10 python archive")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp / BATCHES_DIR, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    # tarfile's "data" filter refuses these too; checking first gives one clear message for all of them.
    target = (dest / member.name).resolve()
    if not target.is_relative_to(dest.resolve()) or member.issym() or member.islnk() or member.isdev():
        raise DataError(
            f"archive member {member.name!r} would be written outside the target folder; refusing it"
        )


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


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file -> (images NHWC uint8, labels int64), without trusting the pickle."""
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; the CIFAR-10 batches folder is incomplete") from None
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path} is not a CIFAR-10 batch file ({_first_line(e)})") from None
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path} holds data of shape {data.shape}, expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _read_source(kind: str, paths: list[Path], root: Path) -> dict[str, np.ndarray]:
    if kind == "archive":
        paths = [extract_archive(paths[0], root)]
        kind = "batches"
    if kind == "batches":
        train = [read_batch(paths[0] / name) for name in TRAIN_BATCHES]
        test_images, test_labels = read_batch(paths[0] / TEST_BATCH)
        return {
            "train_images": np.concatenate([b[0] for b in train]),
            "train_labels": np.concatenate([b[1] for b in train]),
            "test_images": test_images,
            "test_labels": test_labels,
        }
    arrays = {}
    for split, path in zip(("train", "test"), paths, strict=True):
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays[f"{split}_images"] = np.asarray(npz["images"])
                arrays[f"{split}_labels"] = np.asarray(npz["labels"]).astype(np.int64, copy=False)
        except KeyError:
            raise DataError(f"{path} must hold arrays 'images' and 'labels'") from None
        except (OSError, ValueError, zlib.error, EOFError) as e:
            raise DataError(f"{path} is not a readable .npz file ({_first_line(e)})") from None
    return arrays


def _check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise DataError(
                f"{where}: {split} images are {images.dtype} {images.shape}, expected uint8 (N,32,32,3)"
            )
        if labels.shape != (len(images),):
            raise DataError(f"{where}: {len(labels)} {split} labels for {len(images)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise DataError(f"{where}: {split} labels outside 0..{len(CLASSES) - 1}")


# --- cache: verified arrays as .npy, so that the second run starts in about a second ---------------------


def _cache_path(kind: str, paths: list[Path], cache_dir: str | os.PathLike | None) -> Path | None:
    base = cache_dir or os.environ.get(CACHE_ENV)
    if base == "off":
        return None
    base = (
        Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar10-cnn"
    )
    files = sorted(
        p for path in paths for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()
    )
    stamp = [kind] + [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return base / hashlib.sha1("\n".join(stamp).encode()).hexdigest()[:16]


def _read_cache(path: Path) -> CIFAR10 | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {name: np.load(path / f"{name}.npy", allow_pickle=False) for name in ARRAY_NAMES}
        return CIFAR10(**arrays, source=meta["source"], verified=meta["verified"], sha256=meta["sha256"])
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(path: Path, data: CIFAR10) -> None:
    """Best effort: a read-only or full disk only costs the speed-up."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name in ARRAY_NAMES:
            tmp = path / f".{name}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, getattr(data, name))
            os.replace(tmp, path / f"{name}.npy")
        meta = {"source": data.source, "verified": data.verified, "sha256": data.sha256, "time": time.time()}
        (path / ".meta.tmp").write_text(json.dumps(meta))
        os.replace(path / ".meta.tmp", path / "meta.json")  # written last: marks the entry complete
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (a refused connection rather than the retry wrapper around it)."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


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
