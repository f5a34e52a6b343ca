"""Training checkpoints (.pt): the whole training state, written atomically, read without running code.

Checkpoints are read with torch.load(weights_only=True), so loading a file never runs code from it.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line
from .runs import write_atomic


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save, atomically; serialised in memory first so that a full disk is a plain OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getbuffer())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint, safely (no code runs); a missing or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({first_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a cifar10-cnn checkpoint")
    return state
