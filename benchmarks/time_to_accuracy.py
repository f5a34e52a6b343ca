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
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ablation import parse_variant
from flops import epoch_flops
from machine import describe

from cifar10_cnn import data as D
from cifar10_cnn.config import recipe_config
from cifar10_cnn.inference import selective_tta_logits
from cifar10_cnn.metrics import summarize
from cifar10_cnn.train import fit

THRESHOLDS = (0.90, 0.93, 0.94)


def one_run(recipe: str, seed: int, data: D.CIFAR10, overrides: dict, eval_last: int | None = None) -> dict:
    name, _, variant = recipe.partition("+")
    cfg = recipe_config(name, seed=seed, **{**overrides, **parse_variant(variant or "base")[0]})
    first_eval = 1 if eval_last is None else max(1, cfg.epochs - eval_last + 1)
    t0 = time.perf_counter()
    splits = D.make_splits(data, **cfg.split_args())
    setup = time.perf_counter() - t0
    flops = list(itertools.accumulate(epoch_flops(cfg, len(splits.train))))
    curve: list[tuple[float, float, float, float]] = []  # (training s so far, eval s, test accuracy, FLOPs)

    def follow(epoch: int, model: torch.nn.Module, _row: dict) -> None:
        if epoch < first_eval:
            return
        start = time.perf_counter()
        trained = start - t0 - sum(c[1] for c in curve)  # earlier evaluations are off the clock
        logits = selective_tta_logits(model, splits.test.images, tta=cfg.tta, tta_margin=cfg.tta_margin)[0]
        acc = (logits.argmax(1) == splits.test.labels).float().mean().item()
        curve.append((trained, time.perf_counter() - start, acc, flops[epoch - 1]))
        print(
            f"  {recipe} seed {seed} epoch {epoch}: test {acc:.2%} after {trained:.0f} s of training",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        fit(cfg, splits, Path(tmp), progress=False, echo=lambda *_: None, on_epoch_end=follow)
    final_train, final_eval, final_acc, final_flops = curve[-1]
    reach, reach_flops = {}, {}
    for threshold in THRESHOLDS:
        hit = next((c for c in curve if c[2] >= threshold), None)
        reach[threshold] = None if hit is None else hit[0] + hit[1]
        reach_flops[threshold] = None if hit is None else hit[3]
    return {
        "acc": final_acc,
        "flops": final_flops,
        "reach_flops": reach_flops,
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
    parser.add_argument("--seeds", type=int, default=3, help="seeds per recipe (recipe:N gives one its own)")
    parser.add_argument("--baseline", help="a --recipes entry to give every other one's time as a ratio of")
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
    if args.baseline and args.baseline not in [parse_recipe(r, 0)[0] for r in args.recipes]:
        parser.error(f"--baseline {args.baseline!r} is not one of --recipes")
    overrides = {k: v for k, v in (("subset", args.subset), ("epochs", args.epochs)) if v is not None}

    t = time.perf_counter()
    data = D.load_cifar10(args.data_dir, progress=False)
    load = time.perf_counter() - t
    print(f"{describe()}\ndata loaded in {load:.1f} s ({data.source}, verified={data.verified})", flush=True)
    plan = [parse_recipe(r, args.seeds) for r in args.recipes]
    results: dict[str, list[dict]] = {label: [] for label, _ in plan}
    for seed in range(
        max(n for _, n in plan)
    ):  # seed by seed: a slower patch of the machine hits every recipe
        for label, n in plan:
            if seed < n:
                run = one_run(label, seed, data, overrides, args.eval_last)
                run["seconds"] += load + run["setup"]
                results[label].append(run)
    print_table(results, load)
    if "seed" in results and len(results) > 1:
        print_seed_ratio(results, load)
    if args.baseline:
        print_baseline_ratio(results, args.baseline)


def parse_recipe(text: str, seeds: int) -> tuple[str, int]:
    """`fast`, `fast:5` (5 seeds) or `fast+epochs=8+train_sizes=:1` (a recipe with overrides) -> (label, seeds)."""
    label, colon, n = text.rpartition(":")
    if colon and n.isdigit():
        return label, int(n)
    return text, seeds


def print_table(results: dict[str, list[dict]], load: float) -> None:
    w = max(8, *map(len, results))
    print(
        f"\n{'recipe':<{w}} {'seed':>4} {'final acc':>9} {'total':>8} "
        + " ".join(f"{f'to {t:.0%}':>8}" for t in THRESHOLDS)
        + f" {'TFLOP':>7} {'TFLOP to 94%':>12}"
    )
    for recipe, runs in results.items():
        for seed, run in enumerate(runs):
            offset = load + run["setup"]
            reach = [None if run["reach"][t] is None else run["reach"][t] + offset for t in THRESHOLDS]
            to_94 = run["reach_flops"][0.94]
            print(
                f"{recipe:<{w}} {seed:>4} {run['acc']:>9.2%} {fmt(run['seconds']):>8} "
                + " ".join(f"{fmt(r):>8}" for r in reach)
                + f" {run['flops'] / 1e12:>7.1f} {'—' if to_94 is None else f'{to_94 / 1e12:.1f}':>12}"
            )
        acc = summarize([r["acc"] for r in runs])
        secs = summarize([r["seconds"] for r in runs])
        print(
            f"{recipe:<{w}} mean {acc['mean']:.2%} ± {acc['std']:.2%} (min {acc['min']:.2%}, max {acc['max']:.2%}), "
            f"{secs['mean']:.0f} ± {secs['std']:.0f} s per run"
        )


def print_seed_ratio(results: dict[str, list[dict]], load: float) -> None:
    seed_acc = summarize([r["acc"] for r in results["seed"]])["mean"]
    seed_time = summarize([r["seconds"] for r in results["seed"]])["mean"]
    print(f"\nseed recipe: {seed_acc:.2%} in {seed_time:.0f} s. Time for the others to reach {seed_acc:.2%}:")
    for recipe, runs in results.items():
        if recipe != "seed":
            reach = time_to(runs, seed_acc)
            reach = None if reach is None else reach + load
            ratio = "never" if reach is None else f"{reach / seed_time:.3f} of the seed recipe's time"
            print(f"  {recipe:<8} {fmt(reach)}  ({ratio})")


def print_baseline_ratio(results: dict[str, list[dict]], baseline: str) -> None:
    base = summarize([r["seconds"] for r in results[baseline]])["mean"]
    print(f"\nwhole wall-clock against {baseline} ({base:.0f} s per run):")
    for recipe, runs in results.items():
        if recipe != baseline:
            mean = summarize([r["seconds"] for r in runs])["mean"]
            print(f"  {recipe}: {mean:.0f} s, {mean / base:.3f} of the baseline's time")


if __name__ == "__main__":
    main()
