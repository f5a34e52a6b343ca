"""Export a trained model as safetensors (weights + metadata), ONNX (dynamic batch) or TorchScript, verified.

    cifar10 export runs/<run> --format onnx        # ./<run>.onnx, checked on 256 CIFAR-10 test images

ONNX and TorchScript exports take what images.preprocess returns: uint8 RGB images (N, S, S, 3), N any, S the
model's input size (its metadata's `image_size`: 32 for CIFAR, a folder run's --image-size).
The model's stored normalisation (its metadata's mean and std, applied by augment.normalize as predict's
PyTorch path applies it) is inside the graph; the output is raw logits (N, C), C the classes the metadata
names. Divide them by the metadata's `temperature` before the softmax. An export is written to a temporary
file and loaded back (ONNX in `onnx_session`, the session predict and serve run); it replaces --out only if
its logits match PyTorch's within ATOL (max absolute difference; ONNX and TorchScript also at batch size 1).
`cifar10 export` checks on the first 256 CIFAR-10 test images and refuses to run without them; the in-memory
ONNX conversion of `predict`/`serve --backend onnx` checks on random images when CIFAR-10 is not found.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .augment import CIFAR10_NORM, Norm, normalize
from .constants import IMAGE_SIZE
from .errors import DataError, UserError, first_line
from .inference import predict_logits
from .runs import check_writable_dir, write_atomic
from .version import __version__
from .weights import ModelMeta, default_name, load_model, save_weights, weights_path

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt"}
ATOL = 1e-4
VERIFY_IMAGES = 256


def input_doc(size: int = IMAGE_SIZE) -> str:
    """The contract of an exported model, in its metadata and doc string."""
    return (
        f"images: uint8 RGB (N, {size}, {size}, 3), preprocessed as cifar10_cnn.images.preprocess does "
        f"(EXIF orientation, RGB on white, centre square crop, antialiased bicubic resize to {size}x{size}); "
        "output logits: float32 (N, C); probabilities = softmax(logits / temperature)"
    )


class ExportError(UserError):
    """An exported model does not reproduce the PyTorch model."""


class UInt8Classifier(nn.Module):
    """The model behind the preprocessing contract: uint8 RGB images (N, S, S, 3) in, logits out."""

    def __init__(self, model: nn.Module, norm: Norm):
        super().__init__()
        self.model = model
        self.norm = (tuple(norm[0]), tuple(norm[1]))  # constants of the graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # augment.normalize, as predict's PyTorch path runs it: the same constants and operations.
        return self.model(normalize(images.permute(0, 3, 1, 2), norm=self.norm))


def wrap(model: nn.Module, meta: ModelMeta) -> UInt8Classifier:
    """A copy of the model, contiguous fp32 in eval mode, behind the uint8 input and the stored normalisation."""
    inner = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    return UInt8Classifier(inner, meta.norm).eval()


def torch_logits(
    model: nn.Module, images: np.ndarray, batch_size: int = 256, norm: Norm = CIFAR10_NORM
) -> np.ndarray:
    """The reference: the PyTorch model's logits for uint8 NHWC images (norm: the model's stored one)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return predict_logits(model, x, batch_size=batch_size, norm=norm).numpy()


def export_metadata(meta: ModelMeta) -> dict[str, Any]:
    """What a deployed model needs to be used and identified, for every format's metadata."""
    return {**meta.to_dict(), "input": input_doc(meta.image_size), "producer": f"cifar10-cnn {__version__}"}


def example_input(meta: ModelMeta) -> torch.Tensor:
    """What the exporters trace: two black images of the model's input size."""
    return torch.zeros(2, meta.image_size, meta.image_size, 3, dtype=torch.uint8)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, deprecation warnings and missing-torchvision log lines."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def onnx_bytes(model: nn.Module, meta: ModelMeta) -> bytes:
    """The model as an ONNX graph (opset 20) with a dynamic batch dimension and the metadata as properties."""
    wrapper = wrap(model, meta)
    example = example_input(meta)
    try:
        with _quiet():
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
                verbose=False,
                optimize=True,
            )
            proto = program.model_proto
    except Exception as e:  # the exporter's errors are many and internal; one line says which model failed
        raise ExportError(f"ONNX export of {meta.architecture} failed ({first_line(e)})") from None
    proto.doc_string = input_doc(meta.image_size)
    for key, value in export_metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString()


def verification_images(
    data_dir: str | os.PathLike | None = None,
    *,
    required: bool = True,
    n: int = VERIFY_IMAGES,
    size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, str]:
    """The first n CIFAR-10 test images (never downloaded here), resized to size x size as images.preprocess
    resizes; random images when not required."""
    from .data import load_cifar10, resolve_data_dir

    try:
        data = load_cifar10(data_dir, download=False, progress=False)
        if size == IMAGE_SIZE:
            return data.test_images[:n], "CIFAR-10 test images"
        from PIL import Image

        from .images import preprocess

        resized = [preprocess(Image.fromarray(img), size) for img in data.test_images[:n]]
        return np.stack(resized), f"CIFAR-10 test images resized to {size}x{size}"
    except DataError:
        if required:
            raise UserError(
                f"export checks the exported model on real CIFAR-10 test images, and none were found in "
                f"{resolve_data_dir(data_dir)}; pass --data-dir (or set CIFAR10_DATA)"
            ) from None
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8), "random images (CIFAR-10 not found)"


def run_test_images(
    source: Path, data_dir: str | os.PathLike | None, n: int = VERIFY_IMAGES, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, str] | None:
    """The first n test images of a run trained on a folder of images (its test_files.json), if it is one;
    read from data_dir when given (the folder moved), else from where the run recorded it."""
    from .datasets import recorded
    from .images import ImageError, read_image_file
    from .weights import run_dir_of

    run = run_dir_of(source)
    root, files = recorded(run) if run is not None else (None, None)
    root = data_dir or root
    if files is None or root is None:
        return None
    try:
        images = [read_image_file(Path(root) / str(f), size=size) for f in files[:n]]
        return np.stack(images), "test images of the run"
    except (ImageError, ValueError) as e:
        raise UserError(
            f"export checks the exported model on the run's test images, and {root} does not hold them "
            f"({first_line(e)}); pass --data-dir the folder the run was trained on"
        ) from None


def _check(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> float:
    if got.shape != want.shape:
        raise ExportError(f"the {name} export gives logits of shape {got.shape}, PyTorch {want.shape}")
    diff = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
    if not diff <= atol:  # also catches NaN
        raise ExportError(
            f"the {name} export does not reproduce the PyTorch model: max |logit difference| {diff:.3g} > {atol:g}"
        )
    return diff


def onnx_session(model: bytes | str | os.PathLike) -> Any:
    """The ONNX Runtime session of a model (bytes or a file): the one construction that export verifies and
    predict and serve run, so what is verified is what is served. A model ONNX Runtime refuses is one line."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Idle worker threads sleep instead of spinning: on a small machine the spinning takes the cores that
    # the web server's event loop and image decoding need between batches.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        shown = "the model" if isinstance(model, bytes) else model
        raise UserError(f"{shown} is not a usable ONNX model ({first_line(e)})") from None


def verify_onnx(
    data: bytes | str | os.PathLike,
    model: nn.Module,
    images: np.ndarray,
    atol: float = ATOL,
    norm: Norm = CIFAR10_NORM,
) -> float:
    """Max |logit difference| of the ONNX model against PyTorch (normalised with norm, the model's stored
    one), at the full batch and at batch size 1, run in the session predict and serve use."""
    session = onnx_session(data)
    want = torch_logits(model, images, norm=norm)
    got = session.run(None, {"images": np.ascontiguousarray(images)})[0]
    one = session.run(None, {"images": np.ascontiguousarray(images[:1])})[0]
    return max(_check("ONNX", got, want, atol), _check("ONNX (batch 1)", one, want[:1], atol))


def verify_torchscript(
    path: Path, model: nn.Module, images: np.ndarray, atol: float = ATOL, norm: Norm = CIFAR10_NORM
) -> float:
    with _quiet():
        scripted = torch.jit.load(str(path), map_location="cpu")  # the file this process just wrote
    with torch.inference_mode():
        got = scripted(torch.from_numpy(np.ascontiguousarray(images))).numpy()
        one = scripted(torch.from_numpy(np.ascontiguousarray(images[:1]))).numpy()
    want = torch_logits(model, images, norm=norm)
    return max(_check("TorchScript", got, want, atol), _check("TorchScript (batch 1)", one, want[:1], atol))


def verify_safetensors(
    path: Path, model: nn.Module, images: np.ndarray, atol: float = ATOL, norm: Norm = CIFAR10_NORM
) -> float:
    """The reloaded file, run with its own stored normalisation, against the model run with norm."""
    loaded, meta = load_model(path)
    want = torch_logits(model, images, norm=norm)
    return _check("safetensors", torch_logits(loaded, images, norm=meta.norm), want, atol)


def _write(fmt: str, tmp: Path, model: nn.Module, meta: ModelMeta) -> None:
    data = export_metadata(meta)
    if fmt == "safetensors":
        saved = ("architecture", "classes", "mean", "std", "config", "image_size")
        extra = {k: v for k, v in data.items() if k not in saved}
        save_weights(
            model, tmp, architecture=meta.architecture, config=meta.config, classes=meta.classes,
            norm=meta.norm, image_size=meta.image_size, extra=extra,
        )  # fmt: skip
    elif fmt == "onnx":
        write_atomic(tmp, onnx_bytes(model, meta))
    else:
        with _quiet():
            traced = torch.jit.trace(wrap(model, meta), example_input(meta))
            buf = io.BytesIO()
            torch.jit.save(traced, buf, _extra_files={"cifar10_cnn.json": json.dumps(data)})
        write_atomic(tmp, buf.getvalue())


def default_out(source: Path, fmt: str) -> Path:
    """The output file when --out is not given: named after the input path (never its metadata), here."""
    return Path(default_name(source) + FORMATS[fmt])


def _check_out(out: Path, weights: Path, fmt: str, force: bool) -> None:
    """Refuse (one line) an --out that is not a new or replaceable regular file in an existing folder."""
    if out.is_dir():
        raise UserError(
            f"--out {out} is a directory; give a file name such as {out / ('model' + FORMATS[fmt])}"
        )
    if out.exists() and not out.is_file():  # replacing it would replace the device node itself
        raise UserError(f"--out {out} is not a regular file (a device, FIFO or socket); give a file name")
    if out.exists() and out.resolve() == weights.resolve():
        raise UserError(f"--out {out} is the model being exported; choose another file")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    check_writable_dir(out.parent, shown=out)  # a folder above --out that is a file, or read-only
    if not out.parent.is_dir():
        raise UserError(f"the folder {out.parent} does not exist")


def export_model(
    source: str | os.PathLike,
    out: str | os.PathLike | None = None,
    fmt: str = "safetensors",
    *,
    data_dir: str | os.PathLike | None = None,
    force: bool = False,
    atol: float = ATOL,
    images: np.ndarray | None = None,
) -> dict[str, Any]:
    """Export a run's model (or a .safetensors file) to out, verified; nothing is left behind if it fails."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    source = Path(source)
    if source.suffix.lower() == ".onnx":
        raise UserError(f"{source} is already exported; export from a run directory or a .safetensors file")
    weights = weights_path(source)
    model, meta = load_model(source)
    out = Path(out) if out is not None else default_out(source, fmt)
    _check_out(out, weights, fmt, force)
    what = "given images"
    if images is None:
        size = meta.image_size
        images, what = run_test_images(source, data_dir, size=size) or verification_images(
            data_dir, size=size
        )
    t0 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write(fmt, tmp, model, meta)
        verify = {"safetensors": verify_safetensors, "onnx": verify_onnx, "torchscript": verify_torchscript}[
            fmt
        ]
        diff = verify(tmp, model, images, atol, norm=meta.norm)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "format": fmt,
        "path": str(out),
        "bytes": out.stat().st_size,
        "model": meta.name,
        "architecture": meta.architecture,
        "max_abs_diff": diff,
        "atol": atol,
        "verified_on": f"{len(images)} {what}",
        "seconds": time.perf_counter() - t0,
    }


def export_command(
    source: str | os.PathLike,
    out: str | os.PathLike | None,
    fmt: str,
    *,
    data_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> int:
    """`cifar10 export`: export, verify, and say what was written."""
    r = export_model(source, out, fmt, data_dir=data_dir, force=force)
    print(
        f"exported {r['model']} ({r['architecture']}) as {r['format']} to {r['path']} ({r['bytes'] / 1e6:.1f} MB); "
        f"verified on {r['verified_on']}: max |logit difference| {r['max_abs_diff']:.2g} <= {r['atol']:g}"
    )
    return 0
