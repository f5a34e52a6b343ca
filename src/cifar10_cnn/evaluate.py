"""Test-set evaluation of a trained model, computed (no files): `evaluate_model` -> `Evaluation`.

The test set is only ever measured here. There is one temperature: the one training fitted on the validation
split's single views and stored with the weights, which predict and serve apply. Evaluation applies it to its
own (possibly TTA) logits, and measures apart, as `served`, exactly what predict and serve return: one view per
image at that temperature. With Captum (the `explain` extra) it also computes Grad-CAM maps of 12 test images
(correct, confidently wrong, least confident); without it the evaluation says how to get them. Writing it all
down is eval_files.py's; `cifar10 evaluate` of a saved model is eval_job.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import nn

from . import calibration as C
from . import data as D
from . import explain as X
from .config import TrainConfig, check_tta
from .corruptions import APPROXIMATION_NOTE, CORRUPTIONS, SEVERITIES, corrupt
from .errors import UserError, first_line
from .inference import evaluate_logits, predict_logits, selective_tta_logits
from .metrics import classification_metrics, confident_errors
from .weights import model_fingerprint

N_CONFIDENT_ERRORS = 24
N_EXPLAINED = 4  # test images per group in the report's Grad-CAM figure
EXPLAINED_GROUPS = {
    "correct": "Correctly classified (a seeded random choice)",
    "confidently_wrong": "Confidently wrong",
    "least_confident": "Least confident",
}


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation measures, beyond the plain test accuracy; checked once, here (one line on bad values)."""

    tta: int = 0  # test-time augmentation: 0 none, 1 mirror, 2 mirror + 1-pixel shifts (see inference.py)
    tta_margin: float = 1.0  # TTA only where the plain view's top-two margin is below this (1: every image)
    corruptions: bool = False  # the robustness suite: 10 corruptions x 5 severities
    corruption_images: int | None = None  # the suite on the first n test images (None: all of them)
    corruption_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tta", int(self.tta))
        object.__setattr__(self, "tta_margin", float(self.tta_margin))
        check_tta(self.tta, self.tta_margin)
        if self.corruption_images is not None and self.corruption_images < 1:
            raise UserError("--corruption-images must be at least 1")

    @classmethod
    def of(cls, cfg: TrainConfig) -> EvalOptions:
        """The test evaluation a training config asks for."""
        return cls(tta=cfg.tta, tta_margin=cfg.tta_margin)


@dataclass(frozen=True)
class Explanations:
    """Grad-CAM maps of a few test images per group: of the true class and of the predicted one."""

    groups: dict[str, np.ndarray]  # EXPLAINED_GROUPS key -> test indices
    classes: np.ndarray  # (n, 2): the true class, then the predicted one (the runner-up when they agree)
    maps: np.ndarray  # (n, 2, S, S) in [0, 1], in the order of the groups (S: the images' side)
    layer: str  # the layer Grad-CAM reads
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    """Everything one evaluation of a model on the test set measured."""

    logits: np.ndarray  # (N, C) float32, at the evaluation's TTA level
    labels: np.ndarray  # (N,)
    images: np.ndarray  # (N, H, W, 3) uint8, for the plots
    metrics: dict[str, Any]  # metrics.classification_metrics (keys "test_...")
    calibration: dict[str, Any]  # calibration.calibration_at the stored temperature, val_size, note, warning
    errors: np.ndarray  # indices of the most confidently wrong predictions, most confident first
    fingerprint: str  # weights.model_fingerprint
    tta: int
    tta_margin: float  # TTA only where the plain view's top-two margin is below this (1: every image)
    tta_share: float  # the share of test images that were augmented
    robustness: dict[str, Any] | None  # evaluate_corruptions, if it was run
    seconds: float
    test_seconds: float  # of the test-set logits, the headline figure: everything else comes after
    served_logits: np.ndarray  # (N, C) float32: one view per image, what predict and serve compute
    served: dict[str, Any]  # calibration.calibration_at of served_logits and the stored temperature
    explanations: Explanations | str = "not computed"  # or why there are none (e.g. Captum not installed)
    classes: tuple[str, ...] = D.CLASSES  # the model's class names, in the order of its outputs

    @property
    def probs(self) -> np.ndarray:
        return C.softmax(self.logits)

    @property
    def served_temperature(self) -> float:
        """The temperature predict and serve divide the logits by: the stored one, else 1."""
        t = self.served["temperature"]
        return 1.0 if t is None else t

    @property
    def served_probs(self) -> np.ndarray:
        """What predict and serve return for the test images: softmax(one view's logits / temperature)."""
        return C.softmax(self.served_logits, self.served_temperature)


def evaluate_corruptions(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    corruptions: tuple[str, ...] = CORRUPTIONS,
    severities: tuple[int, ...] = SEVERITIES,
    seed: int = 0,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of the model (no test-time augmentation) on each corruption and severity of uint8 NHWC images."""
    labels = np.asarray(labels)

    def accuracy(x: np.ndarray) -> float:
        logits = evaluate_logits(model, D.to_split(x, labels))
        return float((logits.argmax(1).numpy() == labels).mean())

    t0 = time.perf_counter()
    table: dict[str, list[float]] = {}
    clean = accuracy(images)
    for name in corruptions:
        table[name] = [accuracy(corrupt(images, name, s, seed)) for s in severities]
        if echo:
            row = "  ".join(f"{a:.1%}" for a in table[name])
            echo(f"  {name:<17} {row}  ({time.perf_counter() - t0:.0f}s)")
    per_severity = np.mean([table[c] for c in corruptions], axis=0)
    return {
        "note": APPROXIMATION_NOTE,
        "seed": seed,
        "images": len(labels),
        "tta": 0,
        "severities": list(severities),
        "clean_accuracy": clean,
        "accuracy": table,
        "mean_corruption_accuracy": float(per_severity.mean()),
        "mean_by_severity": per_severity.tolist(),
        "mean_by_corruption": {c: float(np.mean(table[c])) for c in corruptions},
        "seconds": time.perf_counter() - t0,
    }


def explain_examples(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, probs: np.ndarray, errors: np.ndarray
) -> Explanations | str:
    """Grad-CAM of N_EXPLAINED test images per group (EXPLAINED_GROUPS); without Captum, the one-line hint."""
    try:
        X.require_captum()
    except UserError as e:
        return first_line(e)
    t0 = time.perf_counter()
    pred = probs.argmax(1)
    correct = np.flatnonzero(pred == labels)
    rng = np.random.default_rng(0)
    groups = {
        "correct": np.sort(rng.choice(correct, min(N_EXPLAINED, len(correct)), replace=False)),
        "confidently_wrong": np.asarray(errors[:N_EXPLAINED], np.int64),
        "least_confident": np.argsort(probs.max(1), kind="stable")[:N_EXPLAINED],
    }
    idx = np.concatenate(list(groups.values())).astype(np.int64)
    runner_up = np.argsort(-probs[idx], axis=1, kind="stable")[:, 1]
    shown = np.where(pred[idx] == labels[idx], runner_up, pred[idx])
    classes = np.stack([labels[idx], shown], 1)
    # Both classes' maps in one batch: one forward and backward pass.
    maps = X.explain(model, np.concatenate([images[idx]] * 2), target=classes.T.ravel())
    size = images.shape[1]
    maps = maps.reshape(2, len(idx), size, size).transpose(1, 0, 2, 3)
    layer = X.gradcam_layer(model, size)[0]
    return Explanations(groups, classes, maps, layer, time.perf_counter() - t0)


FIT = "fit"  # evaluate_model's temperature: fit it on val, as training fits the one it stores


def fit_served_temperature(model: nn.Module, val: D.Split | None) -> float | None:
    """The temperature predict and serve apply, as training fits it to store it with the weights: on the
    validation split's single views (they compute one view per image), by NLL. None without validation."""
    if val is None or len(val) == 0:
        return None
    return C.fit_temperature(evaluate_logits(model, val).numpy(), val.labels.cpu().numpy())


def _calibration(
    logits: np.ndarray, labels: np.ndarray, temperature: float | None, val_size: int, tta: int
) -> dict[str, Any]:
    """The evaluation's logits before and after the one temperature, and where that temperature came from."""
    held = f" ({val_size:,} images held out of the training set)" if val_size else ""
    if temperature is None and not val_size:
        note = C.NO_VALIDATION
    elif temperature is None:
        note = NO_STORED_TEMPERATURE
    else:
        note = (
            f"Temperature fitted on the validation split{held} on single views (no TTA) by minimising its NLL, "
            "and stored with the weights: it is the one predict and serve apply. The test set was not used "
            "for fitting."
        )
        if tta:
            note += " Here it divides this evaluation's TTA logits; 'served' has the single-view figures."
    warning = C.few_images_warning(val_size) if temperature is not None else None
    return {**C.calibration_at(logits, labels, temperature), "val_size": val_size, "note": note,
            "warning": warning}  # fmt: skip


NO_STORED_TEMPERATURE = (
    "The weights hold no temperature, so none is applied (predict and serve use 1); the test set is never "
    "used for fitting. Probabilities are the model's own."
)


def evaluate_model(
    model: nn.Module,
    test: D.Split,
    options: EvalOptions | None = None,
    *,
    val: D.Split | None = None,
    temperature: float | Literal["fit"] | None = FIT,
    echo: Callable[[str], None] = print,
    classes: Sequence[str] = D.CLASSES,
) -> Evaluation:
    """Measure the model on the test set (and the robustness suite if asked); no files.

    temperature: the one stored with the weights (None: they hold none); FIT: fitted here on val as training
    fits the one it stores (a model not saved yet). val: the split it was fitted on (its size is reported).
    The test accuracy is printed as soon as it is known; calibration, robustness and explanations follow.
    """
    t0 = time.perf_counter()
    o = options or EvalOptions()
    tta, tta_margin = o.tta, o.tta_margin
    logits_t, unsure = selective_tta_logits(model, test.images, tta=tta, tta_margin=tta_margin)
    logits, test_seconds = logits_t.numpy(), time.perf_counter() - t0
    labels = test.labels.cpu().numpy()
    tta_share = float(unsure.float().mean()) if len(unsure) else 0.0
    echo(headline(logits, labels, tta, tta_share, test_seconds))
    stored = fit_served_temperature(model, val) if temperature == FIT else temperature
    # What predict and serve compute: the plain view (the same inference loop), at the stored temperature.
    served_logits = logits if not tta else predict_logits(model, test.images).numpy()
    images = test.images.cpu().permute(0, 2, 3, 1).numpy()
    fingerprint = model_fingerprint(model)
    robustness = None
    if o.corruptions:
        n = min(o.corruption_images or len(labels), len(labels))
        echo(f"robustness: 10 corruptions x 5 severities on {n:,} test images (accuracy per severity 1-5)")
        robustness = {
            **evaluate_corruptions(model, images[:n], labels[:n], seed=o.corruption_seed, echo=echo),
            "model_fingerprint": fingerprint,
        }
    calibration = _calibration(logits, labels, stored, len(val) if val is not None else 0, tta)
    if calibration["warning"]:
        echo(calibration["warning"])
    errors = confident_errors(C.softmax(logits), labels, N_CONFIDENT_ERRORS)
    return Evaluation(
        logits=logits,
        labels=labels,
        images=images,
        metrics=classification_metrics(logits, labels, classes),
        calibration=calibration,
        errors=errors,
        fingerprint=fingerprint,
        tta=tta,
        tta_margin=tta_margin,
        tta_share=tta_share,
        robustness=robustness,
        seconds=time.perf_counter() - t0,
        test_seconds=test_seconds,
        served_logits=served_logits,
        served=C.calibration_at(served_logits, labels, stored),
        explanations=explain_examples(model, images, labels, C.softmax(logits), errors),
        classes=tuple(classes),
    )


def headline(logits: np.ndarray, labels: np.ndarray, tta: int, share: float, seconds: float) -> str:
    """The test accuracy line, printed before the slower parts of an evaluation."""
    acc = float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")
    views = "no TTA" if not tta else f"TTA level {tta} on {share:.0%} of the images"
    return (
        f"test accuracy {acc:.2%} on {len(labels):,} images ({views}, {seconds:.1f} s); "
        "calibration, plots and report follow"
    )
