"""What each trick of a recipe buys, measured on the validation split: accuracy, calibration and time.

    python benchmarks/ablation.py --recipe quick --seeds 2 \
        --variants base calib=1000 label_smoothing=0 alternate_flip=false --tta-margins 0.1 0.25 0.5

Every variant trains the recipe (with the variant's config overrides) on the same 45,000 training images
and is measured on the same 5,000 held-out validation images (split seed 0); the test set is never read.
A variant is a name made of overrides joined by "+": `label_smoothing=0+tta=0`, or `calib=N`, which holds
out the last N training images to fit the softmax temperature on (the recipe's calibration split).

For each trained model the evaluation is timed in several ways on the validation images: no TTA, the
recipe's TTA level on every image, and the same level only on the images whose top-two probability margin
is below each --tta-margins value (selective TTA). ECE is that of the recipe's evaluation, before and (with
a calibration split) after temperature scaling by the one temperature training stores: fitted on single
views of the calibration images, applied to every way of evaluating. All figures come from this one invocation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from flops import training_flops
from machine import describe

from cifar10_cnn import calibration as C
from cifar10_cnn import data as D
from cifar10_cnn.config import recipe_config
from cifar10_cnn.errors import UserError, first_line
from cifar10_cnn.inference import selective_tta_logits
from cifar10_cnn.metrics import summarize
from cifar10_cnn.train import fit
from cifar10_cnn.tune import parse_grid

# Named variants: earlier versions of a recipe, kept runnable as baselines (`--variants base airbench94_muon`).
NAMED = {
    # `fast` as published: airbench94_muon's 8 epochs, every one at 32x32 (the baseline if fast's epochs or
    # --train-sizes change; today it is fast itself).
    "airbench94_muon": dict(epochs=8, train_sizes=""),
}


def parse_variant(variant: str) -> tuple[dict, int]:
    """`key=value+key=value` -> (config overrides, calibration images); `base` is no override.

    Values are typed as `cifar10 tune --grid` types them (one value each); a NAMED variant adds its overrides."""
    parts = [p for p in variant.split("+") if p != "base"]
    named = {k: v for p in parts if p in NAMED for k, v in NAMED[p].items()}
    parts = [p for p in parts if p not in NAMED]
    calib = [int(p.partition("=")[2]) for p in parts if p.startswith("calib=")]
    overrides = parse_grid([p for p in parts if not p.startswith("calib=")])
    return named | {k: v[0] for k, v in overrides.items()}, calib[-1] if calib else 0


def evaluations(model, measure: D.Split, calib: D.Split | None, tta: int, margins: list[float]) -> dict:
    """Accuracy, share augmented and seconds on the measure split for each way of evaluating."""
    labels = measure.labels.numpy()
    modes = {"no TTA": (0, 1.0), f"TTA {tta}": (tta, 1.0)} if tta else {"no TTA": (0, 1.0)}
    modes |= {f"TTA {tta} @ {m:g}": (tta, m) for m in margins} if tta else {}
    # One temperature, fitted on single views of the calibration split, as training stores it for every view.
    temperature = None
    if calib is not None:
        calib_logits = selective_tta_logits(model, calib.images, tta=0)[0].numpy()
        temperature = C.fit_temperature(calib_logits, calib.labels.numpy())
    out = {}
    for name, (level, margin) in modes.items():
        t0 = time.perf_counter()
        logits, unsure = selective_tta_logits(model, measure.images, tta=level, tta_margin=margin)
        seconds = time.perf_counter() - t0
        logits = logits.numpy()
        row = {
            "acc": float((logits.argmax(1) == labels).mean()),
            "share": float(unsure.float().mean()),
            "seconds": seconds,
            "ece": C.calibration_metrics(logits, labels)["ece"],
        }
        if temperature is not None:
            row["ece_calibrated"] = C.calibration_metrics(logits, labels, temperature)["ece"]
            row["temperature"] = temperature
        out[name] = row
    return out


def one_run(recipe: str, variant: str, seed: int, data: D.CIFAR10, margins: list[float], extra: dict) -> dict:
    overrides, n_calib = parse_variant(variant)
    # val_size None: the default split (5,000 images, a tenth of --subset) is the measure split.
    cfg = recipe_config(recipe, seed=seed, **{**extra, **overrides, "val_size": None})
    splits = D.make_splits(data, **cfg.split_args())
    measure, train, calib = splits.val, splits.train, None
    if n_calib:
        calib = D.Split(train.images[-n_calib:], train.labels[-n_calib:])
        train = D.Split(train.images[:-n_calib], train.labels[:-n_calib])
    empty = D.Split(train.images[:0], train.labels[:0])  # fit() validates on nothing: no extra cost
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(
            cfg, D.Splits(train, empty, splits.test), Path(tmp), progress=False, echo=lambda *_: None
        )
    evals = evaluations(result.model, measure, calib, cfg.tta, margins)
    return {
        "train_seconds": result.train_seconds,
        "train_flops": training_flops(cfg, len(train)),
        "measure_size": len(measure),
        "evals": evals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quick")
    parser.add_argument("--variants", nargs="+", default=["base"])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--tta-margins", nargs="*", type=float, default=[])
    parser.add_argument("--epochs", type=int, help="smoke tests only")
    parser.add_argument("--subset", type=int, help="smoke tests only (the measure split is then a tenth)")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    extra = {k: v for k, v in (("epochs", args.epochs), ("subset", args.subset)) if v is not None}
    try:
        for variant in args.variants:
            parse_variant(variant)  # refuse a typo before hours of training
    except (UserError, ValueError) as e:
        sys.exit(f"error: variant: {first_line(e)}")

    data = D.load_cifar10(args.data_dir, progress=False)
    print(f"recipe {args.recipe}; {describe()}", flush=True)
    runs: dict[str, list[dict]] = {}
    for variant in args.variants:
        for seed in range(args.seeds):
            r = one_run(args.recipe, variant, seed, data, args.tta_margins, extra)
            runs.setdefault(variant, []).append(r)
            best = list(r["evals"].values())[-1]
            print(f"  {variant} seed {seed}: {best['acc']:.2%} in {r['train_seconds']:.0f} s", flush=True)

    w = max(len("variant"), *map(len, runs))
    measure_size = next(iter(runs.values()))[0]["measure_size"]
    print(
        f"\nmeasured on {measure_size:,} validation images; mean over {args.seeds} seed(s) (± std when > 1)\n"
        f"{'variant':<{w}} {'evaluation':<16} {'val acc':>15} {'ECE':>7} {'ECE (T)':>8} {'TTA share':>9} "
        f"{'eval s':>7} {'train s':>8} {'TFLOP':>6}"
    )
    for variant, rs in runs.items():
        train_s = np.mean([r["train_seconds"] for r in rs])
        tflop = rs[0]["train_flops"] / 1e12
        for mode in rs[0]["evals"]:
            rows = [r["evals"][mode] for r in rs]
            acc = summarize([x["acc"] for x in rows])
            acc_text = f"{acc['mean']:.2%}" + (f" ± {acc['std']:.2%}" if len(rows) > 1 else "")
            ece_t = (
                f"{np.mean([x['ece_calibrated'] for x in rows]):.2%}" if "ece_calibrated" in rows[0] else "—"
            )
            print(
                f"{variant:<{w}} {mode:<16} {acc_text:>15} {np.mean([x['ece'] for x in rows]):>7.2%} "
                f"{ece_t:>8} {np.mean([x['share'] for x in rows]):>9.0%} "
                f"{np.mean([x['seconds'] for x in rows]):>7.1f} {train_s:>8.0f} {tflop:>6.1f}"
            )


if __name__ == "__main__":
    main()
