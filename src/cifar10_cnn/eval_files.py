"""An evaluation written into a run directory: eval/ (metrics.json, robustness.json, its figures), plots/
and the fields it adds to results.json, and the one line it prints. Never the weights, nor the report
(pipeline.py renders it after the evaluation). Computing the evaluation is evaluate.py's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import augment, plots
from . import data as D
from . import explain as X
from .config import TrainConfig
from .evaluate import EXPLAINED_GROUPS, N_EXPLAINED, Evaluation
from .files import read_json_object
from .runs import Run, write_atomic, write_json

N_SAMPLES = 32  # sample predictions: the same test images for every run, to compare runs picture by picture


def explanations_record(ev: Evaluation) -> dict[str, Any]:
    """What eval/metrics.json says of the Grad-CAM figure: each image and its maps' classes, or the note."""
    x = ev.explanations
    if isinstance(x, str):
        return {"note": x}
    probs, names = ev.probs, ev.classes
    rows = [(group, int(i)) for group, ids in x.groups.items() for i in ids]
    return {
        "method": X.METHOD_NAMES["gradcam"],
        "layer": x.layer,
        "seconds": x.seconds,
        "images": [
            {
                "group": group,
                "index": i,
                "true": names[ev.labels[i]],
                "pred": names[int(probs[i].argmax())],
                "confidence": float(probs[i].max()),
                "maps": [names[int(c)] for c in x.classes[n]],
            }
            for n, (group, i) in enumerate(rows)
        ],
    }


SERVED_NOTE = (
    "What predict and serve return: one view per image (no TTA), softmax of the logits divided by the "
    "temperature stored with the weights (1 when they hold none); 'uncalibrated' is the same view at 1."
)


def served_fields(ev: Evaluation) -> dict[str, Any]:
    """results.json's `served`: accuracy, ECE, MCE and NLL of what predict and serve return, raw and calibrated."""
    before, after = ev.served["uncalibrated"], ev.served["calibrated"]
    return {
        "temperature": ev.served_temperature,
        "temperature_stored": ev.served["temperature"] is not None,
        "temperature_warning": ev.calibration.get("warning"),  # fitted on few images (None: enough)
        "tta": 0,
        "accuracy": before["accuracy"],
        **{f"{k}_raw": before[k] for k in ("ece", "mce", "nll")},
        **{f"{k}_calibrated": after and after[k] for k in ("ece", "mce", "nll")},
    }


def evaluation_record(ev: Evaluation, weights: Path) -> dict[str, Any]:
    """The content of eval/metrics.json."""
    probs = ev.probs
    return {
        "weights": str(weights),
        "model_fingerprint": ev.fingerprint,
        "test_size": len(ev.labels),
        "tta": ev.tta,
        "tta_margin": ev.tta_margin,
        "tta_share": ev.tta_share,
        "class_names": list(ev.classes),
        **{k.removeprefix("test_"): v for k, v in ev.metrics.items()},
        "calibration": ev.calibration,
        "served": {
            **ev.served,
            "temperature": ev.served_temperature,
            "temperature_stored": ev.served["temperature"] is not None,
            "temperature_warning": ev.calibration.get("warning"),
            "note": SERVED_NOTE,
        },
        "confident_errors": [
            {
                "index": int(i),
                "true": ev.classes[ev.labels[i]],
                "pred": ev.classes[int(probs[i].argmax())],
                "confidence": float(probs[i].max()),
            }
            for i in ev.errors
        ],
        "explanations": explanations_record(ev),
        "eval_seconds": ev.seconds,
    }


def results_fields(ev: Evaluation, robustness: dict[str, Any] | None) -> dict[str, Any]:
    """What an evaluation adds to results.json (robustness: the suite's results valid for these weights)."""
    before, after = ev.calibration["uncalibrated"], ev.calibration["calibrated"]
    return {
        **ev.metrics,
        **{f"test_{k}": before[k] for k in ("nll", "brier", "ece", "mce")},
        "temperature": ev.calibration["temperature"],
        **{f"test_{k}_calibrated": after and after[k] for k in ("nll", "brier", "ece", "mce")},
        "mean_corruption_accuracy": robustness and robustness["mean_corruption_accuracy"],
        "test_size": len(ev.labels),
        "tta": ev.tta,
        "tta_margin": ev.tta_margin,
        "tta_share": ev.tta_share,
        "test_seconds": ev.test_seconds,
        "eval_seconds": ev.seconds,
        "class_names": list(ev.classes),
        "served": served_fields(ev),
    }


def summary_line(results: dict[str, Any], where: Path) -> str:
    """The one line an evaluation prints."""
    ece = f"ECE {results['test_ece']:.2%}"
    if results["temperature"] is not None:
        ece += f" ({results['test_ece_calibrated']:.2%} at temperature {results['temperature']:.3f})"
    served = results.get("served") or {}
    if results.get("tta") and served:  # without TTA the evaluation is what is served: the same figures
        after = served["ece_calibrated"]
        ece += f"  served (one view): ECE {served['ece_raw']:.2%}" + (
            "" if after is None else f" -> {after:.2%}"
        )
    mca = results["mean_corruption_accuracy"]
    mca_text = "" if mca is None else f"  mean corruption accuracy {mca:.2%}"
    return (
        f"test accuracy {results['test_accuracy']:.2%}  test loss {results['test_loss']:.4f}  "
        f"{ece}{mca_text}  -> {where}"
    )


# --- writing: eval/, plots/, results.json ------------------------------------------------------------------


def _valid_robustness(run: Run, ev: Evaluation) -> dict[str, Any] | None:
    """This evaluation's robustness suite, else one run earlier on the same weights (still valid), else None."""
    if ev.robustness is not None:
        return ev.robustness
    previous = read_json_object(run.file("robustness"))
    return previous if previous.get("model_fingerprint") == ev.fingerprint else None


def _plot_test_set(run: Run, ev: Evaluation, results: dict[str, Any]) -> None:
    """plots/: training curves, confusion matrix, per-class scores and sample predictions."""
    classes = list(ev.classes)
    rows = run.read_metrics()
    if rows:
        plots.plot_curves(rows, run.file("curves_png"))
    plots.plot_confusion(np.array(results["confusion_matrix"]), classes, run.file("confusion_png"))
    per_class = results["per_class"]
    # A class without test images (a test/ folder that lacks it, a small subset) has no accuracy to draw.
    tested = {
        c: a for c, a in results["per_class_accuracy"].items() if isinstance(a, float) and math.isfinite(a)
    }
    plots.plot_per_class(
        tested,
        run.file("per_class_png"),
        precision={c: v["precision"] for c, v in per_class.items()},
        f1={c: v["f1"] for c, v in per_class.items()},
    )
    probs = ev.probs
    pick = np.random.default_rng(0).choice(len(ev.labels), size=min(N_SAMPLES, len(ev.labels)), replace=False)
    pred = probs[pick].argmax(1)
    plots.plot_predictions(
        ev.images[pick], ev.labels[pick], pred, classes, run.file("predictions_png"), probs=probs[pick, pred]
    )


def _plot_evaluation(run: Run, ev: Evaluation, robustness: dict[str, Any] | None) -> None:
    """eval/: the reliability diagram, the most confident errors and, if measured, accuracy under corruption."""
    cal = ev.calibration
    plots.plot_reliability(
        cal["uncalibrated"],
        run.file("reliability_png"),
        after=cal["calibrated"],
        temperature=cal["temperature"],
    )
    probs = ev.probs
    if len(ev.errors):
        wrong = int((probs.argmax(1) != ev.labels).sum())
        plots.plot_predictions(
            ev.images[ev.errors],
            ev.labels[ev.errors],
            probs[ev.errors].argmax(1),
            list(ev.classes),
            run.file("confident_errors_png"),
            probs=probs[ev.errors],
            title=f"The {len(ev.errors)} most confidently wrong test predictions (of {wrong:,} wrong): "
            "predicted class (confidence), true class",
        )
    else:
        run.file("confident_errors_png").unlink(missing_ok=True)
    if robustness is not None:
        plots.plot_corruptions(
            robustness["accuracy"],
            robustness["clean_accuracy"],
            run.file("corruptions_png"),
            title=f"Accuracy under corruption, {robustness['images']:,} test images "
            "(regenerated CIFAR-10-C approximation)",
        )


def _plot_explanations(run: Run, ev: Evaluation) -> None:
    """eval/explanations.png: each group's images, the true class's map and the predicted one's (or none)."""
    x = ev.explanations
    if isinstance(x, str):
        run.file("explanations_png").unlink(missing_ok=True)  # an earlier evaluation's, of other weights
        return
    probs, names, rows, start = ev.probs, ev.classes, [], 0
    for group, ids in x.groups.items():
        maps, classes = x.maps[start : start + len(ids)], x.classes[start : start + len(ids)]
        start += len(ids)
        captions = []
        for i, (true, shown) in zip(ids, classes, strict=True):
            second = "pred" if shown == probs[i].argmax() else "2nd"
            captions.append([
                f"#{i} true {names[true]}",
                f"true: {names[true]} {probs[i, true]:.0%}",
                f"{second}: {names[shown]} {probs[i, shown]:.0%}",
            ])  # fmt: skip
        if len(ids):
            rows.append((EXPLAINED_GROUPS[group], ev.images[ids], maps, captions))
    write_atomic(run.file("explanations_png"), X.figure_png(X.explanation_rows(rows, N_EXPLAINED)))


def write_evaluation(
    run_dir: str | os.PathLike, ev: Evaluation, *, weights: Path, info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write an evaluation into a run directory: eval/, results.json (merged with info) and plots/.

    Never touches the weights. Returns the updated results.json.
    """
    run = Run(Path(run_dir))
    robustness = _valid_robustness(run, ev)
    evaluation = evaluation_record(ev, weights)
    run.mkdir("eval")
    write_json(run.file("evaluation"), evaluation)
    if ev.robustness is not None:
        write_json(run.file("robustness"), ev.robustness)
    elif robustness is None:  # measured on other weights: no longer true of these
        run.file("robustness").unlink(missing_ok=True)
        run.file("corruptions_png").unlink(missing_ok=True)
    results = run.update_results({**(info or {}), **results_fields(ev, robustness)})
    _plot_test_set(run, ev, results)
    _plot_evaluation(run, ev, robustness)
    _plot_explanations(run, ev)
    return results


def augmentation_preview(
    train: D.Split, out: Path, cfg: TrainConfig, seed: int = 0, classes: Sequence[str] = D.CLASSES
) -> Path:
    """A grid of training images after the run's augmentation."""
    gen = torch.Generator().manual_seed(seed)
    x = train.images[: min(32, len(train))].cpu()
    aug = augment.augment_batch(
        x, gen, crop_padding=cfg.crop_padding, crop_mode=cfg.crop_mode, flip=cfg.flip, cutout_size=cfg.cutout
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    return plots.plot_image_grid(
        aug.permute(0, 2, 3, 1).numpy(),
        train.labels[: len(x)].cpu().numpy(),
        list(classes),
        out,
        title=f"Training images after augmentation ({cfg.augment})",
    )
