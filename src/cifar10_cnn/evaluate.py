"""Test-set evaluation of a trained model: metrics as pure functions on arrays, and the run's final results.

    cifar10 evaluate runs/<run>                      # metrics, calibration, plots -> runs/<run>/eval/, report
    cifar10 evaluate runs/<run> --corruptions        # adds the robustness suite
    cifar10 evaluate model.safetensors               # a weights file: results go to model-eval/ beside it

The test set is only ever measured here; the temperature is fitted on the run's validation split.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import augment, plots
from . import calibration as C
from . import data as D
from .config import TrainConfig
from .errors import UserError
from .inference import evaluate_logits
from .runs import read_json, read_metrics_csv, write_json
from .weights import ModelMeta, load_model, model_fingerprint, weights_path

EVAL_DIR = "eval"
N_CONFIDENT_ERRORS = 24


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    return np.bincount(num_classes * np.asarray(true) + np.asarray(pred), minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the share of a true class given to each prediction); empty rows stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (the diagonal over the row sums); NaN for a class with no images."""
    totals = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)


def precision_recall_f1(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix; 0 where undefined (0 / 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, predicted, actual = np.diag(cm), cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual.astype(int)}


def accuracy_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy of correct / n (95% for z = 1.96); sound near 0% and 100% too."""
    if n <= 0:
        raise ValueError("accuracy_interval: no images")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k highest logits."""
    top = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(1).mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    return C.softmax(logits)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    return C.nll(logits, labels)


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] = D.CLASSES
) -> dict:
    """Accuracy (with its 95% interval), top-2, loss, per-class scores and the confusion matrix."""
    labels = np.asarray(labels)
    pred = logits.argmax(1)
    cm = confusion_matrix(labels, pred, len(classes))
    scores = precision_recall_f1(cm)
    correct = int((pred == labels).sum())
    return {
        "test_accuracy": correct / len(labels),
        "test_accuracy_ci95": list(accuracy_interval(correct, len(labels))),
        "test_top2_accuracy": topk_accuracy(logits, labels, 2),
        "test_loss": cross_entropy(logits, labels),
        "per_class_accuracy": {c: float(a) for c, a in zip(classes, per_class_accuracy(cm), strict=True)},
        "per_class": {
            c: {k: float(scores[k][i]) if k != "support" else int(scores[k][i]) for k in scores}
            for i, c in enumerate(classes)
        },
        "macro_f1": float(scores["f1"].mean()),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": normalize_rows(cm).round(6).tolist(),
    }


def temperature_scaling(
    model: nn.Module, val: D.Split | None, test_logits: np.ndarray, test_labels: np.ndarray, *, tta: int = 0
) -> dict[str, Any]:
    """Calibration of the test predictions before and after a temperature fitted on the validation split.

    The temperature for the report is fitted at the evaluation's TTA level; the one stored with the weights
    (for predict and serve, which see one view per image) is fitted without TTA.
    """
    before = C.calibration_metrics(test_logits, test_labels)
    if val is None or len(val) == 0:
        return {
            "bins": C.N_BINS,
            "uncalibrated": before,
            "calibrated": None,
            "temperature": None,
            "stored_temperature": None,
            "val_size": 0,
            "note": "The run has no validation split (val_size 0), so no temperature was fitted: the test set "
            "is never used for fitting. Probabilities are the model's own.",
        }
    val_labels = val.labels.cpu().numpy()
    temperature = C.fit_temperature(evaluate_logits(model, val, tta=tta).numpy(), val_labels)
    stored = temperature if tta == 0 else C.fit_temperature(evaluate_logits(model, val).numpy(), val_labels)
    return {
        "bins": C.N_BINS,
        "uncalibrated": before,
        "calibrated": C.calibration_metrics(test_logits, test_labels, temperature),
        "temperature": temperature,
        "stored_temperature": stored,
        "val_size": len(val_labels),
        "note": f"Temperature fitted on the validation split ({len(val_labels):,} images held out of the "
        "training set) by minimising its NLL; the test set was not used for fitting.",
    }


def confident_errors(probs: np.ndarray, labels: np.ndarray, n: int = N_CONFIDENT_ERRORS) -> np.ndarray:
    """Indices of the n wrong predictions with the highest confidence, most confident first."""
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    return wrong[np.argsort(-conf[wrong], kind="stable")[:n]]


def evaluate_run(
    run_dir: str | os.PathLike,
    test: D.Split,
    *,
    tta: int = 0,
    model: nn.Module | None = None,
    val: D.Split | None = None,
    corruptions: bool = False,
    corruption_images: int | None = None,
    corruption_seed: int = 0,
    weights: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate a model on the test set once; write results.json, eval/, plots, the temperature and the report.

    val: the run's validation split, to fit the temperature on (None or empty: no temperature). Everything
    is computed before anything is written. Returns the updated results.json.
    """
    from .report import write_report

    run_dir = Path(run_dir)
    weights = Path(weights) if weights is not None else run_dir / "model.safetensors"
    if model is None:
        model, _ = load_model(weights_path(weights))
    t0 = time.perf_counter()
    tta = int(tta)
    logits = evaluate_logits(model, test, tta=tta).numpy()
    labels = test.labels.cpu().numpy()
    images = test.images.cpu().permute(0, 2, 3, 1).numpy()
    metrics = classification_metrics(logits, labels)
    calibration = temperature_scaling(model, val, logits, labels, tta=tta)
    probs = C.softmax(logits)
    errors = confident_errors(probs, labels)
    fingerprint = model_fingerprint(model)
    robustness = None
    if corruptions:
        from .corruptions import evaluate_corruptions

        n = min(corruption_images or len(labels), len(labels))
        echo(f"robustness: 10 corruptions x 5 severities on {n:,} test images (accuracy per severity 1-5)")
        robustness = {
            **evaluate_corruptions(model, images[:n], labels[:n], seed=corruption_seed, echo=echo),
            "model_fingerprint": fingerprint,
        }
    eval_seconds = time.perf_counter() - t0

    eval_dir = run_dir / EVAL_DIR
    robustness_file = eval_dir / "robustness.json"
    if robustness is None:
        # A robustness suite run earlier stays valid while the weights are the same ones.
        previous = read_json(robustness_file)
        robustness = previous if previous.get("model_fingerprint") == fingerprint else None
    before, after = calibration["uncalibrated"], calibration["calibrated"]
    evaluation = {
        "weights": str(weights),
        "model_fingerprint": fingerprint,
        "test_size": len(labels),
        "tta": tta,
        "class_names": list(D.CLASSES),
        **{k.removeprefix("test_"): v for k, v in metrics.items()},
        "calibration": calibration,
        "confident_errors": [
            {
                "index": int(i),
                "true": D.CLASSES[labels[i]],
                "pred": D.CLASSES[int(probs[i].argmax())],
                "confidence": float(probs[i].max()),
            }
            for i in errors
        ],
        "eval_seconds": eval_seconds,
    }
    results = {
        **read_json(run_dir / "results.json"),
        **(info or {}),
        **metrics,
        "test_nll": before["nll"],
        "test_brier": before["brier"],
        "test_ece": before["ece"],
        "test_mce": before["mce"],
        "temperature": calibration["temperature"],
        "test_nll_calibrated": after and after["nll"],
        "test_brier_calibrated": after and after["brier"],
        "test_ece_calibrated": after and after["ece"],
        "test_mce_calibrated": after and after["mce"],
        "mean_corruption_accuracy": robustness and robustness["mean_corruption_accuracy"],
        "test_size": len(labels),
        "tta": tta,
        "eval_seconds": eval_seconds,
        "class_names": list(D.CLASSES),
    }

    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json(eval_dir / "metrics.json", evaluation)
    if corruptions:
        write_json(robustness_file, robustness)
    elif robustness is None:
        robustness_file.unlink(missing_ok=True)
        (eval_dir / "corruptions.png").unlink(missing_ok=True)
    write_json(run_dir / "results.json", results)
    write_plots(run_dir, logits, labels, images, results, evaluation, robustness)
    if calibration["stored_temperature"] is not None and weights.is_file():
        C.write_temperature(weights, calibration["stored_temperature"])
    write_report(run_dir)
    ece = f"ECE {before['ece']:.2%}"
    if after is not None:
        ece += f" ({after['ece']:.2%} at temperature {calibration['temperature']:.3f})"
    mca = (
        ""
        if robustness is None
        else f"  mean corruption accuracy {robustness['mean_corruption_accuracy']:.2%}"
    )
    echo(
        f"test accuracy {metrics['test_accuracy']:.2%}  test loss {metrics['test_loss']:.4f}  {ece}{mca}  -> {run_dir}"
    )
    return results


def write_plots(
    run_dir: Path,
    logits: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray,
    results: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    robustness: dict[str, Any] | None = None,
) -> None:
    """The run's evaluation plots (plots/ and eval/), from arrays and the run directory's files."""
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    classes = list(D.CLASSES)
    rows = read_metrics_csv(run_dir / "metrics.csv")
    if rows:
        plots.plot_curves(rows, out / "curves.png")
    plots.plot_confusion(np.array(results["confusion_matrix"]), classes, out / "confusion.png")
    per_class = results.get("per_class") or {}
    plots.plot_per_class(
        results["per_class_accuracy"],
        out / "per_class.png",
        precision={c: v["precision"] for c, v in per_class.items()} or None,
        f1={c: v["f1"] for c, v in per_class.items()} or None,
    )
    probs = C.softmax(logits)
    # The same 32 test images for every run, so that runs can be compared picture by picture.
    pick = np.random.default_rng(0).choice(len(labels), size=min(32, len(labels)), replace=False)
    pred = probs[pick].argmax(1)
    plots.plot_predictions(
        images[pick], labels[pick], pred, classes, out / "predictions.png", probs=probs[pick, pred]
    )
    if evaluation is None:
        return
    eval_dir = run_dir / EVAL_DIR
    cal = evaluation["calibration"]
    plots.plot_reliability(
        cal["uncalibrated"],
        eval_dir / "reliability.png",
        after=cal["calibrated"],
        temperature=cal["temperature"],
    )
    errors = np.array([e["index"] for e in evaluation["confident_errors"]], dtype=int)
    if len(errors):
        wrong = int((probs.argmax(1) != labels).sum())
        plots.plot_predictions(
            images[errors],
            labels[errors],
            probs[errors].argmax(1),
            classes,
            eval_dir / "confident_errors.png",
            probs=probs[errors],
            title=f"The {len(errors)} most confidently wrong test predictions (of {wrong:,} wrong): "
            "predicted class (confidence), true class",
        )
    else:
        (eval_dir / "confident_errors.png").unlink(missing_ok=True)
    if robustness is not None:
        plots.plot_corruptions(
            robustness["accuracy"],
            robustness["clean_accuracy"],
            eval_dir / "corruptions.png",
            title=f"Accuracy under corruption, {robustness['images']:,} test images "
            "(regenerated CIFAR-10-C approximation)",
        )


def run_config(path: Path, metadata: ModelMeta) -> TrainConfig | None:
    """The training config of a run directory (config.json) or of a weights file (its metadata), if any."""
    if path.is_dir():
        return TrainConfig.load(path / "config.json") if (path / "config.json").is_file() else None
    saved = metadata.config
    return TrainConfig.from_dict(saved) if isinstance(saved, dict) and saved else None


def evaluate_path(
    path: str | os.PathLike,
    *,
    data: D.CIFAR10 | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    tta: int = 0,
    corruptions: bool = False,
    corruption_images: int | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Evaluate a run directory (into itself) or a weights file (into out, default <name>-eval/ beside it).

    Everything that can be wrong (no finished model, unknown architecture, other classes, data failing
    verification) is checked before anything is written. Returns the directory written.
    """
    from .models import count_params

    path = Path(path)
    weights = weights_path(path)
    model, metadata = load_model(weights)
    classes = list(metadata.classes)
    if classes != list(D.CLASSES):
        raise UserError(
            f"{weights} classifies {len(classes)} classes ({', '.join(map(str, classes[:4]))}, ...), "
            "not the CIFAR-10 classes; it cannot be evaluated on the CIFAR-10 test set"
        )
    if path.is_dir() and out is not None:
        raise UserError("--out is for a weights file; a run directory is evaluated into itself")
    if corruption_images is not None and corruption_images < 1:
        raise UserError("--corruption-images must be at least 1")
    cfg = run_config(path, metadata)
    if data is None:
        data = D.load_cifar10(data_dir, allow_unverified=allow_unverified, progress=progress)
    val = None
    if cfg is not None and cfg.resolved_val_size > 0:
        # Rebuilt exactly as training built it: same size, seed and subset, so it never overlaps training.
        val = D.make_splits(data, **cfg.split_args()).val
    test = D.to_split(data.test_images, data.test_labels)
    info: dict[str, Any] = {"data": data.describe()}
    if path.is_dir():
        run_dir = path
    else:
        run_dir = Path(out) if out is not None else weights.with_name(f"{weights.stem}-eval")
        run_dir.mkdir(parents=True, exist_ok=True)
        info |= {
            "model": metadata.architecture,
            "params": count_params(model),
            "recipe": cfg.recipe if cfg else None,
            "val_size": len(val) if val is not None else 0,
            "weights": str(weights),
        }
    evaluate_run(
        run_dir,
        test,
        tta=tta,
        model=model,
        val=val,
        corruptions=corruptions,
        corruption_images=corruption_images,
        weights=weights,
        info=info,
        echo=echo,
    )
    return run_dir


def augmentation_preview(train: D.Split, out: Path, cfg, seed: int = 0) -> Path:
    """A grid of training images after the run's augmentation (cfg: the run's TrainConfig)."""
    gen = torch.Generator().manual_seed(seed)
    x = train.images[: min(32, len(train))].cpu()
    aug = augment.augment_batch(
        x, gen, crop_padding=cfg.crop_padding, crop_mode=cfg.crop_mode, flip=cfg.flip, cutout_size=cfg.cutout
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    return plots.plot_image_grid(
        aug.permute(0, 2, 3, 1).numpy(),
        train.labels[: len(x)].cpu().numpy(),
        list(D.CLASSES),
        out,
        title=f"Training images after augmentation ({cfg.augment})",
    )
