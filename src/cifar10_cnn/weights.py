"""Final weights as safetensors: what a trained model is, with the metadata needed to use it.

Weights are read with safetensors, so loading a file never runs code from it. A model's identity (its
`version`) is a fingerprint of its tensors, so a change of metadata does not change the version.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from .data import CLASSES, MEAN, STD
from .errors import CheckpointError, UserError, first_line
from .models import create_model, list_models
from .runs import write_atomic


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
    extra: dict[str, Any] | None = None,
) -> None:
    """Final weights as safetensors, with what is needed to use them in the metadata."""
    metadata = {
        "architecture": architecture,
        "classes": json.dumps(list(classes)),
        "mean": json.dumps(list(MEAN)),
        "std": json.dumps(list(STD)),
        "config": json.dumps(config or {}),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, save(tensors, metadata=metadata))


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a weights file, JSON values decoded."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def weights_path(path: str | os.PathLike) -> Path:
    """A run directory's model.safetensors, or the given .safetensors file."""
    path = Path(path)
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise UserError(
                f"run {path} has no finished model (model.safetensors); finish it with: cifar10 train --resume {path}"
            )
        return weights
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a run directory or a .safetensors file")
    return path


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model (eval mode) from a run directory or a .safetensors file, and its metadata."""
    weights = weights_path(path)
    meta = read_metadata(weights)
    arch = meta.get("architecture")
    if arch not in list_models():
        raise UserError(
            f"{weights} is for architecture {arch!r}, which this version does not know "
            f"(known: {', '.join(list_models())})"
        )
    model = create_model(arch, num_classes=len(meta.get("classes", CLASSES)))
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{weights} does not fit architecture {arch} ({first_line(e)})") from None
    return model.to(device).eval(), meta
