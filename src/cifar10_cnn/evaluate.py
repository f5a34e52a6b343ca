"""Test-set evaluation of a trained model: metrics as pure functions on arrays, and the run's final results."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as D
from . import plots
from .checkpoint import load_model, weights_path
from .runs import read_json, read_metrics_csv, write_json


def evaluate_logits(
    model: nn.Module,
    split: D.Split,
    *,
    batch_size: int = 1000,
    tta: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits for a whole split (float32, on CPU), with test-time augmentation at level tta.

    Level 1 averages each image with its mirror; level 2 also averages that with the two views shifted by
    one pixel (up-left and down-right, reflect padding), with the unshifted views weighted one half.
    """
    model.eval()
    device = next(model.parameters()).device
    out = []

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()
        return 0.5 * (logits + model(x.flip(3)).float()) if tta else logits

    with (
        torch.inference_mode(),
        torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None),
    ):
        for idx in D.batch_indices(len(split), batch_size):
            x = D.normalize(split.images[idx.to(split.images.device)]).to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            logits = mirrored(x)
            if tta == 2:
                padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
                shifted = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]
                logits = 0.5 * logits + 0.25 * sum(
                    mirrored(v.contiguous(memory_format=torch.channels_last)) for v in shifted
                )
            out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros(0, 10)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    labels = labels.to(logits.device)
    loss = nn.functional.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    return np.bincount(num_classes * np.asarray(true) + np.asarray(pred), minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (the diagonal over the row sums); NaN for a class with no images."""
    totals = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    z = logits - logits.max(1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] = D.CLASSES
) -> dict:
    """Accuracy, loss, per-class accuracy and the confusion matrix of logits against labels."""
    pred = logits.argmax(1)
    cm = confusion_matrix(labels, pred, len(classes))
    return {
        "test_accuracy": float((pred == labels).mean()),
        "test_loss": cross_entropy(logits, labels),
        "per_class_accuracy": {c: float(a) for c, a in zip(classes, per_class_accuracy(cm), strict=True)},
        "confusion_matrix": cm.tolist(),
    }


def evaluate_run(
    run_dir: str | os.PathLike,
    test: D.Split,
    *,
    tta: bool = False,
    model: nn.Module | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate the run's final model on the test set once; write results.json, plots and the report."""
    from .report import write_report

    run_dir = Path(run_dir)
    if model is None:
        model, _ = load_model(weights_path(run_dir))
    t0 = time.perf_counter()
    logits = evaluate_logits(model, test, tta=tta).numpy()
    labels = test.labels.cpu().numpy()
    metrics = classification_metrics(logits, labels)
    results = {
        **read_json(run_dir / "results.json"),
        **metrics,
        "test_size": len(labels),
        "tta": tta,
        "eval_seconds": time.perf_counter() - t0,
        "class_names": list(D.CLASSES),
    }
    write_json(run_dir / "results.json", results)
    write_plots(run_dir, logits, labels, test.images.cpu().permute(0, 2, 3, 1).numpy(), results)
    write_report(run_dir)
    echo(f"test accuracy {metrics['test_accuracy']:.2%}  test loss {metrics['test_loss']:.4f}  -> {run_dir}")
    return results


def write_plots(
    run_dir: Path, logits: np.ndarray, labels: np.ndarray, images: np.ndarray, results: dict[str, Any]
) -> None:
    """The run's evaluation plots, from arrays and the run directory's files."""
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    rows = read_metrics_csv(run_dir / "metrics.csv")
    if rows:
        plots.plot_curves(rows, out / "curves.png")
    plots.plot_confusion(np.array(results["confusion_matrix"]), list(D.CLASSES), out / "confusion.png")
    plots.plot_per_class(results["per_class_accuracy"], out / "per_class.png")
    probs = softmax(logits)
    # The same 32 test images for every run, so that runs can be compared picture by picture.
    pick = np.random.default_rng(0).choice(len(labels), size=min(32, len(labels)), replace=False)
    pred = probs[pick].argmax(1)
    plots.plot_predictions(
        images[pick], labels[pick], pred, list(D.CLASSES), out / "predictions.png", probs=probs[pick, pred]
    )


def augmentation_preview(train: D.Split, out: Path, cfg, seed: int = 0) -> Path:
    """A grid of training images after the run's augmentation (cfg: the run's TrainConfig)."""
    gen = torch.Generator().manual_seed(seed)
    x = train.images[: min(32, len(train))].cpu()
    aug = D.augment(
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
