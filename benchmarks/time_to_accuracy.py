"""Time to 90%, 93% and 94% test accuracy, and the final accuracy, of recipes over several seeds.

    python benchmarks/time_to_accuracy.py --recipes fast seed quick --seeds 3     # hours on 2 CPU cores
    python benchmarks/time_to_accuracy.py --recipes quick seed --seeds 3          # the short-budget ratio
    python benchmarks/time_to_accuracy.py --recipes fast --seeds 1 --subset 5000 --epochs 1   # a smoke test

Each run is timed from its start (data already in memory; loading is timed once and added) through
training. After every epoch the test accuracy is measured with the recipe's own (selective) test-time
augmentation, outside the training clock: "time to X%" is the training time through the first epoch that
reaches X% plus one such evaluation. The test set never feeds back into training. The seed recipe's figures in the
same invocation give the ratio the short-budget recipes are judged by.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from cifar10_cnn import data as D
from cifar10_cnn.config import recipe_config
from cifar10_cnn.inference import selective_tta_logits
from cifar10_cnn.metrics import summarize
from cifar10_cnn.train import fit

THRESHOLDS = (0.90, 0.93, 0.94)


def one_run(recipe: str, seed: int, data: D.CIFAR10, overrides: dict, eval_last: int | None = None) -> dict:
    cfg = recipe_config(recipe, seed=seed, **overrides)
    first_eval = 1 if eval_last is None else max(1, cfg.epochs - eval_last + 1)
    t0 = time.perf_counter()
    splits = D.make_splits(data, **cfg.split_args())
    setup = time.perf_counter() - t0
    curve: list[tuple[float, float, float]] = []  # (training seconds so far, eval seconds, test accuracy)

    def follow(epoch: int, model: torch.nn.Module, _row: dict) -> None:
        if epoch < first_eval:
            return
        start = time.perf_counter()
        trained = start - t0 - sum(c[1] for c in curve)  # earlier evaluations are off the clock
        logits = selective_tta_logits(model, splits.test.images, tta=cfg.tta, tta_margin=cfg.tta_margin)[0]
        acc = (logits.argmax(1) == splits.test.labels).float().mean().item()
        curve.append((trained, time.perf_counter() - start, acc))
        print(
            f"  {recipe} seed {seed} epoch {epoch}: test {acc:.2%} after {trained:.0f} s of training",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        fit(cfg, splits, Path(tmp), progress=False, echo=lambda *_: None, on_epoch_end=follow)
    final_train, final_eval, final_acc = curve[-1]
    reach = {}
    for threshold in THRESHOLDS:
        hit = next((c for c in curve if c[2] >= threshold), None)
        reach[threshold] = None if hit is None else hit[0] + hit[1]
    return {
        "acc": final_acc,
        "seconds": final_train + final_eval,
        "setup": setup,
        "reach": reach,
        "curve": curve,
    }


def time_to(runs: list[dict], accuracy: float) -> float | None:
    """Mean time for the runs to first reach the accuracy (None if any run never does)."""
    times = []
    for run in runs:
        hit = next((c for c in run["curve"] if c[2] >= accuracy), None)
        if hit is None:
            return None
        times.append(hit[0] + hit[1])
    return sum(times) / len(times)


def fmt(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["fast", "seed"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data-dir")
    parser.add_argument(
        "--eval-last",
        type=int,
        help="measure test accuracy only after the last K epochs of each run (saves time; a threshold reached "
        "earlier is then reported late)",
    )
    parser.add_argument("--subset", type=int, help="smoke tests only")
    parser.add_argument("--epochs", type=int, help="smoke tests only")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("subset", args.subset), ("epochs", args.epochs)) if v is not None}

    t = time.perf_counter()
    data = D.load_cifar10(args.data_dir, progress=False)
    load = time.perf_counter() - t
    print(
        f"data loaded in {load:.1f} s ({data.source}, verified={data.verified}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    results: dict[str, list[dict]] = {}
    for recipe in args.recipes:
        results[recipe] = []
        for seed in range(args.seeds):
            run = one_run(recipe, seed, data, overrides, args.eval_last)
            run["seconds"] += load + run["setup"]
            results[recipe].append(run)

    print(
        f"\n{'recipe':<8} {'seed':>4} {'final acc':>9} {'total':>8} "
        + " ".join(f"{f'to {t:.0%}':>8}" for t in THRESHOLDS)
    )
    for recipe, runs in results.items():
        for seed, run in enumerate(runs):
            offset = load + run["setup"]
            reach = [None if run["reach"][t] is None else run["reach"][t] + offset for t in THRESHOLDS]
            print(
                f"{recipe:<8} {seed:>4} {run['acc']:>9.2%} {fmt(run['seconds']):>8} "
                + " ".join(f"{fmt(r):>8}" for r in reach)
            )
        acc = summarize([r["acc"] for r in runs])
        secs = summarize([r["seconds"] for r in runs])
        print(
            f"{recipe:<8} mean {acc['mean']:.2%} ± {acc['std']:.2%} (min {acc['min']:.2%}, max {acc['max']:.2%}), "
            f"{secs['mean']:.0f} ± {secs['std']:.0f} s per run"
        )

    if "seed" in results and len(results) > 1:
        seed_acc = summarize([r["acc"] for r in results["seed"]])["mean"]
        seed_time = summarize([r["seconds"] for r in results["seed"]])["mean"]
        print(
            f"\nseed recipe: {seed_acc:.2%} in {seed_time:.0f} s. Time for the others to reach {seed_acc:.2%}:"
        )
        for recipe, runs in results.items():
            if recipe != "seed":
                reach = time_to(runs, seed_acc)
                reach = None if reach is None else reach + load
                ratio = "never" if reach is None else f"{reach / seed_time:.3f} of the seed recipe's time"
                print(f"  {recipe:<8} {fmt(reach)}  ({ratio})")


if __name__ == "__main__":
    main()
