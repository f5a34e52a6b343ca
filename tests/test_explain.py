"""Explanations: every architecture, sanity checks (Adebayo et al., 2018) on a trained model, the CLI.

The sanity checks train airbench_small for 2 epochs on 2,000 real CIFAR-10 images (about 55% test accuracy,
20-30 s on 2 busy cores): enough for class evidence to be somewhere, which is what the checks measure.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from torch import nn

from cifar10_cnn import cli
from cifar10_cnn import explain as explain_module
from cifar10_cnn.config import recipe_config
from cifar10_cnn.data import MEAN, make_splits
from cifar10_cnn.errors import UserError
from cifar10_cnn.explain import explain, gradcam_layer, overlay, png_bytes, resolve_class
from cifar10_cnn.inference import predict_logits
from cifar10_cnn.models import create_model, list_models
from cifar10_cnn.train import fit
from cifar10_cnn.weights import save_weights
from tests.conftest import run_cli


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this file runs: on 2 cores shared with other work, 2 threads stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(cifar, tmp_path_factory) -> nn.Module:
    """airbench_small, quick recipe, 2 epochs on the first 2,000 training images."""
    cfg = recipe_config("quick", epochs=2, subset=2000, val_size=0, batch_size=200, tta=0)
    splits = make_splits(cifar, val_size=0, split_seed=0, subset=2000)
    result = fit(cfg, splits, tmp_path_factory.mktemp("explain-fit"), progress=False, echo=lambda _: None)
    return result.model.eval()


@pytest.fixture(scope="module")
def weights(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("explain-weights") / "quick-small.safetensors"
    save_weights(trained, path, architecture="airbench_small")
    return path


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman correlation of paired maps; a constant map (no evidence) agrees only with itself."""

    def one(x: np.ndarray, y: np.ndarray) -> float:
        if np.array_equal(x, y):
            return 1.0
        return 0.0 if x.min() == x.max() or y.min() == y.max() else spearmanr(x.ravel(), y.ravel()).statistic

    return float(np.mean([one(x, y) for x, y in zip(a, b, strict=True)]))


# --- every architecture ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_gives_finite_maps_from_its_last_conv_stage(arch, cifar, monkeypatch):
    monkeypatch.setattr(explain_module, "IG_STEPS", 4)  # the shape and range checks need no fine integral
    torch.manual_seed(0)
    model = create_model(arch).eval()
    images = cifar.test_images[:2]
    name, _ = gradcam_layer(model)
    last_conv = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    assert last_conv.startswith(f"{name}.") or last_conv == name, (name, last_conv)
    for method, n in (("gradcam", 2), ("ig", 1)):
        maps = explain(model, images[:n], method=method)
        assert maps.shape == (n, 32, 32) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
        peaks = maps.reshape(n, -1).max(1)  # each map scaled to a peak of 1, or empty: no positive evidence
        assert np.all((peaks == 1) | (peaks == 0)) and (method == "gradcam" or peaks.min() == 1)
    predicted = predict_logits(model, torch.from_numpy(images).permute(0, 3, 1, 2)).argmax(1).numpy()
    maps = explain(model, images)
    np.testing.assert_array_equal(maps, explain(model, images, target=predicted))
    model.train()  # explained in eval mode (batch-norm running statistics), then left in training mode
    np.testing.assert_array_equal(maps, explain(model, images))
    assert model.training


def test_bad_targets_and_methods_are_user_errors(cifar):
    model = create_model("seed_cnn")
    with pytest.raises(UserError, match=r"not in 0\.\.9"):
        explain(model, cifar.test_images[:1], target=10)
    with pytest.raises(UserError, match="unknown explanation method"):
        explain(model, cifar.test_images[:1], method="lime")
    assert resolve_class("Cat", ["airplane", "cat"]) == 1 and resolve_class("0", ["airplane", "cat"]) == 0
    with pytest.raises(UserError, match="unknown class 'kat'; use one of: airplane, cat"):
        resolve_class("kat", ["airplane", "cat"])


# --- sanity checks (Adebayo et al., 2018) ------------------------------------------------------------------


def test_cascading_randomisation_changes_the_maps(trained, cifar):
    images, labels = cifar.test_images[:64], cifar.test_labels[:64]
    maps = explain(trained, images, target=labels)
    rerun = rank_correlation(maps, explain(trained, images, target=labels))
    mirrored = rank_correlation(maps, explain(trained, images[:, :, ::-1], target=labels)[:, :, ::-1])
    model = copy.deepcopy(trained)
    top_down = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)][::-1][:4]
    torch.manual_seed(1)
    cascade = []
    for layer in top_down:  # re-initialise from the head down, one more layer each step
        layer.reset_parameters()
        cascade.append(rank_correlation(maps, explain(model, images, target=labels)))
    print(
        f"\nrank correlation with the trained model's maps: re-run {rerun:.3f}, "
        f"mirrored input {mirrored:.3f}, "
        f"top 1..4 layers re-initialised {np.round(cascade, 3)}"
    )
    assert rerun > 0.99  # the maps are deterministic
    assert max(cascade) < 0.35  # measured 0.18-0.21; below even the maps of a mirrored input (0.50):
    assert max(cascade) < mirrored - 0.1


def composites(cifar, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n real test images of class c downscaled to 16x16, each in a random quadrant of a mean-grey canvas;
    the same canvases with a 16x16 image of another class in the opposite quadrant; c; the quadrants."""
    images, labels = cifar.test_images[1000 : 1000 + n], cifar.test_labels[1000 : 1000 + n]
    small = nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=16, mode="area"
    )
    small = small.round().byte().permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(seed)
    quadrant = rng.integers(0, 4, n)
    other = np.array([rng.choice(np.flatnonzero(labels != c)) for c in labels])
    one = np.empty((n, 32, 32, 3), np.uint8)
    one[:] = np.round(np.array(MEAN) * 255).astype(np.uint8)
    two = one.copy()
    for i, q in enumerate(quadrant):
        y, x = 16 * (q // 2), 16 * (q % 2)
        one[i, y : y + 16, x : x + 16] = two[i, y : y + 16, x : x + 16] = small[i]
        y, x = 16 * ((3 - q) // 2), 16 * ((3 - q) % 2)
        two[i, y : y + 16, x : x + 16] = small[other[i]]
    return one, two, labels, quadrant


def quadrant_mass(maps: np.ndarray) -> np.ndarray:
    """(N, 4) map mass in the quadrants top-left, top-right, bottom-left, bottom-right."""
    return maps.reshape(len(maps), 2, 16, 2, 16).sum((2, 4)).reshape(len(maps), 4)


def test_gradcam_points_at_the_pasted_image_of_its_class(trained, cifar):
    one, two, labels, quadrant = composites(cifar, 100)
    rows = np.arange(len(labels))
    mass = quadrant_mass(explain(trained, one, target=labels))
    share = mass[rows, quadrant] / np.maximum(mass.sum(1), 1e-12)
    pointing = float((mass.argmax(1) == quadrant).mean())
    mass2 = quadrant_mass(explain(trained, two, target=labels))
    own_over_other = float((mass2[rows, quadrant] > mass2[rows, 3 - quadrant]).mean())
    print(
        f"\npointing: peak quadrant hits {pointing:.0%} (chance 25%), "
        f"mean mass in the quadrant {share.mean():.0%}, "
        f"mass over 25% in {(share > 0.25).mean():.0%}; with another class opposite, "
        f"more mass on the class's own image in {own_over_other:.0%} (chance 50%)"
    )
    assert pointing >= 0.45 and share.mean() > 0.3
    assert own_over_other >= 0.65


# --- pictures --------------------------------------------------------------------------------------------


def test_overlay_colours_only_where_the_map_is(cifar):
    image = cifar.test_images[0]
    plain = overlay(image, np.zeros((32, 32), np.float32))
    assert plain.shape == (128, 128, 3) and plain.dtype == np.uint8
    big = nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=128, mode="bicubic"
    )
    assert np.abs(plain.astype(int) - big.clamp(0, 255).round()[0].permute(1, 2, 0).numpy()).max() <= 1
    heat = np.zeros((32, 32), np.float32)
    heat[:8, :8] = 1
    hot = overlay(image, heat, size=64)
    diff = np.abs(hot.astype(int) - overlay(image, np.zeros((32, 32)), size=64)).sum(2)
    assert diff[:12, :12].min() > 20 and diff[32:, 32:].max() == 0
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(hot))).convert("RGB")), hot)


# --- the verb --------------------------------------------------------------------------------------------


@pytest.fixture()
def image_folder(cifar, tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    for i, name in enumerate(["a cat?.png", "ship.png", "more/frog.png"]):
        Image.fromarray(cifar.test_images[i]).save(folder / name)
    return folder


def test_explain_verb_writes_a_figure_per_image_and_a_contact_sheet(weights, image_folder, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("explain", str(weights), str(image_folder), "--top", "2", "--out", str(out))
    written = sorted(p.name for p in out.iterdir())
    assert written == ["001-a_cat_.png", "002-ship.png", "003-frog.png", "contact-sheet.png"]
    for name in written:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 150
    assert str(out / "contact-sheet.png") in proc.stdout and "3 images explained with Grad-CAM" in proc.stdout
    assert len([ln for ln in proc.stdout.splitlines() if "%" in ln]) == 3  # one line per image


def test_explain_verb_ig_for_a_named_class(weights, image_folder, tmp_path, capsys):
    out = tmp_path / "ig"
    assert cli.main(["explain", str(weights), str(image_folder / "ship.png"), "--method", "ig",
                     "--target", "cat", "--out", str(out)]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["001-ship.png", "contact-sheet.png"]
    assert "cat " in capsys.readouterr().out


def test_explain_verb_errors_are_one_line_and_write_nothing(weights, image_folder, tmp_path, capsys):
    out = tmp_path / "never"
    (tmp_path / "text.png").write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "unknown class 'kat'; use one of: airplane, automobile": [str(image_folder), "--target", "kat"],
        "no such file": [str(tmp_path / "missing.png")],
        "text.png: ": [str(tmp_path / "text.png")],
        "--top 0": [str(image_folder), "--top", "0"],
        "no image files found": [str(empty)],
    }
    for words, args in cases.items():
        assert cli.main(["explain", str(weights), *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not out.exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert cli.main(["explain", str(weights), str(image_folder), "--out", str(keep)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


# --- hostile inputs: a partial last row, unreadable files among good ones, a device as the model -----------


def _pngs(cifar, folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:02d}.png" for i in range(start, start + n)]
    for i, path in enumerate(paths):
        Image.fromarray(cifar.test_images[start + i]).save(path)
    return paths


def test_explain_nine_images_fills_part_of_the_sheets_last_row(trained_run, cifar, tmp_path, capsys):
    _pngs(cifar, tmp_path / "nine", 9)
    out = tmp_path / "out"
    assert (
        cli.main(["explain", str(trained_run), str(tmp_path / "nine"), "--top", "1", "--out", str(out)]) == 0
    )
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"{i + 1:03d}-img{i:02d}.png" for i in range(9)] + ["contact-sheet.png"]
    with Image.open(out / "contact-sheet.png") as sheet:  # two rows of 8 columns, the second with one image
        assert sheet.height > 300 and sheet.width > 2 * sheet.height
    assert "9 images explained with Grad-CAM" in capsys.readouterr().out


def test_explain_lists_unreadable_files_and_explains_the_rest(trained_run, cifar, tmp_path, capsys):
    folder = tmp_path / "mixed"
    good = _pngs(cifar, folder, 3)
    (folder / "img01b-text.png").write_text("not an image")  # sorts between the good ones
    os.mkfifo(folder / "pipe.png")  # a FIFO: opening it must not hang
    out = tmp_path / "out"
    assert cli.main(["explain", str(trained_run), str(folder), "--out", str(out)]) == 1  # as predict does
    lines = capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in out.iterdir()) == [
        "001-img00.png", "002-img01.png", "004-img02.png", "contact-sheet.png"
    ]  # fmt: skip
    assert any(ln.startswith(f"{folder / 'img01b-text.png'}  error: not an image") for ln in lines), lines
    assert any(ln.startswith(f"{folder / 'pipe.png'}  error: not a regular file") for ln in lines), lines
    assert next(ln for ln in lines if str(good[2]) in ln).startswith(str(out / "004-img02.png"))
    assert lines[-1] == f"3 images explained with Grad-CAM in {out}; 2 failed"


def test_explain_with_a_device_as_the_model_or_a_file_as_out_says_what_it_is(
    trained_run, cifar, tmp_path, capsys
):
    (image,) = _pngs(cifar, tmp_path / "one", 1)
    out = tmp_path / "never"
    assert cli.main(["explain", os.devnull, str(image), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {os.devnull} is not a regular file (a device, FIFO or socket); "
        "give a run directory or a .safetensors file\n"
    )
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert cli.main(["explain", str(trained_run), str(image), "--out", str(afile / "sub")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {afile / 'sub'}: {afile} is a file, not a folder; choose another --out\n"
    assert afile.read_text() == "keep me"
