"""Evaluation: metrics against hand-computed values, corruptions, and `cifar10 evaluate` on real runs."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from cifar10_cnn import calibration as C
from cifar10_cnn import corruptions as K
from cifar10_cnn import data as D
from cifar10_cnn.evaluate import EvalOptions, evaluate_model
from cifar10_cnn.explain import explain
from cifar10_cnn.inference import evaluate_logits
from cifar10_cnn.metrics import (
    accuracy_interval,
    classification_metrics,
    confusion_matrix,
    normalize_rows,
    precision_recall_f1,
    summarize,
    topk_accuracy,
)
from cifar10_cnn.weights import load_model, read_metadata

from .conftest import DATA_DIR, copy_run, error_line, in_process, on, run_cli, snapshot

OLD_KEYS = (
    "test_accuracy",
    "test_loss",
    "per_class_accuracy",
    "confusion_matrix",
    "epochs_run",
    "train_seconds",
)


# --- classification metrics, by hand ----------------------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values():
    # 8 of 10: centre (0.8 + 1.96²/20) / (1 + 1.96²/10) = 0.716738, half-width 0.226581.
    assert accuracy_interval(8, 10) == pytest.approx((0.490156, 0.943318), abs=2e-6)
    # 0 of 10 is not a zero-width interval (the normal approximation's failure): upper 1.96²/(10 + 1.96²).
    assert accuracy_interval(0, 10) == pytest.approx((0.0, 0.277540), abs=1e-6)
    lo, hi = accuracy_interval(8187, 10_000)
    assert (lo, hi) == pytest.approx((0.811027, 0.826128), abs=2e-6)  # centre 0.818577, half 0.007551
    with pytest.raises(ValueError):
        accuracy_interval(0, 0)


def test_topk_precision_recall_f1_and_confusion_by_hand():
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    labels = np.array([0, 2, 1, 0])
    assert topk_accuracy(logits, labels, 1) == 0.25  # only the first is right
    assert topk_accuracy(logits, labels, 2) == 0.5  # the second's label is its runner-up
    assert topk_accuracy(logits, labels, 3) == 1.0

    cm = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 0]])
    s = precision_recall_f1(cm)
    # class 0: 2 of 3 predicted right, 2 of 3 found; class 1: 3 of 4 both ways; class 2: none right.
    assert s["precision"] == pytest.approx([2 / 3, 3 / 4, 0.0])
    assert s["recall"] == pytest.approx([2 / 3, 3 / 4, 0.0])
    assert s["f1"] == pytest.approx([2 / 3, 3 / 4, 0.0])
    assert s["support"].tolist() == [3, 4, 1]
    assert normalize_rows(cm) == pytest.approx(np.array([[2 / 3, 1 / 3, 0], [0, 0.75, 0.25], [1, 0, 0]]))
    assert normalize_rows(np.zeros((2, 2))).tolist() == [[0, 0], [0, 0]]
    assert confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3).tolist() == [
        [1, 1, 0],
        [0, 1, 0],
        [1, 0, 0],
    ]


def test_classification_metrics_keeps_the_old_keys_and_adds_the_new():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    m = classification_metrics(logits, labels, ("a", "b"))
    assert m["test_accuracy"] == 0.75 and m["confusion_matrix"] == [[2, 0], [1, 1]]
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.5}
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["test_top2_accuracy"] == 1.0
    # Loss: three images at p = e²/(1 + e²) of their label, one at 1/(1 + e²).
    assert m["test_loss"] == pytest.approx((3 * math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 4)
    assert m["test_accuracy_ci95"] == pytest.approx(list(accuracy_interval(3, 4)))


# --- calibration, by hand -------------------------------------------------------------------------------------


def test_nll_and_brier_by_hand():
    logits = np.array([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    assert C.softmax(logits) == pytest.approx(np.array([[0.25, 0.75]]))
    assert C.nll(logits, np.array([1])) == pytest.approx(math.log(4 / 3))
    assert C.nll(logits, np.array([0])) == pytest.approx(math.log(4))
    assert C.brier_score(np.array([[0.25, 0.75]]), np.array([1])) == pytest.approx(0.125)
    assert C.brier_score(np.array([[0.25, 0.75]]), np.array([0])) == pytest.approx(0.75**2 * 2)
    # Temperature 2 halves the logits: p = (1/(1 + √3), √3/(1 + √3)).
    assert C.nll(logits, np.array([1]), 2.0) == pytest.approx(-math.log(math.sqrt(3) / (1 + math.sqrt(3))))


def test_ece_and_mce_by_hand():
    # Two images at confidence 0.9 (one right, one wrong), two at 0.65 (both right); 15 bins.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.35, 0.65], [0.35, 0.65]])
    labels = np.array([0, 1, 1, 1])
    bins = C.reliability(probs, labels)
    assert bins["count"][13] == 2 and bins["count"][9] == 2 and sum(bins["count"]) == 4
    assert bins["accuracy"][13] == 0.5 and bins["confidence"][13] == pytest.approx(0.9)
    assert bins["accuracy"][9] == 1.0 and bins["accuracy"][0] is None
    ece, mce = C.calibration_errors(probs, labels)
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.35)
    assert mce == pytest.approx(0.4)
    m = C.calibration_metrics(np.log(probs), labels)
    assert m["ece"] == pytest.approx(0.375) and m["accuracy"] == 0.75


def test_fit_temperature_finds_the_analytic_optimum():
    # Every image has logits (2, 0); 70% are class 0. The NLL is lowest where softmax(2/T) = 0.7, that is
    # 2/T = ln(7/3): T = 2.360444.
    logits = np.tile([2.0, 0.0], (1000, 1))
    labels = np.array([0] * 700 + [1] * 300)
    t = C.fit_temperature(logits, labels)
    assert t == pytest.approx(2 / math.log(7 / 3), rel=1e-6)
    after = C.calibration_metrics(logits, labels, t)
    assert after["ece"] == pytest.approx(0.0, abs=1e-6) and after["accuracy"] == 0.7
    assert C.nll(logits, labels, t) < C.nll(logits, labels, 1.0)


def test_temperature_scaling_fits_on_validation_only():
    # Validation logits (2, 0) with 70% class 0 give T = 2 / ln(7/3); the test logits play no part in it.
    val_logits, val_labels = np.tile([2.0, 0.0], (1000, 1)), np.array([0] * 700 + [1] * 300)
    test_logits, test_labels = np.array([[5.0, 0.0], [0.0, 5.0]]), np.array([0, 0])
    cal = C.temperature_scaling(test_logits, test_labels, val_logits, val_labels)
    assert cal["temperature"] == pytest.approx(2 / math.log(7 / 3), rel=1e-6) and cal["val_size"] == 1000
    assert cal["calibrated"] == C.calibration_metrics(test_logits, test_labels, cal["temperature"])
    assert cal["uncalibrated"] == C.calibration_metrics(test_logits, test_labels)
    none = C.temperature_scaling(test_logits, test_labels)
    assert none["temperature"] is None and none["calibrated"] is None and none["val_size"] == 0


def test_summarize_by_hand():
    s = summarize([0.9, 0.92, 0.94])
    assert s == pytest.approx({"mean": 0.92, "std": 0.02, "min": 0.9, "max": 0.94, "n": 3})
    assert summarize([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    with pytest.raises(ValueError):
        summarize([])


# --- corruptions ------------------------------------------------------------------------------------------------


def test_corruption_constants_and_kernels_by_hand():
    images = np.zeros((1, 1, 2, 3), dtype=np.uint8)
    images[0, 0, 0] = (128, 64, 0)  # HSV value 128/255; +0.3 then scales RGB by (128/255 + 0.3) / (128/255)
    out = K.corrupt(images, "brightness", 5)
    assert out[0, 0, 0].tolist() == [204, 102, 0]  # 204.5 and 102.25, truncated as the reference does
    assert out[0, 0, 1].tolist() == [76, 76, 76]  # black has no hue: it becomes grey at value 0.3 (76.5)

    pair = np.array([[[[100, 0, 0], [200, 0, 0]]]], dtype=np.uint8)  # channel means 150, 0, 0
    assert K.corrupt(pair, "contrast", 1)[0, 0, :, 0].tolist() == [112, 187]  # 150 ∓ 50 x 0.75

    # Defocus at severity 5: a radius-1.5 disk is the 3x3 box; the 0.1 anti-alias blur leaves it so.
    assert K.disk_kernel(1.5, 0.1) == pytest.approx(np.full((3, 3), 1 / 9))
    # Severity 1: the disk is one pixel, spread by a 3x3 Gaussian of sigma 0.4 (weights 1, e^-3.125).
    g = np.array([math.exp(-1 / 0.32), 1.0, math.exp(-1 / 0.32)])
    g /= g.sum()
    assert K.disk_kernel(0.3, 0.4) == pytest.approx(np.outer(g, g))
    # Motion blur, radius 6: 13 taps, a one-sided Gaussian along the angle, rounded offsets.
    weights, dx, dy = K.motion_kernel(6, 1.0, np.array([0.0, 90.0, 45.0]))
    assert len(weights) == 13 and weights.sum() == pytest.approx(1.0)
    assert weights[1] / weights[0] == pytest.approx(math.exp(-0.5))
    assert dx[0].tolist() == list(range(13)) and dy[0].tolist() == [0] * 13
    assert dx[1].tolist() == [0] * 13 and dy[1].tolist() == list(range(13))
    assert dx[2, :4].tolist() == [0, 1, 1, 2] and dy[2, :4].tolist() == [0, 1, 1, 2]  # i·cos 45° rounded


def test_noise_corruptions_have_the_published_strength():
    grey = np.full((200, 32, 32, 3), 128, dtype=np.uint8)
    noisy = K.corrupt(grey, "gaussian_noise", 5).astype(float)
    assert noisy.std() == pytest.approx(0.10 * 255, rel=0.03)  # σ = 0.10 of the range
    assert abs(noisy.mean() - 127.5) < 0.5  # zero-mean noise, then truncation (half a level)
    flipped = K.corrupt(grey, "impulse_noise", 5)
    changed = flipped != 128
    assert changed.mean() == pytest.approx(0.07, abs=0.005)  # 7% of values
    assert set(np.unique(flipped[changed]).tolist()) == {0, 255}
    shot = K.corrupt(grey, "shot_noise", 5).astype(float) / 255
    # Poisson(0.502 x 50) / 50 has variance 0.502 / 50.
    assert shot.var() == pytest.approx((128 / 255) / 50, rel=0.05)


def test_corruptions_are_seeded_and_grow_with_severity(cifar):
    images = cifar.test_images[:200]
    for name in K.CORRUPTIONS:
        runs = [K.corrupt(images, name, s, seed=0) for s in K.SEVERITIES]
        for out in runs:
            assert out.dtype == np.uint8 and out.shape == images.shape, name
        again = K.corrupt(images, name, 3, seed=0)
        assert np.array_equal(again, runs[2]), f"{name} is not reproducible"
        distance = [np.abs(out.astype(int) - images).mean() for out in runs]
        assert distance[0] > 0, name
        assert distance[4] > distance[0] * 1.3, (name, distance)
        if name in ("gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog"):
            other = K.corrupt(images, name, 3, seed=1)
            assert not np.array_equal(other, runs[2]), f"{name} ignores its seed"
    with pytest.raises(ValueError, match="unknown corruption"):
        K.corrupt(images, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        K.corrupt(images, "fog", 6)


def test_corruptions_are_pure_numpy_without_torch():
    # Loaded on its own (not through the package, whose root imports torch): no torch, no package imports.
    code = (
        "import importlib.util, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('corruptions', {str(Path(K.__file__))!r})\n"
        "k = importlib.util.module_from_spec(spec); spec.loader.exec_module(k)\n"
        "out = k.corrupt(np.full((2, 8, 8, 3), 128, np.uint8), 'fog', 3)\n"
        "assert out.dtype == np.uint8 and out.shape == (2, 8, 8, 3)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'cifar10_cnn')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- `cifar10 evaluate` on real runs ----------------------------------------------------------------------


def test_evaluate_model_computes_without_writing(trained_run, cifar, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(trained_run, mtimes=True)
    model, _ = load_model(trained_run)
    test = D.to_split(cifar.test_images[:300], cifar.test_labels[:300])
    val = D.to_split(cifar.train_images[:200], cifar.train_labels[:200])
    lines: list[str] = []
    ev = evaluate_model(
        model, test, EvalOptions(corruptions=True, corruption_images=40), val=val, echo=lines.append
    )
    assert snapshot(trained_run, mtimes=True) == before and not list(tmp_path.iterdir()), (
        "evaluate_model wrote a file"
    )
    logits = evaluate_logits(model, test).numpy()
    assert np.array_equal(ev.logits, logits) and ev.labels.tolist() == cifar.test_labels[:300].tolist()
    assert ev.metrics == classification_metrics(logits, ev.labels)
    val_logits = evaluate_logits(model, val).numpy()
    assert ev.calibration["temperature"] == C.fit_temperature(val_logits, val.labels.numpy())
    assert len(ev.errors) == 24 and all(ev.probs[i].argmax() != ev.labels[i] for i in ev.errors)
    assert ev.robustness["images"] == 40 and set(ev.robustness["accuracy"]) == set(K.CORRUPTIONS)
    assert lines[0].startswith("test accuracy ")
    assert C.few_images_warning(200) in lines  # the temperature of 200 validation images is warned about
    assert len(lines) == 3 + len(K.CORRUPTIONS)
    # Grad-CAM of 4 images per group: the true class's map, then the predicted (or runner-up) class's.
    x = ev.explanations
    assert list(x.groups) == ["correct", "confidently_wrong", "least_confident"]
    assert x.groups["confidently_wrong"].tolist() == ev.errors[:4].tolist()
    pred = ev.probs.argmax(1)
    assert all(pred[i] == ev.labels[i] for i in x.groups["correct"])
    idx = np.concatenate(list(x.groups.values()))
    assert np.sort(ev.probs[x.groups["least_confident"]].max(1)).max() <= np.sort(ev.probs.max(1))[3]
    assert x.classes[:, 0].tolist() == ev.labels[idx].tolist() and (x.classes[:, 1] != x.classes[:, 0]).all()
    assert x.maps.shape == (12, 2, 32, 32)
    np.testing.assert_allclose(
        x.maps[:, 1], explain(model, ev.images[idx], target=x.classes[:, 1]), atol=1e-5
    )


def test_training_stores_calibration_and_the_temperature(trained_run):
    results = json.loads((trained_run / "results.json").read_text())
    for key in OLD_KEYS:
        assert key in results, key
    evaluation = json.loads((trained_run / "eval" / "metrics.json").read_text())
    cal = evaluation["calibration"]
    assert cal["val_size"] == 200 and cal["temperature"] > 0
    assert results["temperature"] == cal["temperature"]
    # Stored with the weights for predict and serve, fitted without TTA (this run has none: the same one).
    assert read_metadata(trained_run / "model.safetensors")["temperature"] == pytest.approx(
        cal["temperature"]
    )
    # Temperature scaling fitted on validation lowers the validation NLL; on test it changes no prediction.
    assert cal["calibrated"]["accuracy"] == cal["uncalibrated"]["accuracy"] == results["test_accuracy"]
    assert results["test_ece"] == cal["uncalibrated"]["ece"]
    lo, hi = results["test_accuracy_ci95"]
    assert lo < results["test_accuracy"] < hi and hi - lo < 0.02  # 10,000 test images
    assert sum(sum(row) for row in evaluation["confusion_matrix"]) == 10_000
    assert len(evaluation["confident_errors"]) == 24
    confs = [e["confidence"] for e in evaluation["confident_errors"]]
    assert confs == sorted(confs, reverse=True) and all(
        e["true"] != e["pred"] for e in evaluation["confident_errors"]
    )
    for name in ("eval/reliability.png", "eval/confident_errors.png", "plots/per_class.png"):
        assert (trained_run / name).stat().st_size > 10_000, name
    assert not (trained_run / "eval" / "robustness.json").exists()
    shown = evaluation["explanations"]
    assert shown["method"] == "Grad-CAM" and len(shown["images"]) == 12 and shown["seconds"] < 10
    wrong = [e for e in shown["images"] if e["group"] == "confidently_wrong"]
    assert [e["index"] for e in wrong] == [e["index"] for e in evaluation["confident_errors"][:4]]
    assert all(e["maps"] == [e["true"], e["pred"]] for e in wrong)
    assert (trained_run / "eval" / "explanations.png").stat().st_size > 10_000


def test_evaluate_cli_with_corruptions_and_a_weights_file(trained_run, tmp_path, small_data):
    """Every evaluation here reads the smaller copy of the data (the first 1,000 real test images); the
    first is a real `python -m cifar10_cnn evaluate`, the others run its main() in this process."""
    run = copy_run(trained_run, tmp_path / "run")
    weights_sha = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    data = on(small_data)
    proc = run_cli("evaluate", str(run), "--corruption-images", "100", "--no-progress", *data)
    assert "gaussian_noise" in proc.stdout and "mean corruption accuracy" in proc.stdout
    rob = json.loads((run / "eval" / "robustness.json").read_text())
    assert rob["images"] == 100 and set(rob["accuracy"]) == set(K.CORRUPTIONS)
    assert all(len(v) == 5 and all(0 <= a <= 1 for a in v) for v in rob["accuracy"].values())
    assert rob["mean_corruption_accuracy"] == pytest.approx(np.mean(list(rob["accuracy"].values())))
    assert "regenerated approximation, not the official CIFAR-10-C files" in rob["note"]
    results = json.loads((run / "results.json").read_text())
    assert results["mean_corruption_accuracy"] == rob["mean_corruption_accuracy"]
    assert (run / "eval" / "corruptions.png").stat().st_size > 10_000
    report = (run / "report.md").read_text()
    assert "regenerated approximation, not the official CIFAR-10-C files" in report
    assert "](eval/corruptions.png)" in report and "| mean over corruptions |" in report.replace("**", "")

    # A plain re-evaluation keeps the robustness results of the same weights, and reproduces the figures.
    assert in_process("evaluate", str(run), "--no-progress", *data).returncode == 0
    again = json.loads((run / "results.json").read_text())
    assert again["mean_corruption_accuracy"] == rob["mean_corruption_accuracy"]
    assert again["test_accuracy"] == results["test_accuracy"]
    assert again["temperature"] == pytest.approx(results["temperature"])

    # A weights file works too: results, plots and report in <name>-eval/ beside it (or --out).
    weights = tmp_path / "weights" / "model.safetensors"
    weights.parent.mkdir()
    shutil.copy(run / "model.safetensors", weights)
    assert in_process("evaluate", str(weights), "--no-progress", *data).returncode == 0
    # Selective TTA: the headline line comes first and says on how many images TTA ran (the mix: test_fast.py).
    proc = in_process("evaluate", str(weights), "--no-progress", "--tta", "2", "--tta-margin", "0.5",
                      "--out", str(tmp_path / "selective"), *data)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    selective = json.loads((tmp_path / "selective" / "results.json").read_text())
    assert selective["tta"] == 2 and selective["tta_margin"] == 0.5 and 0 < selective["tta_share"] <= 1
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"test accuracy {selective['test_accuracy']:.2%} on 1,000 images")
    assert f"TTA level 2 on {selective['tta_share']:.0%} of the images" in first
    # Evaluation writes under eval/, plots/, results.json and the report: the weights stay byte for byte.
    assert hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest() == weights_sha
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == weights_sha
    out = tmp_path / "weights" / "model-eval"
    res = json.loads((out / "results.json").read_text())
    assert res["test_accuracy"] == results["test_accuracy"] and res["model"] == "seed_cnn"
    # The weights' metadata carries the run's config, so the same validation split gives the same T.
    assert res["temperature"] == pytest.approx(results["temperature"])
    assert (out / "report.html").is_file() and (out / "eval" / "reliability.png").is_file()


def test_a_run_without_validation_fits_no_temperature(cifar, tmp_path):
    from cifar10_cnn.config import recipe_config
    from cifar10_cnn.pipeline import train

    run = train(
        recipe_config("seed", epochs=1, subset=500, val_size=0),
        data=cifar,
        out=tmp_path / "noval",
        progress=False,
        echo=lambda *_: None,
    )
    results = json.loads((run / "results.json").read_text())
    assert results["temperature"] is None and results["test_ece_calibrated"] is None
    assert "temperature" not in read_metadata(run / "model.safetensors")
    note = json.loads((run / "eval" / "metrics.json").read_text())["calibration"]["note"]
    assert "no validation split" in note and "no temperature" in note
    assert "no temperature was fitted" in (run / "report.md").read_text()


EVALUATE_WITHOUT_CAPTUM = """
import sys
sys.modules["captum"] = None  # as if Captum were not installed: importing it raises ImportError
from cifar10_cnn import data as D
from cifar10_cnn.pipeline import evaluate_and_report as evaluate_into_run
data = D.load_cifar10(sys.argv[2], progress=False)
evaluate_into_run(sys.argv[1], D.to_split(data.test_images[:300], data.test_labels[:300]))
"""


def test_evaluation_without_captum_says_how_to_get_the_heatmaps(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    assert (run / "eval" / "explanations.png").is_file()  # from training's evaluation, with Captum
    proc = subprocess.run(
        [sys.executable, "-c", EVALUATE_WITHOUT_CAPTUM, str(run), str(DATA_DIR)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "test accuracy" in proc.stdout
    note = "explanations need Captum: python -m pip install -e '.[explain]'"
    assert json.loads((run / "eval" / "metrics.json").read_text())["explanations"] == {"note": note}
    assert not (run / "eval" / "explanations.png").exists(), "a figure of the previous evaluation is left"
    md = (run / "report.md").read_text()
    section = md.split("## Where the model looks\n\n")[1].split("\n## ")[0]
    assert section.strip() == f"Not computed: {note}."
    assert "explanations.png" not in md and (run / "eval" / "reliability.png").is_file()


# --- errors: one line each, nothing written ------------------------------------------------------------------


def test_evaluate_errors_are_one_line_and_write_nothing(trained_run, tmp_path, cache_dir):
    empty = tmp_path / "unfinished"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    before = snapshot(empty, mtimes=True)
    line = error_line(run_cli("evaluate", str(empty), check=False))
    assert "no finished model" in line and "--resume" in line
    assert snapshot(empty, mtimes=True) == before and list(before) == ["config.json"]

    # A weights file for an architecture this version does not know.
    tensors = load_file(str(trained_run / "model.safetensors"))
    alien = tmp_path / "alien.safetensors"
    save_file(
        tensors,
        str(alien),
        metadata={"architecture": "transformer9000", "classes": json.dumps(list(D.CLASSES))},
    )
    line = error_line(in_process("evaluate", str(alien)))
    assert "transformer9000" in line and "seed_cnn" in line
    assert not (tmp_path / "alien-eval").exists()

    # Data that fails verification (a doctored copy): refused before anything is written.
    run = copy_run(trained_run, tmp_path / "run")
    before = snapshot(run, mtimes=True)
    bad = tmp_path / "bad-data"
    bad.mkdir()
    images, labels = np.zeros((20, 32, 32, 3), np.uint8), np.arange(20) % 10
    np.savez(bad / "train.npz", images=images, labels=labels)
    np.savez(bad / "test.npz", images=images, labels=labels)
    line = error_line(in_process("evaluate", str(run), "--data-dir", str(bad)))
    assert "not the real CIFAR-10" in line and "--allow-unverified" in line
    assert snapshot(run, mtimes=True) == before

    line = error_line(in_process("evaluate", str(run), "--out", str(tmp_path / "x")))
    assert "--out is for a weights file" in line
    assert snapshot(run, mtimes=True) == before
    line = error_line(in_process("evaluate", str(run), "--tta", "2", "--tta-margin", "1.5"))
    assert "--tta-margin must be between 0 and 1" in line
    assert snapshot(run, mtimes=True) == before


def test_evaluate_takes_trains_tta_options_declared_once_and_checked_once():
    import argparse

    from cifar10_cnn.cli import build_parser
    from cifar10_cnn.config import TrainConfig
    from cifar10_cnn.errors import UserError

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    def tta_options(verb: str) -> dict:
        return {
            a.dest: (a.option_strings, a.help, a.choices, a.const)
            for a in verbs[verb]._actions
            if a.dest in ("tta", "tta_margin")
        }

    assert tta_options("evaluate") == tta_options("train") and len(tta_options("train")) == 2
    # evaluate's defaults are TrainConfig's (train's are None: "not given", the recipe decides).
    args = parser.parse_args(["evaluate", "run"])
    assert (args.tta, args.tta_margin) == (TrainConfig().tta, TrainConfig().tta_margin) == (0, 1.0)
    assert parser.parse_args(["evaluate", "run", "--tta"]).tta == 1
    for bad, message in (
        (dict(tta=3), "--tta must be 0, 1 or 2"),
        (dict(tta=2, tta_margin=-0.1), "--tta-margin must be between 0 and 1"),
        (dict(corruptions=True, corruption_images=0), "--corruption-images must be at least 1"),
    ):
        with pytest.raises(UserError, match=message):
            EvalOptions(**bad)
    with pytest.raises(UserError, match="--tta must be 0, 1 or 2"):
        TrainConfig(tta=3)


def test_evaluation_writes_no_report_the_pipeline_renders_it_after(trained_run, tmp_path, cifar):
    from cifar10_cnn.eval_job import evaluate_into_run
    from cifar10_cnn.pipeline import evaluate_and_report

    run = copy_run(trained_run, tmp_path / "run")
    for name in ("report.md", "report.html"):
        (run / name).unlink()
    test = D.to_split(cifar.test_images[:200], cifar.test_labels[:200])
    evaluate_into_run(run, test, echo=lambda *_: None)
    assert json.loads((run / "eval" / "metrics.json").read_text())["test_size"] == 200
    assert not (run / "report.md").exists() and not (run / "report.html").exists()
    evaluate_and_report(run, test, echo=lambda *_: None)
    assert "| Test accuracy |" in (run / "report.md").read_text() and (run / "report.html").is_file()


# --- one temperature, and the calibration of what is served ----------------------------------------------------


def test_served_figures_are_those_of_what_predict_returns(trained_run, cifar):
    """The stored temperature is the only one; `served` measures predict's own probabilities (one view)."""
    from cifar10_cnn.predict import load_predictor
    from cifar10_cnn.weights import read_temperature

    predictor = load_predictor(trained_run)
    t = predictor.meta.temperature
    results = json.loads((trained_run / "results.json").read_text())
    served = results["served"]
    assert served["temperature"] == t == results["temperature"] and served["temperature_stored"]
    labels = cifar.test_labels
    logits = predictor.logits(cifar.test_images)  # Predictor.probabilities is softmax(these / t): see below
    for key, temperature in (("ece_calibrated", t), ("ece_raw", 1.0)):
        ece = C.calibration_errors(C.softmax(logits, temperature), labels)[0]
        assert served[key] == pytest.approx(ece, abs=1e-6), key
    assert served["accuracy"] == results["test_accuracy"]  # this run has no TTA: the evaluation is served

    # With TTA the evaluation's logits are not what is served; the temperature stays the stored one.
    model, _ = load_model(trained_run)
    test = D.to_split(cifar.test_images[:300], labels[:300])
    stored = read_temperature(trained_run / "model.safetensors")
    ev = evaluate_model(model, test, EvalOptions(tta=2), temperature=stored, echo=lambda _: None)
    np.testing.assert_allclose(ev.served_probs, predictor.probabilities(cifar.test_images[:300]), atol=1e-6)
    assert not np.allclose(ev.probs, C.softmax(ev.served_logits), atol=1e-4)
    assert ev.calibration["temperature"] == ev.served["temperature"] == stored == t
    assert ev.calibration["calibrated"] == C.calibration_metrics(ev.logits, labels[:300], t)


def test_bad_config_in_a_weights_files_metadata_is_one_line_and_writes_nothing(trained_run, tmp_path, capsys):
    from cifar10_cnn import cli

    raw = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in read_metadata(trained_run / "model.safetensors").items()
    }
    tensors = load_file(str(trained_run / "model.safetensors"))
    cases = {"epochs": "ten", "lr": [0.1, 0.2], "split_seed": -1}
    for key, value in cases.items():
        bad = tmp_path / f"bad-{key}.safetensors"
        config = {**json.loads(raw["config"]), key: value}
        save_file(tensors, str(bad), metadata={**raw, "config": json.dumps(config)})
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    before = snapshot(tmp_path, mtimes=True)
    for key, value in cases.items():
        bad = tmp_path / f"bad-{key}.safetensors"
        assert cli.main(["evaluate", str(bad), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: {bad}: metadata 'config' is not a valid training config (")
            and err.count("\n") == 1
        ), err
        assert key.replace("_", "-") in err or repr(value) in err, err
    assert cli.main(["evaluate", str(trained_run / "model.safetensors"), "--out", str(afile / "x")]) == 2
    assert f"{afile} is a file, not a folder" in capsys.readouterr().err
    assert snapshot(tmp_path, mtimes=True) == before


def test_weights_without_a_temperature_are_served_at_one_and_none_is_fitted_at_tta(trained_run, cifar):
    model, _ = load_model(trained_run)
    test = D.to_split(cifar.test_images[:200], cifar.test_labels[:200])
    val = D.to_split(cifar.train_images[:200], cifar.train_labels[:200])
    quiet = lambda _: None  # noqa: E731
    ev = evaluate_model(model, test, val=val, temperature=None, echo=quiet)
    assert ev.calibration["temperature"] is None and "weights hold no temperature" in ev.calibration["note"]
    assert ev.served_temperature == 1.0 and ev.served["calibrated"] is None
    np.testing.assert_array_equal(ev.served_probs, C.softmax(ev.logits))  # no TTA: the same view
    # A model not saved yet: the temperature is fitted as training fits it, on single views, whatever the TTA.
    ev = evaluate_model(model, test, EvalOptions(tta=1), val=val, echo=quiet)
    single = C.fit_temperature(evaluate_logits(model, val).numpy(), val.labels.numpy())
    assert ev.calibration["temperature"] == ev.served["temperature"] == single


def test_evaluate_out_is_a_new_or_empty_folder_or_one_of_ours(trained_run, tmp_path, capsys):
    from cifar10_cnn import cli
    from cifar10_cnn.runs import MARKER, claim_dir

    mine = tmp_path / "mine"  # a user's folder: an evaluation must not add results.json, eval/, plots/ there
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = snapshot(tmp_path, mtimes=True)
    assert cli.main(["evaluate", str(trained_run / "model.safetensors"), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"--out {mine} is a folder that is not empty (notes.txt)" in err and err.count("\n") == 1, err
    assert snapshot(tmp_path, mtimes=True) == before
    # An empty folder, or one an evaluation made (marked), is ours to write into again.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_dir(empty).is_ours and [p.name for p in empty.iterdir()] == [MARKER]
    (empty / "results.json").write_text("{}")
    assert claim_dir(empty).is_ours
