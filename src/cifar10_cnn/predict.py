"""Predictors for every model format (PyTorch, ONNX), predictions for files, and their output formats.

Images are decoded and preprocessed by images.py, the one preprocessing of predict, serve and the exported
model's users. A predictor takes uint8 (N, S, S, 3) RGB arrays, S its ModelMeta's image_size (32 for CIFAR),
and holds the model's validated ModelMeta;
every predictor is checked on a probe batch at load (outputs of the right shape, all finite).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .calibration import softmax
from .errors import UserError, first_line
from .export import onnx_session
from .images import DecodeBudget, ImageError, find_images, read_image_file
from .inference import predict_logits
from .weights import ModelMeta, decode_metadata, default_name, load_model, probe_images

BACKENDS = ("auto", "torch", "onnx")
NOT_FINITE = "the model's output for this image is not finite (NaN or infinite); the model is broken"


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The k most probable classes of each row, most probable first."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(row[j])) for j in idx] for row, idx in zip(probs, order, strict=True)]


def identity(meta: ModelMeta) -> dict[str, str]:
    """What names a model in every answer: name, version (the tensors' fingerprint), architecture."""
    return {"name": meta.name, "version": meta.version, "architecture": meta.architecture}


def finite_rows(probs: np.ndarray) -> np.ndarray:
    """Which rows of probabilities are all finite (a broken model can give NaN for some inputs only)."""
    return np.isfinite(probs).all(1)


class Predictor:
    """Logits and probabilities for batches of preprocessed images (uint8 N x S x S x 3 RGB, S meta.image_size)."""

    meta: ModelMeta
    backend: str
    batch_size: int = 256

    def _logits(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw logits (N, C) as float32, computed in batches of batch_size."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"expected uint8 images (N, {shape}), got {images.shape}")
        if len(images) == 0:
            return np.zeros((0, len(self.meta.classes)), np.float32)
        parts = [
            self._logits(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape of one image the model takes: (S, S, 3)."""
        return (self.meta.image_size, self.meta.image_size, 3)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities: softmax(logits / temperature); rows may be NaN (see finite_rows)."""
        with np.errstate(all="ignore"):
            return softmax(self.logits(images), self.meta.temperature).astype(np.float32)

    def top_k(self, images: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        return top_k(self.probabilities(images), self.meta.classes, k)

    def check(self, source: str | os.PathLike) -> None:
        """Refuse (one line) a model whose logits on a probe batch have the wrong shape or are not finite."""
        probe = probe_images(self.meta.image_size)
        try:
            logits = self.logits(probe)
        except Exception as e:  # e.g. ONNX Runtime refusing a graph whose input is not what we feed
            shape = ", ".join(map(str, self.input_shape))
            raise UserError(
                f"{source}: the model cannot run on uint8 images (N, {shape}) ({first_line(e)})"
            ) from None
        n = len(self.meta.classes)
        if logits.shape != (len(probe), n):
            raise UserError(
                f"{source}: the model gives {logits.shape[1:]} outputs per image, and its metadata names {n} classes"
            )
        if not np.isfinite(logits).all():
            raise UserError(
                f"{source}: the model's outputs are NaN or infinite on test inputs; the model is broken"
            )


class TorchPredictor(Predictor):
    """A PyTorch model in eval mode, run by inference.predict_logits (normalised with its stored mean and std)."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, batch_size: int = 256):
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.meta = meta
        self.batch_size = batch_size

    def _logits(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        return predict_logits(self.model, x, batch_size=self.batch_size, norm=self.meta.norm).numpy()


class OnnxPredictor(Predictor):
    """An exported ONNX model (input: uint8 images N x S x S x 3, S its metadata's image_size) on ONNX Runtime's
    CPU provider."""

    backend = "onnx"

    def __init__(
        self, model: bytes | str | os.PathLike, meta: ModelMeta | None = None, batch_size: int = 256
    ):
        source = model if isinstance(model, bytes) else str(model)
        self.session = onnx_session(source)  # the construction export verifies
        self.input_name = self.session.get_inputs()[0].name
        if meta is None:
            if not isinstance(source, str):
                raise ValueError("an in-memory ONNX model needs its ModelMeta")
            meta = onnx_meta(self.session, Path(source))
        self.meta = meta
        self.batch_size = batch_size

    def _logits(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]


def onnx_meta(session: Any, path: Path) -> ModelMeta:
    """The validated cifar10-cnn metadata of an ONNX model (its name, if none: the file's stem)."""
    raw = decode_metadata(session.get_modelmeta().custom_metadata_map)
    if "classes" not in raw:
        raise UserError(
            f"{path} is not an ONNX model exported by cifar10 export (no class names in its metadata)"
        )
    meta = ModelMeta.from_metadata(raw, path)
    return replace(meta, name=meta.name or default_name(path))


def load_predictor(
    path: str | os.PathLike,
    backend: str = "auto",
    *,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> Predictor:
    """A predictor for a run directory, a .safetensors file or an .onnx file, checked on a probe batch.

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
        predictor: Predictor = OnnxPredictor(path, batch_size=batch_size)
    else:
        model, meta = load_model(path)
        predictor = TorchPredictor(model, meta, batch_size=batch_size)
        if backend == "onnx":
            from .export import onnx_bytes, verification_images, verify_onnx

            data = onnx_bytes(model, meta)
            images, _ = verification_images(data_dir, required=False, size=meta.image_size)
            verify_onnx(data, model, images, norm=meta.norm)
            predictor = OnnxPredictor(data, meta, batch_size=batch_size)
    predictor.check(path)
    return predictor


# --- files -> predictions -------------------------------------------------------------------------------------


@dataclass
class FileResult:
    """The top-k classes of one file, or why it could not be read."""

    path: str
    predictions: list[tuple[str, float]] | None = None
    error: str | None = None


def predict_files(
    predictor: Predictor, paths: Sequence[Path], k: int = 3, batch_size: int = 256, workers: int | None = None
) -> Iterator[FileResult]:
    """Top-k of every file, in order: files decoded in parallel threads (memory bounded), inference batched."""
    workers = workers or min(8, os.cpu_count() or 1)
    budget, size = DecodeBudget(), predictor.meta.image_size

    def decode(path: Path) -> np.ndarray | ImageError:
        try:
            return read_image_file(path, budget, size)
        except ImageError as e:
            return e

    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            decoded = list(pool.map(decode, chunk))
            good = [d for d in decoded if isinstance(d, np.ndarray)]
            probs = predictor.probabilities(np.stack(good)) if good else np.zeros((0, 1))
            rows = iter(zip(top_k(probs, predictor.meta.classes, k), finite_rows(probs), strict=True))
            for path, d in zip(chunk, decoded, strict=True):
                if isinstance(d, ImageError):
                    yield FileResult(str(path), error=str(d))
                    continue
                top, finite = next(rows)
                yield (
                    FileResult(str(path), predictions=top)
                    if finite
                    else FileResult(str(path), error=NOT_FINITE)
                )


def write_results(
    results: Iterable[FileResult], fmt: str, k: int, out: IO[str], meta: ModelMeta | None = None
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
        model = identity(meta) if meta else None
        json.dump({"model": model, "results": rows}, out, indent=2, allow_nan=False)
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
    meta = predictor.meta
    n_ok, n_err = write_results(predict_files(predictor, paths, k, batch_size), fmt, k, out, meta)
    print(
        f"{n_ok} image{'s' * (n_ok != 1)} predicted, {n_err} failed | model {meta.name} ({meta.architecture}, "
        f"{predictor.backend}, temperature {meta.temperature:g})",
        file=err,
    )
    return 1 if n_err else 0
