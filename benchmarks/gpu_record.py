"""Recipes on a GPU, timed the way the public record (airbench94_muon.py) times itself, to run beside it.

    python benchmarks/gpu_record.py --recipes fast:5 fast+micro_batch=500:5 seed:1 --data-dir DATA
    ../shared/anchors/run-airbench94-muon DATA 5          # the record, on the same GPU, right after
    python benchmarks/gpu_record.py --profile fast --data-dir DATA     # where one epoch's time goes

Per run: test accuracy with the recipe's own (selective) TTA, on all 10,000 test images; "record s": the
whitening, the training epochs (with their validation of the held-out images) and the final TTA evaluation,
each ending in a host synchronisation, as the anchor's timer counts (with --compile, compiling happens in
the first step, so it counts here too, unless the warm-up run did it); "wall s": everything from the data in
host memory on (the copy to the GPU, the model, compilation, checkpoints, evaluation); peak GPU memory
(torch.cuda.max_memory_allocated). Before the timed runs of a recipe, one run of one epoch on the same
shapes warms the CUDA context, cuDNN's autotuner and compilation, as the anchor's warm-up run does; its wall
time is printed and not counted. Recipes take overrides as in ablation.py (`fast+compile=true`), `:N` seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ablation import parse_variant
from flops import training_flops
from machine import describe
from time_to_accuracy import parse_recipe

from cifar10_cnn import data as D
from cifar10_cnn.config import recipe_config
from cifar10_cnn.device import select_device
from cifar10_cnn.inference import selective_tta_logits
from cifar10_cnn.metrics import summarize
from cifar10_cnn.train import fit, setup


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config(spec: str, seed: int, device: torch.device, epochs: int | None = None):
    """The spec's config on the device; epochs cuts it short (a warm-up), its --train-sizes with it."""
    name, _, variant = spec.partition("+")
    cfg = recipe_config(name, seed=seed, device=device.type, **parse_variant(variant or "base")[0])
    if epochs is None:
        return cfg
    sizes = "/".join(cfg.train_sizes.split("/")[:epochs]) if cfg.train_sizes else ""
    return dataclasses.replace(cfg, epochs=epochs, train_sizes=sizes)


def one_run(spec: str, seed: int, data: D.CIFAR10, device: torch.device, epochs: int | None = None) -> dict:
    cfg = config(spec, seed, device, epochs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    splits = D.make_splits(data, **cfg.split_args(), device=device)
    sync(device)
    t1 = time.perf_counter()
    trainer = setup(cfg, splits.train, device, num_classes=len(data.classes))  # model, optimizer, whitening
    sync(device)
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(cfg, splits, Path(tmp), progress=False, echo=lambda *_: None, trainer=trainer)
        sync(device)
        t3 = time.perf_counter()
        logits = selective_tta_logits(
            result.model, splits.test.images, tta=cfg.tta, tta_margin=cfg.tta_margin
        )[0]
        t4 = time.perf_counter()
    acc = (logits.argmax(1) == splits.test.labels.cpu()).float().mean().item()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {
        "acc": acc,
        "record": (t2 - t1) + result.train_seconds + (t4 - t3),
        "wall": t4 - t0,
        "epochs": [round(r["seconds"], 3) for r in result.history],
        "peak_gb": peak / 2**30,
        "tflop": training_flops(cfg, len(splits.train)) / 1e12,
    }


def run_recipes(specs: list[str], seeds: int, data: D.CIFAR10, device: torch.device, warmup: bool) -> None:
    rows: dict[str, list[dict]] = {}
    for spec, n in (parse_recipe(s, seeds) for s in specs):
        if warmup:
            w = one_run(spec, 0, data, device, epochs=1)
            print(f"{spec}: warm-up (1 epoch, not counted) {w['wall']:.1f} s wall", flush=True)
        rows[spec] = []
        for seed in range(n):
            r = one_run(spec, seed, data, device)
            rows[spec].append(r)
            print(
                f"{spec} seed {seed}: test {r['acc']:.2%}, record {r['record']:.2f} s, wall {r['wall']:.2f} s, "
                f"epochs {r['epochs']}, peak {r['peak_gb']:.2f} GiB, {r['tflop']:.1f} TFLOP",
                flush=True,
            )
    print(
        f"\n{'recipe':<28} {'runs':>4} {'test acc (mean ± std)':>22} {'record s':>13} {'wall s':>13} {'peak GiB':>8}"
    )
    for spec, runs in rows.items():
        acc, rec, wall = (summarize([r[k] for r in runs]) for k in ("acc", "record", "wall"))
        print(
            f"{spec:<28} {len(runs):>4} {acc['mean']:>13.2%} ± {acc['std']:.2%} "
            f"{rec['mean']:>7.2f} ± {rec['std']:.2f} {wall['mean']:>7.2f} ± {wall['std']:.2f} "
            f"{max(r['peak_gb'] for r in runs):>8.2f}"
        )


def profile(spec: str, data: D.CIFAR10, device: torch.device, rows: int) -> None:
    """One epoch of spec under torch.profiler (after a warm-up epoch): the top kernels and ops by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    one_run(spec, 0, data, device, epochs=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        r = one_run(spec, 0, data, device, epochs=1)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{spec}, one epoch under the profiler: {r['wall']:.2f} s wall (profiling adds overhead)")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=["fast"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--profile", metavar="RECIPE", help="profile one epoch of this recipe instead")
    parser.add_argument("--rows", type=int, default=25, help="rows of the profile's table")
    args = parser.parse_args()
    device = select_device(args.device)
    t = time.perf_counter()
    data = D.load_cifar10(args.data_dir, progress=False)
    print(
        f"{describe()}\ndata loaded in {time.perf_counter() - t:.1f} s ({data.source}, verified={data.verified})"
    )
    if args.profile:
        profile(args.profile, data, device, args.rows)
    else:
        run_recipes(args.recipes, args.seeds, data, device, warmup=not args.no_warmup)


if __name__ == "__main__":
    main()
