"""Milliseconds per image of an explanation on this CPU: Grad-CAM and Integrated Gradients, per architecture.

    python benchmarks/explain_cost.py                                  # every architecture, batch 1 and 16
    python benchmarks/explain_cost.py --models airbench seed_cnn --threads 1 --seconds 3

Each figure is the median over calls of `cifar10_cnn.explain.explain` (real CIFAR-10 test images, the
predicted class, eval mode) divided by the batch size, after one warm-up call; calls repeat for about
`--seconds` (at least 3). "forward" is one plain inference-mode forward pass per image, for scale: Grad-CAM
costs about one forward pass with gradients (the predicted class and its gradient come from the same pass);
IG costs IG_STEPS of them. The budget for Grad-CAM of one image is 100 ms, so a page stays responsive.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from cifar10_cnn import data as D
from cifar10_cnn.augment import normalize
from cifar10_cnn.explain import IG_STEPS, explain, gradcam_layer
from cifar10_cnn.models import count_params, create_model, list_models

BUDGET_MS = 100


def median_ms(step, seconds: float) -> float:
    """Median milliseconds of step() over about `seconds` (at least 3 calls), after one warm-up call."""
    step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(arch: str, images, batches: list[int], seconds: float) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(arch).eval()
    x = normalize(torch.from_numpy(images[:1]).permute(0, 3, 1, 2)).contiguous()
    with torch.inference_mode():
        row = {"forward": median_ms(lambda: model(x), seconds)}
    for method in ("gradcam", "ig"):
        for b in batches:
            ms = median_ms(lambda b=b, method=method: explain(model, images[:b], method=method), seconds)
            row[f"{method} b{b}"] = ms / b
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--seconds", type=float, default=2.0, help="time each figure for about this long (2)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--data-dir", help="CIFAR-10 (default $CIFAR10_DATA, else ./data)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = D.load_cifar10(args.data_dir, progress=False).test_images[: max(args.batches)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs | "
        f"ms per image, median | IG: {IG_STEPS} steps | Grad-CAM budget {BUDGET_MS} ms for one image"
    )
    cols = ["forward", *(f"{m} b{b}" for m in ("gradcam", "ig") for b in args.batches)]
    print(f"{'model':<15}{'params':>8}  {'Grad-CAM layer':<15}" + "".join(f"{c:>12}" for c in cols))
    for arch in args.models:
        row = measure(arch, images, args.batches, args.seconds)
        layer = gradcam_layer(create_model(arch))[0]
        params = f"{count_params(create_model(arch)) / 1e6:.1f}M"
        verdict = "ok" if row["gradcam b1"] <= BUDGET_MS else f"over {BUDGET_MS} ms"
        print(
            f"{arch:<15}{params:>8}  {layer:<15}" + "".join(f"{row[c]:>12.1f}" for c in cols) + f"  {verdict}"
        )


if __name__ == "__main__":
    main()
