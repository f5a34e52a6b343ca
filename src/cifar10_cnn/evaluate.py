"""Test-set evaluation of a trained model: compute everything first (`evaluate_model`), then write it.

    cifar10 evaluate runs/<run>                      # metrics, calibration, plots -> runs/<run>/eval/
    cifar10 evaluate runs/<run> --corruptions        # adds the robustness suite
    cifar10 evaluate model.safetensors               # a weights file: results go to model-eval/ beside it

The test set is only ever measured here. There is one temperature: the one training fitted on the validation
split's single views and stored with the weights, which predict and serve apply. Evaluation applies it to its
own (possibly TTA) logits, and measures apart, as `served`, exactly what predict and serve return: one view per
image at that temperature. Evaluation writes only eval/, plots/ and results.json: never the weights, nor the
report (pipeline.py renders it after the evaluation). With Captum (the `explain` extra) it also draws Grad-CAM
maps of 12 test images (correct, confidently wrong, least confident) into eval/explanations.png; without it the
report says how to get them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import augment, plots
from . import calibration as C
from . import data as D
from . import explain as X
from .config import TrainConfig, check_tta
from .corruptions import APPROXIMATION_NOTE, CORRUPTIONS, SEVERITIES, corrupt
from .datasets import load_run_data
from .errors import CheckpointError, UserError, first_line
from .files import read_json_object
from .inference import evaluate_logits, predict_logits, selective_tta_logits
from .metrics import classification_metrics, confident_errors
from .models import count_params
from .runs import Run, check_claimable, claim_dir, write_atomic, write_json
from .weights import ModelMeta, load_model, model_fingerprint, read_temperature, run_dir_of, weights_path

N_CONFIDENT_ERRORS = 24
N_SAMPLES = (
    32  # sample predictions shown: the same test images for every run, to compare runs picture by picture
)


N_EXPLAINED = 4  # test images per group in the report's Grad-CAM figure
EXPLAINED_GROUPS = {
    "correct": "Correctly classified (a seeded random choice)",
    "confidently_wrong": "Confidently wrong",
    "least_confident": "Least confident",
}


# --- computing (no files) ----------------------------------------------------------------------------------


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
    maps: np.ndarray  # (n, 2, 32, 32) in [0, 1], in the order of the groups
    layer: str  # the layer Grad-CAM reads
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    """Everything one evaluation of a model on the test set measured."""

    logits: np.ndarray  # (N, C) float32, at the evaluation's TTA level
    labels: np.ndarray  # (N,)
    images: np.ndarray  # (N, H, W, 3) uint8, for the plots
    metrics: dict[str, Any]  # metrics.classification_metrics (keys "test_...")
    calibration: dict[str, Any]  # calibration.calibration_at the stored temperature, with val_size and note
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
    maps = maps.reshape(2, len(idx), 32, 32).transpose(1, 0, 2, 3)
    layer = X.gradcam_layer(model)[0]
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
    return {**C.calibration_at(logits, labels, temperature), "val_size": val_size, "note": note}


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
    errors = confident_errors(C.softmax(logits), labels, N_CONFIDENT_ERRORS)
    return Evaluation(
        logits=logits,
        labels=labels,
        images=images,
        metrics=classification_metrics(logits, labels, classes),
        calibration=_calibration(logits, labels, stored, len(val) if val is not None else 0, tta),
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


def evaluate_into_run(
    run_dir: str | os.PathLike,
    test: D.Split,
    options: EvalOptions | None = None,
    *,
    model: nn.Module | None = None,
    val: D.Split | None = None,
    weights: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on the test set once and write the results into run_dir; returns results.json.

    model: the model to evaluate (None: load weights, default the run's model.safetensors). The temperature is
    the one stored in weights; only when there is no weights file (a model not saved yet) is it fitted on val,
    as training fits it. val: the run's validation split (None or empty: none). classes: the model's class
    names (default: those of the weights loaded, else CIFAR-10's).
    """
    run_dir = Path(run_dir)
    weights = Path(weights) if weights is not None else Run(run_dir).file("weights")
    if model is None:
        model, meta = load_model(weights_path(weights))
        classes = classes or meta.classes
    ev = evaluate_model(
        model,
        test,
        options,
        val=val,
        temperature=read_temperature(weights) if weights.is_file() else FIT,
        echo=echo,
        classes=classes or D.CLASSES,
    )
    results = write_evaluation(run_dir, ev, weights=weights, info=info)
    echo(summary_line(results, run_dir))
    return results


# --- `cifar10 evaluate`: a run directory or a weights file -------------------------------------------------


def run_config(path: Path, metadata: ModelMeta) -> TrainConfig | None:
    """The training config of a run directory (config.json) or of a weights file (its metadata), if any."""
    if path.is_dir():
        config = Run(path).file("config")
        return TrainConfig.load(config) if config.exists() else None  # a FIFO there: one line
    saved = metadata.config
    if not saved:
        return None
    try:
        return TrainConfig.from_dict(saved)
    except UserError as e:  # the metadata is untrusted: say which file and field
        raise CheckpointError(f"{path}: metadata 'config' is not a valid training config ({e})") from None


def _check_request(
    path: Path,
    weights: Path,
    metadata: ModelMeta,
    out: str | os.PathLike | None,
) -> None:
    """Refuse, before anything is read or written, what cannot be evaluated as asked."""
    if path.is_dir() and out is not None:
        raise UserError("--out is for a weights file; a run directory is evaluated into itself")
    if path.is_dir():
        Run(path).read_results()  # refused now, not after the evaluation (a FIFO, a huge or broken file)
    if not path.is_dir():  # a new or empty folder, or one an evaluation of ours made: nothing else
        check_claimable(out if out is not None else default_eval_dir(weights))


def default_eval_dir(weights: Path) -> Path:
    """Where the evaluation of a weights file goes without --out: <name>-eval/ beside it."""
    return weights.with_name(f"{weights.stem}-eval")


def _validation_split(cfg: TrainConfig | None, data: D.CIFAR10) -> D.Split | None:
    """The run's validation split, rebuilt exactly as training built it (same size, seed and subset): the
    stored temperature was fitted on it. None without a config or a validation split."""
    if cfg is None or cfg.resolved_val_size <= 0:
        return None
    return D.make_splits(data, **cfg.split_args()).val


def _weights_file_info(
    weights: Path, model: nn.Module, metadata: ModelMeta, cfg: TrainConfig | None, val: D.Split | None
) -> dict[str, Any]:
    """What results.json says about a weights file evaluated on its own (a run directory already has it)."""
    return {
        "model": metadata.architecture,
        "params": count_params(model),
        "recipe": cfg.recipe if cfg else None,
        "val_size": len(val) if val is not None else 0,
        "weights": str(weights),
    }


def evaluate_saved(
    path: str | os.PathLike,
    options: EvalOptions | None = None,
    *,
    data: D.CIFAR10 | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Evaluate a saved model: a run directory (into itself) or a weights file (into out, default
    <name>-eval/ beside it: a new or empty folder, or one an earlier evaluation marked as ours). The CLI's
    `evaluate`.

    Everything that can be wrong (no finished model, unknown architecture, other classes, data failing
    verification) is checked before anything is written. Returns the directory written.
    """
    path = Path(path)
    weights = weights_path(path)
    model, metadata = load_model(weights)
    _check_request(path, weights, metadata, out)
    cfg = run_config(path, metadata)
    if data is None:
        data = load_run_data(
            run_dir_of(path),
            cfg.data_args() if cfg else {},
            data_dir,
            allow_unverified=allow_unverified,
            progress=progress,
        )
    _check_classes(weights, metadata, data)
    val = _validation_split(cfg, data)
    info: dict[str, Any] = {"data": data.provenance()}
    if path.is_dir():
        run_dir = path
    else:
        run_dir = claim_dir(out if out is not None else default_eval_dir(weights)).path
        info |= _weights_file_info(weights, model, metadata, cfg, val)
    evaluate_into_run(
        run_dir,
        D.to_split(data.test_images, data.test_labels),
        options,
        model=model,
        val=val,
        weights=weights,
        info=info,
        echo=echo,
        classes=metadata.classes,
    )
    return run_dir


def _check_classes(weights: Path, metadata: ModelMeta, data: D.Dataset) -> None:
    """The model's classes must be the data's, in the same order (before anything is written)."""
    classes, theirs = list(metadata.classes), list(data.classes)
    if classes != theirs:
        raise UserError(
            f"{weights} classifies {len(classes)} classes ({', '.join(map(str, classes[:4]))}, ...), not the "
            f"{len(theirs)} classes of {data.source} ({', '.join(map(str, theirs[:4]))}, ...); it cannot be "
            "evaluated on that test set (pass --data-dir the data it was trained on)"
        )


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
