"""Does training from a folder of PNG files lose anything? The same recipe on the real CIFAR-10 written as a
folder (train/ and test/ of class subfolders) and on the npz files, over several seeds, in one invocation.

    python benchmarks/folder_accuracy.py --recipe quick --seeds 2        # about 15 minutes on 2 CPU cores
    python benchmarks/folder_accuracy.py --recipe sprint --seeds 1 --images 5000   # a smoke test

Each run is `cifar10 train --recipe R --seed S` as a user runs it, in its own process, with --data-dir the
folder or the npz files; test accuracy is read from its results.json. The folder holds the same pixels (PNG is
lossless) but in another file order, so its validation split and batch order differ: the figures agree only
within seed noise, which the printed interval of the difference of means shows (Welch, 95%). The temporary
folder, caches and runs are removed at the end (only what this script wrote).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from folder_load import write_folder
from machine import describe

from cifar10_cnn.sources import load_cifar10, resolve_data_dir


def train(args: argparse.Namespace, data_dir: Path, seed: int, out: Path, env: dict) -> float:
    cmd = [sys.executable, "-m", "cifar10_cnn", "train", "--recipe", args.recipe, "--seed", str(seed),
           "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]  # fmt: skip
    if data_dir.name == "npz":  # a subset this script wrote: not the published files
        cmd += ["--allow-unverified"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["test_accuracy"]


def interval(a: list[float], b: list[float]) -> str:
    """The difference of means a - b with a Welch 95% interval (normal approximation; n < 2: no interval)."""
    diff = np.mean(a) - np.mean(b)
    if min(len(a), len(b)) < 2:
        return f"{diff:+.2%} (one seed each: no interval)"
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
    return f"{diff:+.2%}, 95% interval {diff - 1.96 * se:+.2%} to {diff + 1.96 * se:+.2%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="quick")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--images", type=int, default=50_000, help="training images written (50000: all)")
    p.add_argument("--data-dir", help="where CIFAR-10 is (default $CIFAR10_DATA, else ./data)")
    args = p.parse_args()
    data = load_cifar10(args.data_dir, download=False, progress=False, cache_dir="off")
    work = Path(tempfile.mkdtemp(prefix="folder-accuracy-"))
    env = {**os.environ, "CIFAR10_CACHE": str(work / "cache")}
    try:
        t0 = time.perf_counter()
        write_folder(
            work / "folder" / "train", data.train_images[: args.images], data.train_labels[: args.images]
        )
        write_folder(work / "folder" / "test", data.test_images, data.test_labels)
        sources = {"folder": work / "folder", "npz": resolve_data_dir(args.data_dir)}  # the verified files
        if args.images < 50_000:
            sources["npz"] = work / "npz"
            sources["npz"].mkdir()
            n = args.images
            np.savez(sources["npz"] / "train.npz", images=data.train_images[:n], labels=data.train_labels[:n])
            np.savez(sources["npz"] / "test.npz", images=data.test_images, labels=data.test_labels)
        print(
            f"{describe()}\nwrote {args.images:,} + 10,000 PNGs in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        acc: dict[str, list[float]] = {"folder": [], "npz": []}
        for seed in range(args.seeds):
            for source in acc:
                acc[source].append(train(args, sources[source], seed, work / f"run-{source}-{seed}", env))
                print(f"  {args.recipe} seed {seed} from {source}: {acc[source][-1]:.2%}", flush=True)
        for source, values in acc.items():
            print(f"{source:>6}: mean {np.mean(values):.2%} over {len(values)} seed(s): "
                  + ", ".join(f"{v:.2%}" for v in values))  # fmt: skip
        print(f"folder - npz: {interval(acc['folder'], acc['npz'])}")
    finally:
        shutil.rmtree(work)  # our own mkdtemp folder


if __name__ == "__main__":
    main()
