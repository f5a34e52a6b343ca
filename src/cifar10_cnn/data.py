"""What training reads: a dataset's arrays as seeded, stratified splits, and those splits as device tensors.

Where the arrays come from (download, archive, batches, npz, the verified cache) is `sources`; the names
below that come from there are re-exported, so `from cifar10_cnn.data import load_cifar10` keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .archive import extract_archive
from .constants import CLASSES, MEAN, STD
from .download import ARCHIVE, ARCHIVE_SIZE, DATA_ENV, MD5, URL, fetch_archive
from .errors import DataError
from .readers import (
    ARRAY_NAMES,
    BATCHES_DIR,
    MAX_BATCH_FILE,
    SHA256,
    TEST_BATCH,
    TRAIN_BATCHES,
    check_arrays,
    content_sha256,
    read_batch,
    read_npz,
)
from .sources import (
    CACHE_ENV,
    CIFAR10,
    MAX_META_JSON,
    SOURCES,
    Dataset,
    Source,
    find_source,
    load_cifar10,
    load_dataset,
    register_source,
    resolve_data_dir,
)

__all__ = [
    "ARCHIVE", "ARCHIVE_SIZE", "ARRAY_NAMES", "BATCHES_DIR", "CACHE_ENV", "CIFAR10", "CLASSES", "DATA_ENV", "MAX_BATCH_FILE",
    "MAX_META_JSON", "MD5", "MEAN", "SHA256", "SOURCES", "STD", "TEST_BATCH", "TRAIN_BATCHES", "URL",
    "Dataset", "Source", "Split", "Splits", "batch_indices", "check_arrays", "content_sha256",
    "extract_archive", "fetch_archive", "find_source", "load_cifar10", "load_dataset", "make_splits",
    "read_batch", "read_npz", "register_source", "resolve_data_dir", "stratified_fold", "stratified_split",
    "to_split",
]  # fmt: skip


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
    data: Dataset,
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
