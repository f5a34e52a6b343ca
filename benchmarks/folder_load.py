"""Seconds and images per second to load a folder of class subfolders: the first load and the cached one.

    python benchmarks/folder_load.py                      # the 50,000 real training images as PNG files
    python benchmarks/folder_load.py --images 5000 --workers 1 2 4

The images are the real CIFAR-10 training set, written once as 32x32 PNG files into a temporary folder
(PATH/<class>/NNNNN.png; not timed). Each "first" load starts with an empty cache: the scan, reading and
decoding every file with images.py (the decoder predict and serve use) in threads, the split and the cache
write. "cached" is the next load of the same folder: the scan, a stat of every file for the cache key, and
the cached arrays read and re-hashed. The check that the pixels came through unchanged is part of the run.
The temporary folder and caches are removed at the end (only what this script wrote).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from cifar10_cnn import folder_decode, folders
from cifar10_cnn.constants import CLASSES
from cifar10_cnn.sources import load_cifar10


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(root / CLASSES[y] / f"{i:05d}.png", compress_level=6)


def check_pixels(data: folders.FolderData, images: np.ndarray) -> None:
    """Every test image equals the original it was written from (PNG is lossless; 32x32 passes unchanged)."""
    idx = [int(Path(f).stem) for f in data.test_files]
    assert np.array_equal(data.test_images, images[idx]), "decoded pixels differ from the originals"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=50_000, help="how many training images (50000)")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0],
        help="decoding threads (0: the default, one per CPU up to 8)",
    )
    p.add_argument("--data-dir", help="where CIFAR-10 is (default $CIFAR10_DATA, else ./data)")
    args = p.parse_args()
    data = load_cifar10(args.data_dir, download=False, progress=False, cache_dir="off")
    images, labels = data.train_images[: args.images], data.train_labels[: args.images]
    work = Path(tempfile.mkdtemp(prefix="folder-load-"))
    try:
        t0 = time.perf_counter()
        write_folder(work / "images", images, labels)
        size = sum(f.stat().st_size for f in (work / "images").rglob("*.png"))
        print(f"wrote {len(images):,} PNGs ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s; "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        print(f"{'workers':>7} | {'first load':>22} | {'cached load':>22}")
        for workers in args.workers:
            cache = work / f"cache-{workers}"
            times = []
            for _ in range(2):
                folder_decode.DECODE_WORKERS = workers or None
                t = time.perf_counter()
                loaded = folders.load_folder(work / "images", cache_dir=cache, progress=False)
                times.append(time.perf_counter() - t)
            check_pixels(loaded, images)
            assert loaded.cached and not loaded.skipped
            cells = [f"{s:6.2f} s {len(images) / s:9,.0f} img/s" for s in times]
            print(f"{workers or 'default':>7} | {cells[0]:>22} | {cells[1]:>22}")
    finally:
        shutil.rmtree(work)  # our own mkdtemp folder


if __name__ == "__main__":
    main()
