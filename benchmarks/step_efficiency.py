"""What a training step and an evaluation pass cost on this CPU, and what each setting around them buys.

    python benchmarks/step_efficiency.py                          # the three recipes' nets, ~10 min on 2 cores
    python benchmarks/step_efficiency.py --recipes sprint --variants default compiled

For each recipe's net (its batch, micro-batches and optimizer, in the precision training uses here: bf16 autocast
on a CPU with native bf16, else fp32), the library's own training step (train.train_step) is timed under:

    default      what `cifar10 train` does: channels_last memory, all of torch's threads, oneDNN convolutions
    contiguous   the default NCHW memory format instead of channels_last (--no-channels-last)
    1-thread     one intra-op thread (x threads: how well the step scales over the cores)
    no-onednn    torch.backends.mkldnn off: PyTorch's own convolution kernels
    compiled     torch.compile (inductor) on the net; its compile time is printed apart from the step time

then the evaluation's forward pass (inference_mode) as the product runs it (fp32, batches of 250 on a CPU), in
batches of 1,000 (the earlier default), in bf16 autocast, and compiled, and what the test set costs with the
recipe's test-time augmentation. Every figure is a ratio against `default` measured in the same run: the
machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from machine import describe

from cifar10_cnn import augment
from cifar10_cnn import data as D
from cifar10_cnn.config import recipe_config
from cifar10_cnn.data import Split
from cifar10_cnn.device import autocast, autocast_dtype
from cifar10_cnn.inference import eval_batch_size
from cifar10_cnn.train import setup, train_step

VARIANTS = ("default", "contiguous", "1-thread", "no-onednn", "compiled")
TTA_VIEWS = {0: 1, 1: 2, 2: 6}  # forward passes per test image at each --tta level


def rate(fn, images_per_call: int, seconds: float, warmup: int = 1) -> float:
    """images/s of fn(), run for at least `seconds` (and twice) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * images_per_call / (time.perf_counter() - t0)


@contextlib.contextmanager
def conditions(variant: str):
    """The process-wide settings of a variant, restored afterwards."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    if variant == "1-thread":
        torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = variant != "no-onednn"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


def trainer_for(recipe: str, images: torch.Tensor, labels: torch.Tensor, variant: str):
    cfg = recipe_config(recipe, device="cpu", channels_last=variant != "contiguous")
    t = setup(cfg, Split(images, labels), torch.device("cpu"))
    if variant == "compiled":
        t = dataclasses.replace(t, net=torch.compile(t.model))
    return t


def train_rate(recipe: str, images, labels, variant: str, seconds: float) -> tuple[float, float]:
    """(images/s of the recipe's step, seconds spent on the first step: compilation for `compiled`)."""
    with conditions(variant):
        t = trainer_for(recipe, images, labels, variant)
        gen = torch.Generator().manual_seed(0)
        batch = t.cfg.batch_size

        def step() -> None:
            idx = torch.randint(0, len(images), (batch,), generator=gen)
            x = augment.augment_batch(
                images[idx], gen, crop_padding=t.cfg.crop_padding, crop_mode=t.cfg.crop_mode
            )
            train_step(t, x, labels[idx])

        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        return rate(step, batch, seconds, warmup=1 if variant == "compiled" else 0), first


def eval_rate(
    recipe: str, images, labels, seconds: float, *, batch: int, bf16: bool = False, compiled: bool = False
) -> tuple[float, float]:
    """(images/s of one forward pass in eval mode over batches of `batch`, the first call's seconds); fp32 as
    inference.predict_logits runs it, or bf16 autocast."""
    t = trainer_for(recipe, images, labels, "default")
    model = t.model.eval()
    net = torch.compile(model) if compiled else model
    x = augment.normalize(images[:batch]).contiguous(memory_format=t.memory_format)

    def forward() -> None:
        with torch.inference_mode(), autocast(t.device, torch.bfloat16 if bf16 else None):
            net(x)

    t0 = time.perf_counter()
    forward()
    first = time.perf_counter() - t0
    return rate(forward, len(x), seconds), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["sprint", "seed", "fast"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    data = D.load_cifar10(args.data_dir, progress=False)
    images = torch.from_numpy(data.train_images[:5000]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(data.train_labels[:5000])
    dtype = autocast_dtype("auto", torch.device("cpu"))
    precision = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
    print(describe())
    print(f"precision: {precision} (what --amp auto trains in here)\n")
    print(
        f"{'recipe':<8} {'net':<15} {'variant':<11} {'train img/s':>11} {'x default':>9} {'first step':>10}"
    )
    eval_batch = eval_batch_size(torch.device("cpu"))
    for recipe in args.recipes:
        net = recipe_config(recipe).model
        base = None
        for variant in args.variants:
            r, first = train_rate(recipe, images, labels, variant, args.seconds)
            base = base or r
            print(f"{recipe:<8} {net:<15} {variant:<11} {r:>11.0f} {r / base:>8.2f}x {first:>9.1f}s")
        eager, _ = eval_rate(recipe, images, labels, args.seconds, batch=eval_batch)
        line = f"{recipe:<8} {net:<15} {'eval fp32':<11} {eager:>11.0f} img/s in batches of {eval_batch}"
        thousand, _ = eval_rate(recipe, images, labels, args.seconds, batch=1000)
        line += f"; of 1000: {thousand / eager:.2f}x"
        if dtype == torch.bfloat16:
            bf16, _ = eval_rate(recipe, images, labels, args.seconds, batch=eval_batch, bf16=True)
            line += f"; bf16 autocast: {bf16 / eager:.2f}x"
        if "compiled" in args.variants:
            comp, first = eval_rate(recipe, images, labels, args.seconds, batch=eval_batch, compiled=True)
            line += f"; compiled {comp / eager:.2f}x (first call {first:.1f}s)"
        print(line)
        cfg = recipe_config(recipe)
        views = TTA_VIEWS[cfg.tta]
        extra = f" (selective: the extra views only where the margin is under {cfg.tta_margin})"
        print(
            f"{'':<8} 10,000 test images: {10_000 / eager:.0f} s for one view, {10_000 * views / eager:.0f} s for the "
            f"{views} views of --tta {cfg.tta}" + (extra if cfg.tta and cfg.tta_margin < 1 else "")
        )
        print()


if __name__ == "__main__":
    main()
