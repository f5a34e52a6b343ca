"""Training and inference throughput of every registered model on this machine, and the seed recipe's epoch.

    python benchmarks/throughput.py                      # all models, ~6 minutes on 2 CPU cores
    python benchmarks/throughput.py --models seed_cnn --seconds 5
    python benchmarks/throughput.py --models airbench airbench_small --sizes 32 24 16   # --train-sizes

Each model is measured in fp32 and, where training uses it (`--amp auto`: CUDA, or a CPU with native bf16),
in bf16 autocast; "% peak" compares with the matrix-multiply rate of the same precision, measured here.

Figures are images/s measured in this run. The machine is shared and noisy, so the seed recipe is also
compared, as a ratio, against a naive baseline measured in the same run: a plain PyTorch loop with a
DataLoader and per-image augmentation (the classic tutorial loop).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from flops import forward_flops
from machine import describe

from cifar10_cnn import augment
from cifar10_cnn import data as D
from cifar10_cnn.config import recipe_config
from cifar10_cnn.data import Split
from cifar10_cnn.device import autocast_dtype
from cifar10_cnn.models import count_params, create_model, list_models
from cifar10_cnn.train import fit, setup, train_step


def timed(step, seconds: float, images_per_step: int, warmup: int = 3) -> float:
    """images/s of step(), run for about `seconds` after a warm-up."""
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * images_per_step / (time.perf_counter() - t0)


def matmul_gflops(dtype: torch.dtype = torch.float32, seconds: float = 3.0, n: int = 2048) -> float:
    """The machine's matrix-multiply rate in this dtype, the practical peak for convolutions."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    rate = timed(lambda: a @ b, seconds, 1)
    return rate * 2 * n**3 / 1e9


def model_rates(
    name: str,
    images: torch.Tensor,
    batch_size: int,
    seconds: float,
    dtype: torch.dtype | None = None,
    size: int = 32,
) -> dict[str, float]:
    # Each net with the optimizer its recipe uses (Muon for the airbench nets), through the library's own step.
    recipe = "fast" if name.startswith("airbench") else "seed"
    amp = "bf16" if dtype == torch.bfloat16 else "off"
    cfg = recipe_config(recipe, model=name, batch_size=batch_size, micro_batch=None, amp=amp, device="cpu")
    labels = torch.randint(0, 10, (len(images),))
    trainer = setup(cfg, Split(images, labels), torch.device("cpu"))
    model = trainer.model
    gen = torch.Generator().manual_seed(0)

    def one_step():
        model.train()
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        train_step(trainer, augment.augment_batch(images[idx], gen), labels[idx], size)

    eval_x = augment.downscale(augment.normalize(images[:500]), size).contiguous(
        memory_format=torch.channels_last
    )

    def infer_step():
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
            model(eval_x)

    flops = forward_flops(create_model(name), size)
    train = timed(one_step, seconds, batch_size)
    infer = timed(infer_step, seconds, len(eval_x))
    return {
        "params": count_params(model),
        "flops": flops,
        "train": train,
        "infer": infer,
        "train_gflops": 3 * flops * train / 1e9,
        "infer_gflops": flops * infer / 1e9,
    }


class NaiveDataset(torch.utils.data.Dataset):
    """The tutorial way: one image at a time, random crop and flip in numpy, normalise per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.mean = np.array(D.MEAN, np.float32) * 255
        self.std = np.array(D.STD, np.float32) * 255

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = np.pad(self.images[i], ((4, 4), (4, 4), (0, 0)))
        y, x = np.random.randint(0, 9, 2)
        img = img[y : y + 32, x : x + 32]
        if np.random.rand() < 0.5:
            img = img[:, ::-1]
        img = (img.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(img.transpose(2, 0, 1).copy()), int(self.labels[i])


def naive_epoch_seconds(images: np.ndarray, labels: np.ndarray) -> float:
    """One epoch of the seed recipe as a plain PyTorch tutorial loop (DataLoader, per-image transforms)."""
    torch.manual_seed(0)
    model = create_model("seed_cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(NaiveDataset(images, labels), batch_size=64, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    model.train()
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t0


def ours_epoch_seconds(data: D.CIFAR10, n: int, tmp: str) -> float:
    """One epoch of the seed recipe through the library's fit() (training only, no validation set)."""
    cfg = recipe_config("seed", epochs=1, subset=n, val_size=0)
    splits = D.make_splits(data, val_size=0, split_seed=0, subset=n)
    return fit(
        cfg, splits, __import__("pathlib").Path(tmp), progress=False, echo=lambda *_: None
    ).train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list_models())
    parser.add_argument("--seconds", type=float, default=8.0, help="time per measurement")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch (default: 64, and 500 for the airbench nets)",
    )
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=[32], help="input sides to measure (--train-sizes' cost)"
    )
    parser.add_argument("--epoch-images", type=int, default=10_000, help="images in the timed seed epochs")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import tempfile

    data = D.load_cifar10(args.data_dir, progress=False)
    images = torch.from_numpy(data.train_images[:5000]).permute(0, 3, 1, 2)
    print(describe())
    precisions: dict[str, torch.dtype | None] = {"fp32": None}
    if autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16:
        precisions["bf16"] = torch.bfloat16
    peaks = {p: matmul_gflops(d or torch.float32) for p, d in precisions.items()}
    print("matmul peak: " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()) + "\n")
    print(
        f"{'model':<14} {'prec':>4} {'params':>10} {'MFLOP/img':>10} {'train img/s':>12} {'train GFLOP/s':>14} "
        f"{'% peak':>7} {'infer img/s':>12} {'infer GFLOP/s':>14}"
    )
    for name, size in itertools.product(args.models, args.sizes):
        batch = args.batch_size or (500 if name.startswith("airbench") else 64)
        label = name if args.sizes == [32] else f"{name}@{size}"
        for prec, dtype in precisions.items():
            r = model_rates(name, images, batch, args.seconds, dtype, size)
            print(
                f"{label:<14} {prec:>4} {r['params']:>10,} {r['flops'] / 1e6:>10.1f} {r['train']:>12.0f} "
                f"{r['train_gflops']:>14.1f} {r['train_gflops'] / peaks[prec]:>7.0%} {r['infer']:>12.0f} "
                f"{r['infer_gflops']:>14.1f}"
            )

    n = args.epoch_images
    with tempfile.TemporaryDirectory() as tmp:
        ours = ours_epoch_seconds(data, n, tmp)
    naive = naive_epoch_seconds(data.train_images[:n], data.train_labels[:n])
    scale = 45_000 / n
    precision = "bf16 autocast" if "bf16" in precisions else "fp32"
    print(
        f"\nseed recipe, one epoch of {n} images (batch 64, crop+flip; fit() in {precision}, naive loop in fp32):"
    )
    print(
        f"  naive tutorial loop : {naive:6.1f} s  ({n / naive:.0f} img/s; 45,000 images ~ {naive * scale:.0f} s)"
    )
    print(
        f"  cifar10-cnn fit()   : {ours:6.1f} s  ({n / ours:.0f} img/s; 45,000 images ~ {ours * scale:.0f} s)"
    )
    print(f"  speed-up            : {naive / ours:.2f}x")


if __name__ == "__main__":
    main()
