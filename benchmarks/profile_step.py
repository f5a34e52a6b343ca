"""Where a training step of a net spends its time on this CPU, and what precision and batch layout cost.

    python benchmarks/profile_step.py                      # the fast net, fast recipe, ~2 minutes
    python benchmarks/profile_step.py --model airbench_small --batch 1000 --micro 500

Prints (1) the CPU's capability as PyTorch sees it, (2) step throughput for whole batches vs micro-batches,
fp32 vs bf16 autocast, all measured in this one run (ratios are what to compare: the machine is shared),
and (3) the top operators of one fp32 step from torch.profiler.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cifar10_cnn import augment
from cifar10_cnn.config import recipe_config
from cifar10_cnn.data import Split
from cifar10_cnn.train import setup, train_step


def make_step(model_name: str, batch: int, micro: int, dtype: torch.dtype | None):
    """The library's own training step (train.train_step) of the fast recipe on random images."""
    amp = "bf16" if dtype == torch.bfloat16 else "off"
    cfg = recipe_config("fast", model=model_name, batch_size=batch, micro_batch=micro, amp=amp, device="cpu")
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,))
    trainer = setup(cfg, Split(images, labels), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        x = augment.augment_batch(images, gen, crop_padding=2, crop_mode="reflect")
        train_step(trainer, x, labels)

    return step


def rate(step, batch: int, repeats: int) -> float:
    step()  # warm-up (allocations, oneDNN primitive caches)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="airbench")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--micro", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"bf16 kernels (oneDNN): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, threads {torch.get_num_threads()}"
    )
    variants = [
        (f"fp32, whole batch of {args.batch}", args.batch, None),
        (f"fp32, micro-batches of {args.micro}", args.micro, None),
        (f"bf16 autocast, micro-batches of {args.micro}", args.micro, torch.bfloat16),
    ]
    base = None
    for name, micro, dtype in variants:
        r = rate(make_step(args.model, args.batch, micro, dtype), args.batch, args.repeats)
        base = base or r
        print(f"  {name:<40} {r:7.0f} img/s  ({r / base:.2f}x)")

    step = make_step(args.model, args.batch, args.micro, None)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\none fp32 step of {args.batch} images, top operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
