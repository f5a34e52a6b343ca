"""--image-size: a folder of real CIFAR-10 images saved as 48x48 PNG files, trained at 48x48 once (module
fixture), and everything after training (the model file, predict, serve, export, explain, evaluate) at 48;
the refusals are one line each."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cifar10_cnn import models as M
from cifar10_cnn.errors import CheckpointError, DataError, UserError
from cifar10_cnn.weights import load_model, read_metadata

from .conftest import error_line, in_process, on
from .test_folders import CLASSES

SIZE = 48


def write_upsampled(root: Path, cifar, classes=(0, 1, 8), per_class: int = 70, size: int = SIZE) -> Path:
    """root/<class>/NNNNN.png: real training images of those classes, upsampled (bicubic) to size x size."""
    for c in classes:
        folder = root / CLASSES[c]
        folder.mkdir(parents=True)
        for i in np.flatnonzero(cifar.train_labels == c)[:per_class]:
            img = Image.fromarray(cifar.train_images[i]).resize((size, size), Image.Resampling.BICUBIC)
            img.save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def folder48(cifar, tmp_path_factory) -> Path:
    return write_upsampled(tmp_path_factory.mktemp("size") / "imgs", cifar)


@pytest.fixture(scope="module")
def run48(folder48, tmp_path_factory) -> Path:
    """One epoch of quick's airbench_small on 168 training images at 48x48 (seconds)."""
    from cifar10_cnn.config import recipe_config
    from cifar10_cnn.pipeline import train

    cfg = recipe_config(
        "quick", epochs=1, batch_size=50, image_size=SIZE, train_sizes="32", tta=0, dataset="folder"
    )
    out = tmp_path_factory.mktemp("run48") / "run"
    return train(cfg, out=out, data_dir=folder48, progress=False, echo=lambda _: None)


def a_photo(folder: Path, tmp_path: Path) -> Path:
    """A non-square JPEG made from one of the folder's images (predict and serve crop and resize it)."""
    src = next((folder / "ship").iterdir())
    path = tmp_path / "photo.jpg"
    Image.open(src).convert("RGB").resize((150, 100)).save(path, quality=95)
    return path


def test_the_model_file_says_48_and_predict_classifies_at_48(run48, folder48, tmp_path):
    assert json.loads((run48 / "config.json").read_text())["image_size"] == SIZE
    assert read_metadata(run48 / "model.safetensors")["image_size"] == SIZE
    _, meta = load_model(run48)
    assert meta.image_size == SIZE and meta.to_dict()["image_size"] == SIZE
    from cifar10_cnn.predict import load_predictor, predict_files

    predictor = load_predictor(run48)
    assert predictor.input_shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="expected uint8 images \\(N, 48, 48, 3\\)"):
        predictor.logits(np.zeros((1, 32, 32, 3), np.uint8))
    # A file decodes to 48x48 and gets the model's own logits of those pixels.
    from cifar10_cnn.images import read_image_file

    photo = a_photo(folder48, tmp_path)
    pixels = read_image_file(photo, size=SIZE)
    assert pixels.shape == (SIZE, SIZE, 3)
    (result,) = predict_files(predictor, [photo], k=3)
    assert result.error is None and {c for c, _ in result.predictions} == {"airplane", "automobile", "ship"}
    probs = predictor.probabilities(pixels[None])[0]
    assert [p for _, p in result.predictions] == pytest.approx(sorted(probs, reverse=True), abs=1e-6)
    proc = in_process("predict", str(run48), str(photo), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["predictions"][0]["class"] == result.predictions[0][0]


def test_onnx_export_runs_at_48_and_says_so(run48, tmp_path):
    import onnxruntime as ort

    from cifar10_cnn.export import export_model
    from cifar10_cnn.predict import load_predictor

    out = tmp_path / "m.onnx"
    r = export_model(run48, out, "onnx")
    assert r["verified_on"].endswith("test images of the run") and r["max_abs_diff"] <= r["atol"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [SIZE, SIZE, 3]
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["image_size"]) == SIZE and "(N, 48, 48, 3)" in json.loads(props["input"])
    onnx = load_predictor(out)
    assert onnx.meta.image_size == SIZE
    torch_pred = load_predictor(run48)
    images = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    assert np.allclose(onnx.logits(images), torch_pred.logits(images), atol=1e-4)
    ts = tmp_path / "m.pt"
    assert export_model(run48, ts, "torchscript")["max_abs_diff"] <= 1e-4
    st = tmp_path / "m.safetensors"
    export_model(run48, st, "safetensors")
    assert load_model(st)[1].image_size == SIZE


def test_serve_explain_and_evaluate_work_at_48(run48, folder48, tmp_path):
    from fastapi.testclient import TestClient

    from cifar10_cnn.explain import explain
    from cifar10_cnn.serve import create_app

    with TestClient(create_app(run48)) as client:
        for _ in range(600):  # the probe batch at 48x48 (and an explanation) runs as the service starts
            ready = client.get("/ready")
            if ready.status_code == 200:
                break
            assert "failed" not in ready.json().get("detail", ""), ready.json()
            time.sleep(0.1)
        assert ready.status_code == 200, ready.json()
        model = client.get("/model").json()
        assert model["image_size"] == SIZE and "resize to 48x48" in model["input"]
        photo = a_photo(folder48, tmp_path).read_bytes()
        r = client.post(
            "/predict?include_input=true&explain=true", files={"file": ("p.jpg", photo, "image/jpeg")}
        )
        assert r.status_code == 200, r.text
        seen = r.json()["results"][0]["input"].split(",", 1)[1]
        assert Image.open(io.BytesIO(base64.b64decode(seen))).size == (SIZE, SIZE)
        assert r.json()["results"][0]["explanation"]["png"].startswith("data:image/png;base64,")
    model, _ = load_model(run48)
    images = np.stack([np.asarray(Image.open(p)) for p in sorted((folder48 / "ship").iterdir())[:3]])
    for method in ("gradcam", "ig"):
        maps = explain(model, images, method=method)
        assert maps.shape == (3, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    # The evaluation the run made: Grad-CAM figure and the report, at the run's size.
    results = json.loads((run48 / "results.json").read_text())
    assert results["test_size"] == 42 and (run48 / "eval" / "explanations.png").is_file()
    out = tmp_path / "explained"
    proc = in_process("explain", str(run48), str(folder48 / "ship"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "contact-sheet.png").is_file()


def test_refusals_are_one_line(folder48, small_data, tmp_path):
    out = ["--out", str(tmp_path / "never"), "--no-progress"]
    cases = [
        (["--image-size", "64", "--dataset", "cifar100"], "--image-size 64 is for a --data-dir of your own images"),
        (["--image-size", "300", "--data-dir", str(folder48)], "--image-size must be 8 to 256 pixels"),
        (["--image-size", "4", "--data-dir", str(folder48)], "--image-size must be 8 to 256 pixels"),
        (["--image-size", "48", *on(small_data)], "is for a folder of your own images"),
        (["--image-size", "16", "--model", "vgg11", "--data-dir", str(folder48)],
         "vgg11 takes images of at least 32x32 pixels, not 16x16; at that size use --model airbench, airbench_small,"),
        (["--image-size", "48", "--train-sizes", "56", "--data-dir", str(folder48)],
         "its sides must be at most the image size, 48"),
    ]  # fmt: skip
    for args, words in cases:
        proc = in_process("train", *args, *out)
        assert proc.returncode == 2 and words in error_line(proc), (args, proc.stderr)
    assert not (tmp_path / "never").exists()
    # The data the run trains on must be that size: a folder decoded at 48 is not a run at 32 (in memory).
    from cifar10_cnn.config import recipe_config
    from cifar10_cnn.folders import load_folder
    from cifar10_cnn.pipeline import train

    data = load_folder(folder48, image_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(UserError, match="training images are 48x48x3, not 32x32x3"):
        train(recipe_config("quick", epochs=1), data=data, out=tmp_path / "never2", echo=lambda _: None)
    assert not (tmp_path / "never2").exists()


def test_a_folder_too_large_at_its_size_is_one_line(folder48, tmp_path, monkeypatch):
    """The in-memory bound counts bytes at the chosen size: 210 files fit at 48x48 and not at 256x256 under
    a bound of 200 images of 256x256 (the real bound, 4 GiB, is 21,845 such images)."""
    from cifar10_cnn import folders as F

    monkeypatch.setattr(F, "MAX_ARRAY_BYTES", 200 * 256 * 256 * 3)
    assert (
        len(F.load_folder(folder48, image_size=SIZE, cache_dir=tmp_path / "c", progress=False).classes) == 3
    )
    with pytest.raises(DataError, match="holds 210 image files; at most 200 fit in memory") as e:
        F.load_folder(folder48, image_size=256, cache_dir=tmp_path / "c", progress=False)
    assert "\n" not in str(e.value)


def test_each_net_runs_from_its_minimum_and_the_fixed_heads_follow_the_size():
    for name in M.list_models():
        low = M.min_image_size(name)
        model = M.create_model(name, image_size=low).eval()
        with torch.no_grad():
            assert model(torch.zeros(2, 3, low, low)).shape == (2, 10)
        if low > 8:  # below the net's own minimum: one line naming those that fit, and the raw net fails
            with pytest.raises(UserError, match=f"{name} takes images of at least {low}x{low}"):
                M.create_model(name, image_size=low - 1)
            raw = M._REGISTRY[name](image_size=low - 1).eval()
            with pytest.raises(RuntimeError), torch.no_grad():
                raw(torch.zeros(2, 3, low - 1, low - 1))
    for name, at32, at64 in (("seed_cnn", 2048, 8192), ("vgg11", 512, 2048)):
        heads = [
            next(m for m in M.create_model(name, image_size=s).modules() if isinstance(m, torch.nn.Linear))
            for s in (32, 64)
        ]
        assert [h.in_features for h in heads] == [at32, at64]
    assert M.count_params(M.create_model("seed_cnn")) == 1_147_466  # 32x32: the model it always was


def test_old_model_files_mean_32_and_a_bad_image_size_is_one_line(trained_run, tmp_path):
    tensors = load_file(str(trained_run / "model.safetensors"))
    raw = {k: json.dumps(v) for k, v in read_metadata(trained_run / "model.safetensors").items()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={k: v for k, v in raw.items() if k != "image_size"})
    assert load_model(old)[1].image_size == 32
    for value, words in (
        ("1000", "metadata 'image_size' is 1000; it must be a whole number of pixels, 8 to 256"),
        ('"48"', "metadata 'image_size' is '48'"),
        ("true", "metadata 'image_size' is True"),
        ("48", "at its 48x48 input"),  # seed_cnn's head at 48 is not the one in the file
    ):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={**raw, "image_size": value})
        with pytest.raises(CheckpointError, match="") as e:
            load_model(bad)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
