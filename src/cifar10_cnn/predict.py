"""Images from disk (or an upload) -> the one preprocessing of every path -> a predictor -> top-k classes.

Preprocessing, the same for `cifar10 predict`, `cifar10 serve` and the exported ONNX model's users:

1. decode the first frame with Pillow (refusing files over MAX_PIXELS); large JPEGs are decoded at a reduced
   DCT scale (1/2..1/8) that still leaves at least DRAFT_SIZE pixels on each side;
2. apply the EXIF orientation;
3. convert to 8-bit RGB: 16-bit samples are scaled to 8 bits, palettes expanded, and any transparency is
   composited onto white;
4. centre-crop to a square (the short side), then resize to 32x32 with Pillow's antialiased bicubic filter.

The result is a uint8 (32, 32, 3) RGB array, exactly what CIFAR-10 holds; a 32x32 RGB image passes unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_SIZE = 32
MAX_PIXELS = 60_000_000  # above a 50-megapixel photo; a decoded RGBA image this size is 240 MB
MAX_FILE_BYTES = 256 * 2**20  # no image we accept is this large on disk
DRAFT_SIZE = 128  # JPEG draft decoding keeps at least 4x the output resolution for the antialiased resize
RESAMPLE = Image.Resampling.BICUBIC
# Raster formats Pillow decodes by itself. Left out on purpose: EPS (runs Ghostscript on the file), and the
# scientific, font, video and thumbnail formats that no photo comes in.
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "JPEG2000")
FORMATS += ("AVIF", "QOI", "PCX", "SGI")

# Pillow refuses images over 2 * MAX_IMAGE_PIXELS and warns above it; the warning becomes an error here, and
# open_image checks MAX_PIXELS itself as well, so the limit holds even where these globals are not in effect.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class ImageError(UserError):
    """One image cannot be used; status is the HTTP status the web service answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _formats() -> list[str]:
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode untrusted image bytes (the first frame), refusing empty, broken and oversized images."""
    if not data:
        raise ImageError("the file is empty", 400)
    try:
        img = Image.open(io.BytesIO(data), formats=_formats())
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(
                f"the image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels", 413
            )
        img.draft(None, (DRAFT_SIZE, DRAFT_SIZE))  # JPEG only; a no-op for other formats
        img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"the image has more than {max_pixels:,} pixels (a decompression bomb?)", 413
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image in a supported format ({', '.join(_formats())})", 415) from None
    except Exception as e:  # untrusted input: any decoder failure is the file's fault, not the server's
        raise ImageError(f"the image is truncated or corrupt ({_reason(e)})", 422) from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float samples scaled, palettes expanded, transparency composited on white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float64)
        peak = float(a.max()) if a.size else 0.0
        if img.mode == "F":
            scale = 255.0 if peak <= 1.0 else 1.0  # float images are either 0..1 or 0..255
        else:
            scale = 255 / 65535 if img.mode.startswith("I;16") or peak > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA", "P") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some transparency: composite onto white
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            rgba = canvas
        return rgba.convert("RGB")
    return img.convert("RGB")


def preprocess(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A decoded image -> uint8 (size, size, 3) RGB: EXIF orientation, RGB, centre square crop, resize."""
    img = to_rgb(ImageOps.exif_transpose(img))
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    # Crop first: resizing with a box would let pixels outside the square bleed in through the filter.
    square = img.crop((left, top, left + s, top + s)) if (w, h) != (s, s) else img
    return np.asarray(square.resize((size, size), RESAMPLE), dtype=np.uint8).copy()


def load_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> uint8 (32, 32, 3), or ImageError saying what is wrong with the file."""
    img = open_image(data, max_pixels)
    try:
        return preprocess(img)
    except Exception as e:  # e.g. a damaged EXIF block or an exotic mode
        raise ImageError(f"the image cannot be converted to RGB ({_reason(e)})", 422) from None


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """An image file on disk -> uint8 (32, 32, 3); ImageError for a missing, unreadable or bad file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ImageError(f"the file is over {MAX_FILE_BYTES // 2**20} MB; too large for an image", 413)
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError("no such file", 404) from None
    except IsADirectoryError:
        raise ImageError("is a directory", 400) from None
    except OSError as e:
        raise ImageError(f"cannot read the file ({e.strerror or _reason(e)})", 400) from None
    return load_image(data)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of logits (N, C) divided by the calibration temperature."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The k most probable classes of each row, most probable first."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(row[j])) for j in idx] for row, idx in zip(probs, order, strict=True)]


# --- models ---------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What a served or exported model is: identity, architecture, classes and calibration."""

    name: str
    version: str
    architecture: str
    classes: list[str]
    temperature: float = 1.0
    params: int | None = None
    test_accuracy: float | None = None
    backend: str = "torch"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def temperature_of(meta: dict[str, Any]) -> float:
    """The calibrated softmax temperature in the metadata (absent: 1.0)."""
    t = meta.get("temperature", 1.0)
    try:
        t = float(t if t is not None else 1.0)
    except (TypeError, ValueError):
        t = float("nan")
    if not math.isfinite(t) or t <= 0:
        raise UserError(f"the model's temperature {meta.get('temperature')!r} is not a positive number")
    return t


def _run_dir_of(path: Path) -> Path | None:
    """The run directory a model path belongs to (the directory itself, or a run's model.safetensors)."""
    if path.is_dir():
        return path
    if path.name == "model.safetensors" and (path.parent / "results.json").is_file():
        return path.parent
    return None


def describe(path: str | os.PathLike, meta: dict[str, Any], weights: Path, params: int | None) -> ModelInfo:
    """ModelInfo from the metadata, the run's results.json (if any) and the weights file's hash."""
    path = Path(path)
    run = _run_dir_of(path)
    results: dict[str, Any] = {}
    if run is not None and (run / "results.json").is_file():
        try:
            results = json.loads((run / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            results = {}
    name = meta.get("name") or (run.resolve().name if run is not None else path.stem)
    acc = meta.get("test_accuracy", results.get("test_accuracy"))
    return ModelInfo(
        name=str(name),
        version=str(meta.get("version") or file_sha256(weights)[:12]),
        architecture=str(meta.get("architecture", "unknown")),
        classes=list(meta.get("classes") or []),
        temperature=temperature_of(meta),
        params=int(meta.get("params") or results.get("params") or params or 0) or None,
        test_accuracy=float(acc) if acc is not None else None,
    )


class Predictor:
    """Logits and probabilities for batches of preprocessed images (uint8 N x 32 x 32 x 3 RGB)."""

    info: ModelInfo
    batch_size: int = 256

    def _logits(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw logits (N, C) as float32, computed in batches of batch_size."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"expected uint8 images (N, 32, 32, 3), got {images.shape}")
        if len(images) == 0:
            return np.zeros((0, len(self.info.classes)), np.float32)
        parts = [
            self._logits(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities: softmax(logits / temperature)."""
        return softmax(self.logits(images), self.info.temperature)

    def top_k(self, images: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        return top_k(self.probabilities(images), self.info.classes, k)


class TorchPredictor(Predictor):
    """A PyTorch model in eval mode; normalisation as in training (data.normalize)."""

    def __init__(self, model: Any, info: ModelInfo, batch_size: int = 256):
        import torch

        self.model = model.eval().to(memory_format=torch.channels_last)
        self.info = info
        self.batch_size = batch_size

    def _logits(self, images: np.ndarray) -> np.ndarray:
        import torch

        from .augment import normalize

        with torch.inference_mode():
            x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
            return self.model(x.contiguous(memory_format=torch.channels_last)).float().numpy()


class OnnxPredictor(Predictor):
    """An exported ONNX model (input: uint8 images N x 32 x 32 x 3) on ONNX Runtime's CPU provider."""

    def __init__(
        self, model: bytes | str | os.PathLike, info: ModelInfo | None = None, batch_size: int = 256
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Idle worker threads sleep instead of spinning: on a small machine the spinning takes the cores that
        # the web server's event loop and image decoding need between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise UserError(
                f"{'the model' if isinstance(model, bytes) else model} is not a usable ONNX model ({_reason(e)})"
            ) from None
        self.input_name = self.session.get_inputs()[0].name
        if info is None:
            if not isinstance(source, str):
                raise ValueError("an in-memory ONNX model needs its ModelInfo")
            info = onnx_info(self.session, Path(source))
        self.info = info
        self.batch_size = batch_size

    def _logits(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]


def onnx_metadata(session: Any) -> dict[str, Any]:
    """The cifar10-cnn metadata stored in an ONNX model, JSON values decoded."""
    out: dict[str, Any] = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def onnx_info(session: Any, path: Path) -> ModelInfo:
    meta = onnx_metadata(session)
    if "classes" not in meta:
        raise UserError(
            f"{path} is not an ONNX model exported by cifar10 export (no class names in its metadata)"
        )
    info = describe(path, meta, path, None)
    info.backend = "onnx"
    return info


BACKENDS = ("auto", "torch", "onnx")


def load_predictor(
    path: str | os.PathLike,
    backend: str = "auto",
    *,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> Predictor:
    """A predictor for a run directory, a .safetensors file or an .onnx file.

    backend auto runs .onnx files on ONNX Runtime and everything else on PyTorch; backend onnx with a run or
    safetensors file exports the model to ONNX in memory first (verified against PyTorch, as export does).
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run directory, a .safetensors or an .onnx file")
    if path.suffix.lower() == ".onnx":
        if backend == "torch":
            raise UserError(f"{path} is an ONNX model; serve it with --backend onnx (or auto)")
        return OnnxPredictor(path, batch_size=batch_size)

    from .models import count_params
    from .weights import load_model, weights_path

    weights = weights_path(path)
    model, meta = load_model(weights)
    info = describe(path, meta, weights, count_params(model))
    if backend == "onnx":
        from .export import onnx_bytes, verification_images, verify_onnx

        data = onnx_bytes(model, meta, info)
        images, _ = verification_images(data_dir, required=False)
        verify_onnx(data, model, images)
        info.backend = "onnx"
        return OnnxPredictor(data, info, batch_size=batch_size)
    return TorchPredictor(model, info, batch_size=batch_size)


# --- files -> predictions -------------------------------------------------------------------------------------


def image_extensions() -> set[str]:
    """File extensions of the supported formats (lower case, with the dot)."""
    allowed = set(_formats())
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in allowed}


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly, and the image files under folders (recursively, sorted, hidden ones skipped)."""
    exts = image_extensions()
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out.extend(
                    Path(root) / f
                    for f in sorted(files)
                    if not f.startswith(".") and Path(f).suffix.lower() in exts
                )
        else:
            out.append(p)  # a missing or unreadable file is reported as that file's error
    return out


@dataclass
class FileResult:
    """The top-k classes of one file, or why it could not be read."""

    path: str
    predictions: list[tuple[str, float]] | None = None
    error: str | None = None


def predict_files(
    predictor: Predictor, paths: Sequence[Path], k: int = 3, batch_size: int = 256, workers: int | None = None
) -> Iterator[FileResult]:
    """Top-k of every file, in order: files decoded in parallel threads, inference batched."""
    workers = workers or min(8, os.cpu_count() or 1)

    def decode(path: Path) -> np.ndarray | ImageError:
        try:
            return read_image_file(path)
        except ImageError as e:
            return e

    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            decoded = list(pool.map(decode, chunk))
            good = [d for d in decoded if isinstance(d, np.ndarray)]
            tops = iter(predictor.top_k(np.stack(good), k) if good else [])
            for path, d in zip(chunk, decoded, strict=True):
                if isinstance(d, ImageError):
                    yield FileResult(str(path), error=str(d))
                else:
                    yield FileResult(str(path), predictions=next(tops))


def write_results(
    results: Iterable[FileResult], fmt: str, k: int, out: IO[str], info: ModelInfo | None = None
) -> tuple[int, int]:
    """Print results as a table, JSON or CSV (rows as they come); returns (images predicted, errors)."""
    n_ok = n_err = 0
    rows = []
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["file", "rank", "class", "probability", "error"])
    for r in results:
        n_ok += r.error is None
        n_err += r.error is not None
        if fmt == "json":
            rows.append(
                {"file": r.path, "error": r.error}
                if r.error
                else {
                    "file": r.path,
                    "predictions": [{"class": c, "probability": p} for c, p in r.predictions or []],
                }
            )
        elif fmt == "csv":
            if r.error:
                writer.writerow([r.path, "", "", "", r.error])
            for rank, (c, p) in enumerate(r.predictions or [], 1):
                writer.writerow([r.path, rank, c, f"{p:.6f}", ""])
        else:
            rows.append(r)
    if fmt == "json":
        model = (
            {"name": info.name, "version": info.version, "architecture": info.architecture} if info else None
        )
        json.dump({"model": model, "results": rows}, out, indent=2)
        out.write("\n")
    elif fmt == "table":
        out.write(format_table(rows, k))
    return n_ok, n_err


def format_table(results: Sequence[FileResult], k: int) -> str:
    """One line per file: the file, then class and probability for each of the top k."""
    width = max([len("file"), *(len(r.path) for r in results)])
    ranks = min(k, max([len(r.predictions or []) for r in results] or [k]))
    head = f"{'file':<{width}}" + "".join(f"  {'top ' + str(i + 1):<17}" for i in range(ranks))
    lines = [head.rstrip()]
    for r in results:
        if r.error:
            lines.append(f"{r.path:<{width}}  error: {r.error}")
        else:
            lines.append(
                f"{r.path:<{width}}"
                + "".join(f"  {c:<10} {p:>6.1%}" for c, p in r.predictions or []).rstrip()
            )
    return "\n".join(lines) + "\n"


def predict_command(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    k: int = 3,
    fmt: str = "table",
    backend: str = "auto",
    batch_size: int = 256,
    out: IO[str],
    err: IO[str],
) -> int:
    """`cifar10 predict`: print the top-k of every image; exit status 1 when some files failed."""
    if k < 1:
        raise UserError(f"--top-k {k}: give 1 or more")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give 1 or more")
    paths = find_images(inputs)
    if not paths:
        raise UserError(f"no image files found in {', '.join(map(str, inputs))}")
    predictor = load_predictor(model, backend, batch_size=batch_size)
    info = predictor.info
    n_ok, n_err = write_results(predict_files(predictor, paths, k, batch_size), fmt, k, out, info)
    print(
        f"{n_ok} image{'s' * (n_ok != 1)} predicted, {n_err} failed | model {info.name} ({info.architecture}, "
        f"{info.backend}, temperature {info.temperature:g})",
        file=err,
    )
    return 1 if n_err else 0
