"""Plots and the run report, on a real CIFAR-10 test subset and a run directory built on disk."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from cifar10_cnn import data, plots
from cifar10_cnn.metrics import accuracy_interval
from cifar10_cnn.report import write_report
from cifar10_cnn.runs import TMP_PATTERN

from .conftest import DATA_DIR, loaded_by

CLASSES = list(data.CLASSES)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_IMAGES = 64
PLOT_NAMES = ["curves", "confusion", "per_class", "predictions", "augmentations"]


@pytest.fixture(scope="module")
def subset() -> tuple[np.ndarray, np.ndarray]:
    path = DATA_DIR / "test.npz"
    if not path.exists():
        pytest.skip(f"CIFAR-10 test arrays not found at {path}; set CIFAR10_DATA to their directory")
    with np.load(path) as data:
        images, labels = data["images"][:N_IMAGES], data["labels"][:N_IMAGES]
    assert images.shape == (N_IMAGES, 32, 32, 3) and images.dtype == np.uint8
    return images, labels.astype(np.int64)


def _perturb(labels: np.ndarray) -> np.ndarray:
    """Deterministic 'predictions': every 7th label shifted by 3 classes, the rest right."""
    pred = labels.copy()
    wrong = np.arange(len(labels)) % 7 == 0
    pred[wrong] = (labels[wrong] + 3) % 10
    return pred


def _confusion(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    return cm


def _metrics_rows(epochs: int, with_val: bool = True) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        rows.append(
            {
                "epoch": e,
                "train_loss": 2.0 / e,
                "train_acc": 1 - 0.6 / e,
                "val_loss": 2.2 / e if with_val else "",
                "val_acc": 0.8 - 0.4 / e if with_val else "",
                "lr": 0.1 / e,
                "seconds": 3.5,
            }
        )
    return rows


def assert_png(path: Path, min_side: int = 200) -> np.ndarray:
    """A real, non-blank PNG of plausible size; returns its pixels (floats in [0, 1])."""
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4), pixels.shape
    assert min(pixels.shape[:2]) >= min_side and max(pixels.shape[:2]) <= 6000, pixels.shape
    assert pixels[..., :3].std() > 0.01, f"{path} looks blank"
    return pixels


def count_color(path: Path, color: str, tol: float = 0.12) -> int:
    """Pixels within tol of color in every channel."""
    rgb = mpimg.imread(path)[..., :3]
    return int((np.abs(rgb - np.array(to_rgb(color))).max(axis=-1) < tol).sum())


# ----------------------------------------------------------------------------- plots


def test_plot_curves_with_validation(tmp_path: Path) -> None:
    out = plots.plot_curves(_metrics_rows(5), tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    pixels = assert_png(out)
    assert pixels.shape[1] > pixels.shape[0], "two panels side by side should give a wide figure"
    # The best-epoch marker is drawn in its own colour: it must be in the image.
    assert count_color(out, plots.BEST_COLOR, tol=0.05) > 20


def test_plot_curves_one_epoch_without_validation_from_csv_strings(tmp_path: Path) -> None:
    # Rows as csv.DictReader gives them: all strings, empty validation columns.
    rows = [
        {
            "epoch": "1",
            "train_loss": "2.1",
            "train_acc": "0.31",
            "val_loss": "",
            "val_acc": "",
            "lr": "0.1",
            "seconds": "4.2",
        }
    ]
    out = plots.plot_curves(rows, tmp_path / "sub" / "curves.png")
    assert_png(out)
    assert count_color(out, plots.TRAIN_COLOR, tol=0.05) > 20, "single epoch must still show a marker"
    assert count_color(out, plots.BEST_COLOR, tol=0.05) == 0, "no validation means no best-epoch mark"


def test_plot_curves_rejects_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        plots.plot_curves([], tmp_path / "curves.png")


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion(subset: tuple[np.ndarray, np.ndarray], tmp_path: Path, normalize: bool) -> None:
    _, labels = subset
    cm = _confusion(labels, _perturb(labels))
    out = plots.plot_confusion(cm, CLASSES, tmp_path / f"confusion_{normalize}.png", normalize=normalize)
    pixels = assert_png(out, min_side=500)
    assert abs(pixels.shape[0] - pixels.shape[1]) < 0.3 * pixels.shape[0], "heatmap should be near square"


def test_plot_confusion_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="10x10"):
        plots.plot_confusion(np.zeros((9, 9)), CLASSES, tmp_path / "cm.png")


def test_plot_per_class(subset: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    _, labels = subset
    cm = _confusion(labels, _perturb(labels))
    acc = {c: float(cm[i, i] / max(cm[i].sum(), 1)) for i, c in enumerate(CLASSES)}
    out = plots.plot_per_class(acc, tmp_path / "per_class.png")
    assert_png(out)
    assert count_color(out, plots.BAR_COLOR, tol=0.05) > 5000, "bars missing"
    assert count_color(out, plots.MEAN_COLOR, tol=0.05) > 50, "mean line missing"
    with pytest.raises(ValueError, match="fractions"):
        plots.plot_per_class({c: 85.0 for c in CLASSES}, tmp_path / "bad.png")


def test_plots_of_100_classes_stay_readable_and_show_recall_only(tmp_path: Path) -> None:
    """Above 20 classes (CIFAR-100): the heatmap's cells lose their numbers and shrink to fit every label, and
    the per-class plot draws recall alone in thin bars; at 10 classes precision is drawn."""
    from cifar10_cnn.plots.style import PRECISION_COLOR

    rng = np.random.default_rng(0)
    names = [f"class_{k:02d}" for k in range(100)]
    true = np.repeat(np.arange(100), 20)
    pred = np.where(rng.random(len(true)) < 0.6, true, rng.integers(0, 100, len(true)))
    cm = np.zeros((100, 100), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    pixels = assert_png(plots.plot_confusion(cm, names, tmp_path / "confusion.png"), min_side=1000)
    assert abs(pixels.shape[0] - pixels.shape[1]) < 0.3 * pixels.shape[0], "heatmap should be near square"
    acc = {c: float(cm[i, i] / cm[i].sum()) for i, c in enumerate(names)}
    scores = {c: 0.5 for c in names}
    many = plots.plot_per_class(acc, tmp_path / "many.png", precision=scores, f1=scores)
    assert assert_png(many).shape[0] < 6000 and count_color(many, plots.BAR_COLOR, tol=0.05) > 5000
    assert count_color(many, PRECISION_COLOR, tol=0.03) == 0, "precision bars drawn for 100 classes"
    few = {c: acc[c] for c in names[:10]}
    ten = plots.plot_per_class(few, tmp_path / "ten.png", precision={c: 0.5 for c in few})
    assert count_color(ten, PRECISION_COLOR, tol=0.03) > 1000


def test_plot_predictions_colours_right_and_wrong(
    subset: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = subset
    images, labels = images[:16], labels[:16]
    mixed = _perturb(labels)
    assert 0 < (mixed != labels).sum() < len(labels)
    probs = np.linspace(0.35, 0.99, len(labels))
    # Same images in all three: differences in green/red pixels come from the titles alone.
    right = plots.plot_predictions(images, labels, labels, CLASSES, tmp_path / "right.png", probs=probs)
    both = plots.plot_predictions(images, labels, mixed, CLASSES, tmp_path / "mixed.png", probs=probs)
    wrong = plots.plot_predictions(images, labels, (labels + 1) % 10, CLASSES, tmp_path / "wrong.png")
    for path in (right, both, wrong):
        assert_png(path)
    green = {p.stem: count_color(p, plots.CORRECT_COLOR) for p in (right, both, wrong)}
    red = {p.stem: count_color(p, plots.WRONG_COLOR) for p in (right, both, wrong)}
    assert green["mixed"] > green["wrong"] + 300, green
    assert red["mixed"] > red["right"] + 300, red
    assert green["right"] > green["mixed"] and red["wrong"] > red["mixed"], (green, red)


def test_plot_predictions_accepts_probability_rows(
    subset: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = subset
    probs = np.full((len(labels), 10), 0.05)
    probs[np.arange(len(labels)), labels] = 0.55
    out = plots.plot_predictions(
        images[:10], labels[:10], labels[:10], CLASSES, tmp_path / "p.png", probs=probs[:10], ncols=5
    )
    pixels = assert_png(out)
    assert pixels.shape[1] > pixels.shape[0], "10 images in 5 columns is two rows: wider than tall"


def test_plot_predictions_rejects_nchw(subset: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images, labels = subset
    with pytest.raises(ValueError, match="NHWC"):
        plots.plot_predictions(
            images[:4].transpose(0, 3, 1, 2), labels[:4], labels[:4], CLASSES, tmp_path / "p.png"
        )


def test_plot_image_grid(subset: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images, labels = subset
    out = plots.plot_image_grid(
        images[:24],
        labels[:24],
        CLASSES,
        tmp_path / "grid.png",
        title="Training images after augmentation",
        ncols=8,
    )
    pixels = assert_png(out)
    assert pixels.shape[1] > pixels.shape[0], "3 rows of 8 should be wider than tall"


# ----------------------------------------------------------------------------- report


@pytest.fixture
def run_dir(subset: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> Path:
    """A finished run as train + evaluate would leave it, with plots drawn by plots.py."""
    images, labels = subset
    pred = _perturb(labels)
    cm = _confusion(labels, pred)
    run = tmp_path / "runs" / "seed_cnn-test"
    (run / "plots").mkdir(parents=True)
    config = {
        "recipe": "seed",
        "model": "seed_cnn",
        "epochs": 3,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "nesterov": True,
        "schedule": "onecycle",
        "warmup_epochs": 1,
        "label_smoothing": 0.1,
        "seed": 0,
        "val_size": 5000,
        "subset": None,
        "augment": "crop+flip",
        "device": "cpu",
        "notes": "<script>alert('x')</script> & co | piped",
    }
    (run / "config.json").write_text(json.dumps(config, indent=2))
    rows = _metrics_rows(3)
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    results = {
        "test_accuracy": float(np.trace(cm) / cm.sum()),
        "test_loss": 0.5123,
        "per_class_accuracy": {c: float(cm[i, i] / max(cm[i].sum(), 1)) for i, c in enumerate(CLASSES)},
        "confusion_matrix": cm.tolist(),
        "epochs_run": 3,
        "train_seconds": 125.0,
        "eval_seconds": 1.5,
        "best_val_accuracy": 0.6667,
        "best_epoch": 3,
        "model": "seed_cnn",
        "params": 1_234_567,
        "device": "cpu",
        "train_size": 45000,
        "val_size": 5000,
        "test_size": int(cm.sum()),
        "tta": False,
        "stopped_early": False,
        "class_names": CLASSES,
        "data": {"source": "npz:/data/cifar10", "verified": True, "sha256": {"test.npz": "f0af87a8"}},
        "weights": "best",
        "created": "2025-11-25T10:00:00+00:00",
    }
    (run / "results.json").write_text(json.dumps(results, indent=2))
    plots.plot_curves(rows, run / "plots" / "curves.png")
    plots.plot_confusion(cm, CLASSES, run / "plots" / "confusion.png")
    plots.plot_per_class(results["per_class_accuracy"], run / "plots" / "per_class.png")
    plots.plot_predictions(images[:16], labels[:16], pred[:16], CLASSES, run / "plots" / "predictions.png")
    plots.plot_image_grid(images[:16], labels[:16], CLASSES, run / "plots" / "augmentations.png", title="aug")
    return run


def test_write_report(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    headline = f"{results['test_accuracy'] * 100:.2f}%"
    assert headline != "100.00%", "the fixture should have some wrong predictions"

    md_path, html_path = write_report(run_dir)
    assert (md_path, html_path) == (run_dir / "report.md", run_dir / "report.html")

    md = md_path.read_text()
    assert run_dir.name in md.splitlines()[0]
    assert headline in md
    for name in PLOT_NAMES:
        assert f"](plots/{name}.png)" in md, name
    for c in CLASSES:
        assert re.search(rf"^\| {c} \| \d+\.\d\d% \|", md, re.M), f"per-class row for {c}"
    assert "only for this final evaluation" in md and "validation split" in md
    # No stored interval in this results.json: the report computes the Wilson interval it names.
    lo, hi = accuracy_interval(int(np.trace(np.array(results["confusion_matrix"]))), results["test_size"])
    assert f"| 95% interval (Wilson) | {lo * 100:.2f}% to {hi * 100:.2f}% |" in md
    assert "crop+flip" in md and "onecycle" in md  # config table
    assert "| 3 (best) |" in md.replace("**", "")  # metrics table marks the best epoch
    assert "\\| piped" in md, "pipes in values must be escaped in Markdown tables"

    page = html_path.read_text()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert f'class="value">{headline}<' in page, "headline accuracy in the summary card"
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(PLOT_NAMES)
    embedded = {base64.b64decode(b) for b in images}
    assert embedded == {(run_dir / "plots" / f"{n}.png").read_bytes() for n in PLOT_NAMES}
    assert 'src="plots/' not in page
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', page, re.I), "external resource"
    assert "<link" not in page.lower() and "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page, "config text must be escaped"


def test_write_report_tolerates_missing_pieces(tmp_path: Path) -> None:
    run = tmp_path / "bare-run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"test_accuracy": 0.1234, "best_val_accuracy": None}))
    with (run / "metrics.csv").open("w", newline="") as f:
        f.write("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n1,2.3,0.1,,,0.1,5.0\n")
    # A heatmap figure that no evaluation record vouches for (e.g. left by other weights) is not shown.
    (run / "eval").mkdir()
    mpimg.imsave(run / "eval" / "explanations.png", np.full((8, 8, 3), 0.5))
    md_path, html_path = write_report(run)
    md, page = md_path.read_text(), html_path.read_text()
    assert "12.34%" in md and "12.34%" in page
    assert "## Where the model looks\n\nNot computed: `cifar10 evaluate RUN` adds it" in md
    assert "n/a" in md and "n/a" in page
    assert "config.json not found" in md
    assert "data:image/png;base64," not in page, "no plots on disk, so none embedded"


def test_write_report_rejects_non_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_plot_image_grid_float_images_on_0_255_scale(
    subset: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = subset
    a = plots.plot_image_grid(images[:8], labels[:8], CLASSES, tmp_path / "u8.png", title="t")
    b = plots.plot_image_grid(
        images[:8].astype(np.float32), labels[:8], CLASSES, tmp_path / "f32.png", title="t"
    )
    assert np.array_equal(mpimg.imread(a), mpimg.imread(b)), (
        "float 0-255 images must look like their uint8 form"
    )


# A figure drawn under a file-size limit: the write of its PNG is cut off in the middle, by an EFBIG error
# (Python ignores SIGXFSZ) or, with the signal's default action restored, by SIGXFSZ killing the process.
CUT_OFF_WRITE = """
import signal, sys
import numpy as np
from cifar10_cnn import plots
if sys.argv[2] == "killed":
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
noise = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)  # a PNG far above the limit
plots.plot_image_grid(noise, np.zeros(32, int), [str(i) for i in range(10)], sys.argv[1], title="noise")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
@pytest.mark.parametrize("on_limit", ["killed", "error"])
def test_a_cut_off_figure_write_leaves_the_old_png_whole(
    subset: tuple[np.ndarray, np.ndarray], tmp_path: Path, on_limit: str
) -> None:
    images, labels = subset
    out = plots.plot_image_grid(images[:8], labels[:8], CLASSES, tmp_path / "grid.png", title="before")
    before = out.read_bytes()
    limit = 64 * 1024

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-c", CUT_OFF_WRITE, str(out), on_limit],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"},
    )
    others = sorted(p.name for p in tmp_path.iterdir() if p != out)
    if on_limit == "killed":
        assert proc.returncode == -signal.SIGXFSZ, proc.stderr
        # Killed mid-write: only a temporary of ours is partial (runs.TMP_PATTERN, cleared on the next train).
        assert len(others) == 1 and TMP_PATTERN.match(others[0]), others
        assert (tmp_path / others[0]).stat().st_size == limit, "the write was not cut off"
    else:
        assert proc.returncode == 1 and "File too large" in proc.stderr, proc.stderr
        assert others == [], "the failed write's temporary file was left behind"
    assert out.read_bytes() == before, "the figure is partial"


def test_one_runs_report_loads_no_matplotlib(run_dir: Path) -> None:
    # Only a comparison draws figures; rebuilding one run's report embeds the PNGs already on disk.
    code = f"from cifar10_cnn.report import write_report\nwrite_report({str(run_dir)!r})\n"
    assert loaded_by(code, ("matplotlib", "cifar10_cnn.plots")) == []
    assert (run_dir / "report.html").is_file()
