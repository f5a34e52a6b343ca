"""Decoding a scan's files with the bounded reader and decoder of predict and serve (images.py), in worker
processes when there are many; files that are not readable images are counted, never fatal.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import images as I
from .errors import DataError
from .folder_scan import Scan, shown

DECODE_WORKERS: int | None = None  # processes that read and decode files (None: the CPUs, at most 8)
PROCESS_MIN = 2000  # fewer files are decoded in this process (starting workers costs about a second)
CHUNK = 1000  # files per task of a worker


@dataclass
class Decoded:
    """The readable files of a scan: their names, labels, splits, pixels; the failures; the bytes' sha256."""

    rels: list[str]
    labels: np.ndarray
    splits: list[str]
    images: np.ndarray
    skipped: list[tuple[str, str]]
    files_sha256: str
    sha256: dict[str, str] = field(default_factory=dict)  # of the images and labels arrays


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


def decode_scan(s: Scan, size: int) -> Decoded:
    """The readable files of a scan, decoded (without the arrays' sha256: `hashed` adds them)."""
    rels = [f[0] for f in s.files]
    pixels, ok, errors, files_sha = decode_files(s.root, rels, size)
    failed = [(rel, err) for rel, err in zip(rels, errors, strict=True) if err is not None]
    keep = np.flatnonzero(ok)
    return Decoded(
        rels=[rels[i] for i in keep],
        labels=np.array([s.files[i][1] for i in keep], np.int64),
        splits=[s.files[i][2] for i in keep],
        images=pixels[keep] if len(keep) < len(rels) else pixels,
        skipped=sorted(s.skipped + failed),
        files_sha256=files_sha,
    )


def hashed(d: Decoded) -> Decoded:
    """d with the sha256 of its images and labels arrays (what the cache records and checks)."""
    d.sha256 = {"images": sha256_of(d.images), "labels": sha256_of(d.labels)}
    return d


def sha256_of(a: np.ndarray) -> str:
    """The sha256 of an array's bytes (C order)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()
