"""Final weights as safetensors: what a trained model is, with the metadata needed to use it.

Weights are read with safetensors, so loading a file never runs code from it. A model's identity (its
`version`) is a fingerprint of its tensors, so a change of metadata does not change the version. Metadata
(of a weights file or an exported ONNX model) is untrusted: it is validated once, at load, into a ModelMeta,
and a model whose weights or outputs are not finite is refused there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from .augment import CIFAR10_NORM, Norm
from .constants import CLASSES, IMAGE_SIZE, MAX_IMAGE_SIZE, MEAN, MIN_IMAGE_SIZE, STD
from .errors import CheckpointError, UserError, first_line
from .inference import predict_logits
from .models import count_params, create_model, list_models
from .runs import MARKER, RUN_FILES, Run, write_atomic

MAX_CLASSES = 10_000
MAX_TEXT = 200  # characters of a name, a class name, an architecture or a version
PROBE_IMAGES = 8


def probe_images(size: int = IMAGE_SIZE) -> np.ndarray:
    """The probe batch every loaded model must pass (finite outputs of the right shape): load_model's check,
    each predictor's and the service's readiness. uint8 (PROBE_IMAGES, size, size, 3): black, white, noise."""
    probe = np.random.default_rng(0).integers(0, 256, (PROBE_IMAGES, size, size, 3), dtype=np.uint8)
    probe[0], probe[1] = 0, 255
    return probe


@dataclass(frozen=True)
class ModelMeta:
    """What a model is and how to use it, validated: identity, architecture, classes, input size, normalisation,
    calibration."""

    architecture: str
    classes: tuple[str, ...] = CLASSES
    image_size: int = IMAGE_SIZE  # the side of the square uint8 images it takes (files without it: 32)
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    temperature: float = 1.0
    name: str = ""  # "" until load: then the metadata's name, else default_name(path)
    version: str = ""
    params: int | None = None
    test_accuracy: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, raw: Mapping[str, Any], source: str | os.PathLike) -> ModelMeta:
        """A ModelMeta from decoded metadata (every value untrusted); a one-line CheckpointError names the field."""
        v = _Validator(raw, str(source))
        return cls(
            architecture=v.text("architecture", required=True),
            classes=v.classes(),
            image_size=v.side("image_size"),
            mean=v.triple("mean", MEAN, 0.0, 1.0, low_open=False),
            std=v.triple("std", STD, 0.0, 1.0, low_open=True),
            temperature=v.number("temperature", 1.0, 0.0, 1e4, low_open=True),
            name=v.text("name") or "",
            version=v.text("version") or "",
            params=v.integer("params"),
            test_accuracy=v.number("test_accuracy", None, 0.0, 1.0, low_open=False),
            config=v.mapping("config"),
        )

    @property
    def norm(self) -> Norm:
        """The input normalisation the model was trained with: what every runner of it must use."""
        return (self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists for tuples."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


class _Validator:
    """Reads one field at a time from untrusted metadata, refusing wrong types, lengths and ranges in one line."""

    def __init__(self, raw: Mapping[str, Any], source: str):
        self.raw, self.source = raw, source

    def fail(self, key: str, what: str) -> CheckpointError:
        shown = repr(self.raw.get(key))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return CheckpointError(f"{self.source}: metadata {key!r} is {shown}; it must be {what}")

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.raw.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
            raise self.fail(key, f"a printable string of 1 to {MAX_TEXT} characters")
        return value

    def classes(self) -> tuple[str, ...]:
        value = self.raw.get("classes", list(CLASSES))
        what = f"a list of 2 to {MAX_CLASSES:,} distinct class names (strings of 1 to {MAX_TEXT} characters)"
        if not isinstance(value, list) or not 2 <= len(value) <= MAX_CLASSES:
            raise self.fail("classes", what)
        if not all(isinstance(c, str) and 0 < len(c) <= MAX_TEXT and c.isprintable() for c in value):
            raise self.fail("classes", what)
        if len(set(value)) != len(value):
            raise self.fail("classes", what)
        return tuple(value)

    def number(
        self, key: str, default: float | None, lo: float, hi: float, *, low_open: bool
    ) -> float | None:
        value = self.raw.get(key, default)
        if value is None:
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (lo < value if low_open else lo <= value) or value > hi:
            raise self.fail(key, f"a number in {'(' if low_open else '['}{lo:g}, {hi:g}]")
        return float(value)

    def triple(
        self, key: str, default: tuple[float, ...], lo: float, hi: float, *, low_open: bool
    ) -> tuple[float, ...]:
        value = self.raw.get(key, list(default))
        what = f"a list of 3 numbers in {'(' if low_open else '['}{lo:g}, {hi:g}]"
        if not isinstance(value, list) or len(value) != 3:
            raise self.fail(key, what)
        for x in value:
            ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            if not ok or not (lo < x if low_open else lo <= x) or x > hi:
                raise self.fail(key, what)
        return tuple(float(x) for x in value)

    def integer(self, key: str) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**13:
            raise self.fail(key, "a whole number of parameters, 0 or more")
        return value

    def side(self, key: str) -> int:
        value = self.raw.get(key, IMAGE_SIZE)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
            raise self.fail(key, f"a whole number of pixels, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.raw.get(key) or {}
        if not isinstance(value, dict):
            raise self.fail(key, "a JSON object")
        return value


def decode_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    """String metadata (safetensors, ONNX) with JSON values decoded; a value that is not JSON stays a string."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            out[key] = value
    return out


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's tensors: ties stored results (e.g. robustness) to the weights they measured."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_weights(
    model: nn.Module,
    path: Path,
    *,
    architecture: str,
    config: dict[str, Any] | None = None,
    classes: tuple[str, ...] = CLASSES,
    temperature: float | None = None,
    norm: Norm = CIFAR10_NORM,
    image_size: int = IMAGE_SIZE,
    extra: dict[str, Any] | None = None,
) -> None:
    """Final weights as safetensors, with what is needed to use them in the metadata (norm: the input
    normalisation the model was trained with; training's is CIFAR-10's; image_size: the side of its input)."""
    metadata = {
        "architecture": architecture,
        "classes": json.dumps(list(classes)),
        "image_size": json.dumps(image_size),
        "mean": json.dumps(list(norm[0])),
        "std": json.dumps(list(norm[1])),
        "config": json.dumps(config or {}),
        **({"temperature": json.dumps(float(temperature))} if temperature is not None else {}),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, save(tensors, metadata=metadata))


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a weights file, JSON values decoded (unvalidated: load_model validates it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    return decode_metadata(raw)


def read_temperature(path: str | os.PathLike) -> float | None:
    """The temperature stored with a weights file (validated as load_model does), or None if it holds none."""
    path = Path(path)
    raw = read_metadata(path)
    if raw.get("temperature") is None:
        return None
    return ModelMeta.from_metadata({"architecture": "x", "temperature": raw["temperature"]}, path).temperature


def weights_path(path: str | os.PathLike) -> Path:
    """A run directory's model.safetensors, or the given .safetensors file."""
    path = Path(path)
    if path.is_dir():
        weights = path / RUN_FILES["weights"]
        if not weights.is_file():
            raise UserError(
                f"run {path} has no finished model (model.safetensors); finish it with: cifar10 train --resume {path}"
            )
        return weights
    if path.exists() and not path.is_file():
        raise UserError(
            f"{path} is not a regular file (a device, FIFO or socket); give a run directory or a .safetensors file"
        )
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a run directory or a .safetensors file")
    return path


def run_dir_of(path: str | os.PathLike) -> Path | None:
    """The run directory a model path names: the directory itself, or the run holding this model.safetensors."""
    path = Path(path)
    if path.is_dir():
        return path
    parent = path.parent
    if path.name == RUN_FILES["weights"] and (
        (parent / MARKER).is_file() or (parent / RUN_FILES["results"]).is_file()
    ):
        return parent
    return None


def default_name(path: str | os.PathLike) -> str:
    """A model's name from its path alone (never from metadata): the run directory's name, or the file's stem."""
    run = run_dir_of(path)
    name = (run.resolve().name if run is not None else Path(path).stem) or "model"
    return name[:MAX_TEXT]


def check_finite(
    model: nn.Module, source: str | os.PathLike, norm: Norm = CIFAR10_NORM, size: int = IMAGE_SIZE
) -> None:
    """Refuse a model whose tensors, or whose logits on a probe batch, are not all finite (NaN or infinite)."""
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{source}: tensor {bad[0]} holds NaN or infinite values; the model is broken")
    probe = torch.from_numpy(probe_images(size)).permute(0, 3, 1, 2)
    if not torch.isfinite(predict_logits(model, probe, norm=norm)).all():
        raise CheckpointError(
            f"{source}: the model's outputs are NaN or infinite on test inputs; the model is broken"
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """A trained model (eval mode) from a run directory or a .safetensors file, and its validated metadata.

    The version is the fingerprint of the tensors; name and test accuracy come from the metadata, else from
    the run directory (its name, its results.json).
    """
    weights = weights_path(path)
    raw = read_metadata(weights)
    meta = ModelMeta.from_metadata(raw, weights)
    if meta.architecture not in list_models():
        raise UserError(
            f"{weights} is for architecture {meta.architecture!r}, which this version does not know "
            f"(known: {', '.join(list_models())})"
        )
    try:
        model = create_model(meta.architecture, num_classes=len(meta.classes), image_size=meta.image_size)
    except UserError as e:  # a size the net does not run on
        raise CheckpointError(f"{weights}: metadata 'image_size' does not fit ({e})") from None
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(
            f"{weights} does not fit architecture {meta.architecture} with the {len(meta.classes)} classes "
            f"its metadata 'classes' names at its {meta.image_size}x{meta.image_size} input ({first_line(e)})"
        ) from None
    check_finite(model, weights, meta.norm, meta.image_size)
    run = run_dir_of(path)
    results = _run_results(run, weights) if run is not None else {}
    meta = replace(
        meta,
        name=meta.name or default_name(path),
        version=model_fingerprint(model)[:12],
        params=count_params(model),
        test_accuracy=meta.test_accuracy if meta.test_accuracy is not None else results.get("test_accuracy"),
    )
    return model.to(device).eval(), meta


def _run_results(run: Path, source: Path) -> dict[str, Any]:
    """The run's test accuracy (validated, as metadata is), if its results.json is readable."""
    try:
        results = Run(run).read_results()
    except UserError:
        return {}
    acc = ModelMeta.from_metadata(
        {"architecture": "x", "test_accuracy": results.get("test_accuracy")}, source
    )
    return {"test_accuracy": acc.test_accuracy}
