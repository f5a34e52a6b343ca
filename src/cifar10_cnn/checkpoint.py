"""Files that hold models: atomic training checkpoints (.pt) and final weights (.safetensors).

Checkpoints are read with torch.load(weights_only=True) and weights with safetensors, so loading a file
never runs code from it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from .data import CLASSES, MEAN, STD
from .errors import CheckpointError, UserError
from .models import create_model, list_models


def write_bytes_atomic(path: Path, payload: bytes | memoryview) -> None:
    """Write to a temporary file beside path, fsync, then rename: path is always whole, new or old."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save, atomically; serialised in memory first so that a full disk is a plain OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint, safely (no code runs); a missing or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({reason[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a cifar10-cnn checkpoint")
    return state


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
    write_bytes_atomic(path, save(tensors, metadata=metadata))


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
        raise CheckpointError(
            f"{weights} does not fit architecture {arch} ({str(e).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), meta
