"""Predict: the one preprocessing over every odd kind of image file, predictors for each model format, the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar10_cnn.calibration import softmax
from cifar10_cnn.images import ImageError, find_images, load_image, preprocess, read_image_file
from cifar10_cnn.predict import load_predictor
from tests.conftest import error_line, in_process, loaded_by, run_cli


@pytest.fixture(scope="module")
def test_images(cifar) -> np.ndarray:
    return cifar.test_images[:64]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: signature, IHDR and IEND, no pixel data (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# --- preprocessing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, kw", [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("PPM", {})]
)
def test_a_cifar_image_in_a_lossless_format_passes_unchanged(test_images, fmt, kw):
    for image in test_images[:4]:
        assert np.array_equal(load_image(encode(Image.fromarray(image), fmt, **kw)), image)


def test_lossy_formats_decode_close_to_the_original(test_images):
    image = test_images[0]
    big = Image.fromarray(image).resize((320, 320), Image.Resampling.NEAREST)
    for fmt in ("JPEG", "WEBP"):
        out = load_image(encode(big, fmt, quality=95))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - image).mean() < 6, fmt


def test_non_square_images_are_centre_cropped_before_the_resize(test_images):
    square = Image.fromarray(test_images[1]).resize((64, 64), Image.Resampling.NEAREST)
    wide = Image.new("RGB", (100, 64), (255, 0, 0))
    wide.paste(square, (18, 0))  # (100 - 64) // 2
    tall = Image.new("RGB", (64, 101), (0, 0, 255))
    tall.paste(square, (0, 18))  # (101 - 64) // 2
    expected = preprocess(square)
    assert np.array_equal(preprocess(wide), expected)  # no red bleeds in from outside the square
    assert np.array_equal(preprocess(tall), expected)


def test_grayscale_one_bit_and_palette_images_become_rgb():
    gray = Image.linear_gradient("L").resize((64, 64))
    out = load_image(encode(gray, "PNG"))
    assert (
        out.shape == (32, 32, 3) and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    )
    assert out.min() < 30 and out.max() > 220
    one_bit = load_image(encode(gray.convert("1"), "PNG"))
    assert set(np.unique(one_bit)) <= set(range(256)) and one_bit.shape == (32, 32, 3)
    palette = Image.new("RGB", (40, 40), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.abs(load_image(encode(palette, "PNG")).astype(int) - (10, 200, 30)).max() <= 2


def test_sixteen_bit_images_are_scaled_to_eight_bits():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    img16 = Image.fromarray(ramp)  # mode I;16
    data = encode(img16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = load_image(data)[..., 0].astype(int)
    want = preprocess(Image.fromarray(np.rint(ramp / 257).astype(np.uint8), "L"))[..., 0].astype(int)
    assert np.abs(got - want).max() <= 1
    # 48-bit RGB PNG: Pillow reads it as 8-bit RGB already
    mid = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert abs(int(load_image(encode(mid, "PNG")).mean()) - 128) <= 1


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 16, 32))  # left half fully transparent
    rgba.paste((0, 0, 0, 128), (16, 0, 24, 32))  # a half-transparent black band
    out = load_image(encode(rgba, "PNG")).astype(int)
    assert (out[:, :16] == 255).all()  # white, not the hidden blue
    assert np.abs(out[:, 16:24] - 127).max() <= 1  # half black over white
    assert (out[:, 24:] == (255, 0, 0)).all()
    la = Image.new("LA", (8, 8), (0, 0))  # transparent black -> white
    assert (load_image(encode(la, "PNG")) == 255).all()
    # a palette PNG with a transparent index
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (16, 0, 32, 32))
    out = load_image(encode(pal, "PNG", transparency=0))
    assert (out[:, :16] == 255).all() and (out[:, 16:] == (0, 255, 0)).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    img.paste((0, 0, 255), (0, 32, 64, 64))  # stored: red top, blue bottom
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(encode(img, "JPEG", exif=exif, quality=95)).astype(int)
    left, right = out[:, :16].mean((0, 1)), out[:, 16:].mean((0, 1))
    assert left[2] > 200 and left[0] < 50  # displayed: blue on the left
    assert right[0] > 200 and right[2] < 50  # and red on the right


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (load_image(data) == (255, 0, 0)).all()


def test_cmyk_tiny_and_large_jpegs():
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # red in CMYK
    out = load_image(encode(cmyk, "JPEG", quality=95)).astype(int)
    assert out[..., 0].mean() > 200 and out[..., 1:].mean() < 60
    assert load_image(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG")).tolist() == [[[9, 8, 7]] * 32] * 32
    assert load_image(encode(Image.new("RGB", (7, 3)), "PNG")).shape == (32, 32, 3)
    # a 12-megapixel photo is decoded at a reduced JPEG scale: same result as the full decode, closely
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((4000, 3000), Image.Resampling.BILINEAR)
    via_jpeg = load_image(encode(big, "JPEG", quality=95)).astype(int)
    full = preprocess(big).astype(int)
    assert np.abs(via_jpeg - full).mean() < 3


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"", 400, "empty"),
        (b"this is not an image, it is text\n" * 10, 415, "not an image"),
        (png_header_only(100_000, 100_000), 413, "pixels"),
    ],
)
def test_bad_image_bytes_are_refused_with_a_reason(data, status, words):
    with pytest.raises(ImageError, match=words) as e:
        load_image(data)
    assert e.value.status == status


def test_formats_that_run_external_programs_are_refused():
    eps = encode(Image.new("RGB", (10, 10)), "EPS")  # Pillow would run Ghostscript to decode it
    with pytest.raises(ImageError, match="not an image in a supported format"):
        load_image(eps)


def test_truncated_images_are_refused(test_images):
    big = Image.fromarray(test_images[0]).resize((256, 256))
    for fmt in ("PNG", "JPEG"):
        data = encode(big, fmt)
        with pytest.raises(ImageError, match="truncated or corrupt") as e:
            load_image(data[: len(data) // 2])
        assert e.value.status == 422


def test_the_pixel_limit_is_enforced_before_decoding():
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageError, match="over the limit of 50,000 pixels"):
        load_image(data, max_pixels=50_000)
    assert load_image(data, max_pixels=60_000).shape == (32, 32, 3)


def test_read_image_file_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image_file(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        read_image_file(tmp_path)


# --- predictors and files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory, test_images) -> Path:
    """A folder tree of real CIFAR-10 test images in several formats, one broken file, one text file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i, image in enumerate(test_images[:12]):
        folder = [root, root / "a", root / "a" / "b"][i % 3]
        Image.fromarray(image).save(folder / f"img{i:02d}.{['png', 'bmp', 'webp'][i % 3]}", lossless=True)
    Image.fromarray(test_images[0]).save(root / ".hidden" / "skipped.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    return root


def test_find_images_walks_folders_recursively(image_tree):
    files = find_images([image_tree])
    names = sorted(p.name for p in files)
    assert len(files) == 13 and "broken.png" in names
    assert "notes.txt" not in names and "skipped.png" not in names
    assert find_images([image_tree / "notes.txt"]) == [image_tree / "notes.txt"]  # named files always count


def test_predictions_match_the_model_on_the_arrays(trained_run, test_images):
    from cifar10_cnn.export import torch_logits
    from cifar10_cnn.weights import load_model

    predictor = load_predictor(trained_run)
    model, meta = load_model(trained_run)
    want = softmax(torch_logits(model, test_images), meta.temperature)  # calibrated, when it is
    got = predictor.probabilities(test_images)
    assert np.abs(got - want).max() < 1e-6
    assert np.allclose(got.sum(1), 1, atol=1e-5)
    tops = predictor.top_k(test_images[:3], 3)
    assert [t[0][0] for t in tops] == [predictor.meta.classes[i] for i in want[:3].argmax(1)]
    assert all(t[0][1] >= t[1][1] >= t[2][1] for t in tops)
    assert predictor.meta.architecture == "seed_cnn" and predictor.meta.params == 1_147_466
    assert predictor.meta.test_accuracy is not None and len(predictor.meta.version) == 12


def test_temperature_scales_the_probabilities(trained_run, test_images, tmp_path, cifar):
    from cifar10_cnn.export import export_model, torch_logits
    from cifar10_cnn.weights import load_model, read_metadata, save_weights

    model, meta = load_model(trained_run)
    hot = tmp_path / "hot.safetensors"
    save_weights(model, hot, architecture=meta.architecture, config=meta.config, temperature=2.5)
    assert read_metadata(hot)["temperature"] == 2.5
    logits = torch_logits(model, test_images)
    for path in (hot, Path(export_model(hot, tmp_path / "hot.onnx", "onnx", images=test_images)["path"])):
        predictor = load_predictor(path)
        assert predictor.meta.temperature == 2.5
        assert np.abs(predictor.probabilities(test_images) - softmax(logits / 2.5)).max() < 1e-5
        assert not np.allclose(softmax(logits), softmax(logits / 2.5), atol=1e-3)


def test_every_model_format_predicts_the_same(trained_run, test_images, tmp_path):
    from cifar10_cnn.export import export_model

    onnx = export_model(trained_run, tmp_path / "m.onnx", "onnx", images=test_images)["path"]
    st = export_model(trained_run, tmp_path / "m.safetensors", "safetensors", images=test_images)["path"]
    reference = load_predictor(trained_run).probabilities(test_images)
    for path, backend in ((st, "auto"), (onnx, "auto"), (trained_run, "onnx")):
        predictor = load_predictor(path, backend)
        assert np.abs(predictor.probabilities(test_images) - reference).max() < 1e-5, (path, backend)
        assert predictor.meta.version == load_predictor(trained_run).meta.version  # the weights' identity
    assert load_predictor(onnx).backend == "onnx"


def test_cli_predict_table_lists_errors_and_exits_1(trained_run, image_tree, tmp_path):
    proc = run_cli("predict", str(trained_run), str(image_tree), str(tmp_path / "missing.jpg"), check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["file", "top", "1", "top"]
    assert len(lines) == 1 + 13 + 1
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 2 and "broken.png" in errors[0] and "no such file" in errors[1]
    assert "12 images predicted, 2 failed" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_predict_json_and_csv(trained_run, image_tree, test_images):
    files = [str(image_tree / "img00.png"), str(image_tree / "img03.png")]
    proc = run_cli("predict", str(trained_run), *files, "--top-k", "4", "--json")
    out = json.loads(proc.stdout)
    assert out["model"]["architecture"] == "seed_cnn"
    assert [r["file"] for r in out["results"]] == files
    probs = load_predictor(trained_run).probabilities(test_images[[0, 3]])
    for r, p in zip(out["results"], probs, strict=True):
        assert len(r["predictions"]) == 4
        assert r["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)
    proc = run_cli("predict", str(trained_run), str(image_tree / "a"), "--csv", "--top-k", "2", check=False)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert proc.returncode == 1
    assert sum(1 for r in rows if r["error"]) == 1 and sum(1 for r in rows if r["rank"] == "1") == 8
    assert {r["rank"] for r in rows if not r["error"]} == {"1", "2"}


def test_cli_predict_accepts_onnx_and_safetensors(trained_run, image_tree, tmp_path, data_dir):
    """A run, its weights file and its ONNX export give the same predictions through the command line's
    main() (in this process; a fresh interpreter only where the claim is what that interpreter imports)."""
    exported = in_process("export", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert exported.returncode == 0, exported.stderr
    outputs = []
    for model in (trained_run, trained_run / "model.safetensors", tmp_path / "m.onnx"):
        proc = in_process("predict", str(model), str(image_tree / "img00.png"), "--json", "--top-k", "10")
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout)["results"][0]["predictions"])
    for other in outputs[1:]:
        assert [p["class"] for p in other] == [p["class"] for p in outputs[0]]
        assert np.allclose(
            [p["probability"] for p in other], [p["probability"] for p in outputs[0]], atol=1e-5
        )
    # `cifar10 predict --backend onnx` loads no training code and no matplotlib.
    code = (
        "import contextlib, io; from cifar10_cnn.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main(['predict', {str(tmp_path / 'm.onnx')!r}, {str(image_tree / 'img00.png')!r}, "
        "'--backend', 'onnx', '--json'])\n"
        "assert rc == 0, rc\n"
    )
    assert loaded_by(code, ("matplotlib", "cifar10_cnn.train", "cifar10_cnn.evaluate")) == []


def test_cli_predict_errors_are_one_line(trained_run, tmp_path, image_tree):
    assert "does not exist" in error_line(
        run_cli("predict", str(tmp_path / "nope"), str(image_tree), check=False)
    )
    assert "--top-k 0" in error_line(in_process("predict", str(trained_run), str(image_tree), "--top-k", "0"))
    (tmp_path / "empty").mkdir()
    assert "no image files" in error_line(in_process("predict", str(trained_run), str(tmp_path / "empty")))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert "not a usable ONNX model" in error_line(in_process("predict", str(bad), str(image_tree)))


# --- hardening: untrusted metadata, broken models, special files, decode memory -------------------------------


def tampered(trained_run: Path, path: Path, **metadata) -> Path:
    """The trained model's tensors under other metadata (raw strings, as an attacker would write them)."""
    from safetensors.torch import load_file, save_file

    from cifar10_cnn.weights import read_metadata

    raw = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in read_metadata(trained_run / "model.safetensors").items()
    }
    save_file(load_file(str(trained_run / "model.safetensors")), str(path), metadata={**raw, **metadata})
    return path


@pytest.mark.parametrize(
    "field, value",
    [
        ("classes", "5"),
        ("classes", '["a", "b"]'),
        ("classes", json.dumps(["x"] * 10)),
        ("test_accuracy", "abc"),
        ("test_accuracy", "1.5"),
        ("params", "abc"),
        ("params", "-3"),
        ("mean", "abc"),
        ("mean", "[0.5, 0.5]"),
        ("std", "[0, 0.2, 0.2]"),
        ("temperature", "NaN"),
        ("temperature", "-1"),
        ("name", json.dumps("x" * 1000)),
        ("config", "[1, 2]"),
    ],
)
def test_tampered_metadata_is_refused_at_load_naming_the_field(trained_run, tmp_path, field, value):
    from cifar10_cnn.errors import CheckpointError

    path = tampered(trained_run, tmp_path / "m.safetensors", **{field: value})
    with pytest.raises(CheckpointError, match=f"metadata '{field}'") as e:
        load_predictor(path)
    assert "\n" not in str(e.value)


def test_tampered_metadata_is_one_line_in_predict(trained_run, tmp_path, image_tree):
    path = tampered(trained_run, tmp_path / "m.safetensors", test_accuracy="abc")
    proc = run_cli("predict", str(path), str(image_tree / "img00.png"), "--json", check=False)
    assert proc.returncode == 2 and "metadata 'test_accuracy'" in error_line(proc) and proc.stdout == ""


def test_version_is_the_tensors_fingerprint_not_the_metadata(trained_run, tmp_path):
    from cifar10_cnn.weights import load_model

    renamed = tampered(trained_run, tmp_path / "m.safetensors", name='"other"', version='"forged"')
    (_, a), (_, b) = load_model(trained_run), load_model(renamed)
    assert a.version == b.version != "forged" and len(a.version) == 12 and b.name == "other"


def broken_weights(trained_run: Path, path: Path, value: float) -> Path:
    import torch

    from cifar10_cnn.weights import load_model, save_weights

    model, meta = load_model(trained_run)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = value
        if value == 1.0:  # finite weights, outputs overflow: only the probe batch can tell
            model.classifier[-1].weight.fill_(3e38)
    save_weights(model, path, architecture=meta.architecture, config=meta.config)
    return path


@pytest.mark.parametrize(
    "value, words",
    [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (1.0, "outputs are NaN")],
)
def test_models_with_non_finite_weights_or_outputs_are_refused_at_load(trained_run, tmp_path, value, words):
    from cifar10_cnn.errors import CheckpointError

    with pytest.raises(CheckpointError, match=words):
        load_predictor(broken_weights(trained_run, tmp_path / "broken.safetensors", value))


def test_predict_json_never_prints_nan_for_a_broken_model(trained_run, tmp_path, image_tree):
    path = broken_weights(trained_run, tmp_path / "nan.safetensors", float("nan"))
    proc = run_cli("predict", str(path), str(image_tree / "img00.png"), "--json", check=False)
    assert "NaN or infinite" in error_line(proc) and proc.returncode == 2 and "NaN" not in proc.stdout


def test_an_onnx_model_with_fewer_classes_than_outputs_is_one_line(trained_run, tmp_path, image_tree):
    from dataclasses import replace

    from cifar10_cnn.export import onnx_bytes
    from cifar10_cnn.weights import load_model

    model, meta = load_model(trained_run)
    path = tmp_path / "short.onnx"
    path.write_bytes(onnx_bytes(model, replace(meta, classes=("a", "b", "c", "d", "e"))))
    with pytest.raises(Exception, match="names 5 classes"):
        load_predictor(path)
    proc = run_cli("predict", str(path), str(image_tree / "img00.png"), check=False)
    assert "names 5 classes" in error_line(proc)


def test_special_files_are_skipped_in_one_line_and_the_rest_predicted(trained_run, tmp_path, test_images):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(test_images[0]).save(folder / "a.png")
    os.mkfifo(folder / "b.png")  # nothing ever writes to it: opening it for reading would wait forever
    proc = run_cli("predict", str(trained_run), str(folder), "/dev/zero", check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()[1:]
    assert len(lines) == 3 and lines[0].startswith(str(folder / "a.png")) and "error" not in lines[0]
    assert all("not a regular file" in ln for ln in lines[1:]), lines
    assert "1 image predicted, 2 failed" in proc.stderr


def test_file_reads_are_capped(tmp_path):
    from cifar10_cnn.images import read_file

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 101)
    with pytest.raises(ImageError, match="over") as e:
        read_file(big, max_bytes=100)
    assert e.value.status == 413 and len(read_file(big, max_bytes=101)) == 101


def sixteen_bit_bomb(size: int = 7745) -> bytes:
    """A 16-bit grey PNG of size x size (60 megapixels at 7745) that compresses to about 120 KB."""
    a = np.zeros((size, size), np.uint16)
    a[::97, ::89] = 65535
    return encode(Image.fromarray(a), "PNG", optimize=True)


def test_a_sixteen_bit_upload_decodes_within_its_own_pixels_memory(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(sixteen_bit_bomb())
    code = (
        "import resource, sys; from cifar10_cnn.images import read_image_file; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "out = read_image_file(sys.argv[1]); assert out.shape == (32, 32, 3); "
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"
    )

    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    grown_mb = int(proc.stdout)
    assert grown_mb < 300, grown_mb  # the decoded pixels are 120 MB; it was ~1.5 GB through float64 copies


def test_the_decode_budget_bounds_large_decodes_but_not_small_ones():
    import threading
    import time

    from cifar10_cnn.images import DecodeBudget

    budget = DecodeBudget(1000)
    order: list[str] = []
    held = threading.Event()

    def large(name: str, hold: float) -> None:
        with budget.reserve(800):
            order.append(name)
            held.set()
            time.sleep(hold)
        order.append(f"/{name}")

    first = threading.Thread(target=large, args=("big1", 0.5))
    first.start()
    held.wait(5)
    second = threading.Thread(target=large, args=("big2", 0))
    second.start()
    time.sleep(0.1)
    with budget.reserve(50):  # a small decode does not queue behind the large ones
        order.append("small")
    first.join()
    second.join()
    assert order == ["big1", "small", "/big1", "big2", "/big2"]
    with budget.reserve(5000):  # larger than the whole budget: runs, alone
        assert budget.in_flight["large"] == 5000


def test_importing_the_inference_side_changes_no_global_state_and_has_no_cycles():

    code = (
        "import sys, warnings; from PIL import Image; default = Image.MAX_IMAGE_PIXELS; "
        "import cifar10_cnn.export; assert 'cifar10_cnn.predict' not in sys.modules, 'export imports predict'; "
        "import cifar10_cnn.predict, cifar10_cnn.serve; assert Image.MAX_IMAGE_PIXELS == default; "
        "assert not [f for f in warnings.filters if f[2] is Image.DecompressionBombWarning], warnings.filters"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_stored_normalisation_is_the_one_every_backend_and_export_uses(
    trained_run, test_images, tmp_path
):
    from cifar10_cnn.export import export_model
    from cifar10_cnn.weights import read_metadata

    # The trained tensors under a mean and std other than CIFAR-10's: the model's input contract changed.
    norm = {"mean": "[0.1, 0.1, 0.1]", "std": "[0.9, 0.9, 0.9]"}
    odd = tampered(trained_run, tmp_path / "odd.safetensors", **norm)
    plain = load_predictor(trained_run).logits(test_images)
    got = load_predictor(odd).logits(test_images)
    # 100 times the tolerance the backends agree within below (the small model's logits are small).
    assert np.abs(got - plain).max() > 1e-2, "the PyTorch path ignored the stored mean and std"
    # Export verifies against PyTorch under the same stored normalisation, and every format keeps it.
    onnx = export_model(odd, tmp_path / "odd.onnx", "onnx", images=test_images)["path"]
    st = export_model(odd, tmp_path / "copy.safetensors", "safetensors", images=test_images)["path"]
    assert [read_metadata(Path(st))[k] for k in norm] == [json.loads(v) for v in norm.values()]
    for path, backend in ((onnx, "auto"), (odd, "onnx"), (st, "torch")):
        assert np.abs(load_predictor(path, backend).logits(test_images) - got).max() < 1e-4, (path, backend)


def test_an_unreadable_onnx_model_is_one_line_in_export_verification_as_in_predict(trained_run, tmp_path):
    from cifar10_cnn.errors import UserError
    from cifar10_cnn.export import verify_onnx
    from cifar10_cnn.weights import load_model

    model, _ = load_model(trained_run)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    for source in (bad, bad.read_bytes()):  # export's check builds the session predict and serve run
        with pytest.raises(UserError, match="is not a usable ONNX model") as e:
            verify_onnx(source, model, images)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="is not a usable ONNX model"):
        load_predictor(bad)
