"""Training checkpoints (.pt): the whole training state, written atomically, read without running code.

Checkpoints are read with torch.load(weights_only=True), so loading a file never runs code from it.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


@dataclass
class Progress:
    """What the loop carries from epoch to epoch: the epochs done, their metrics and the early-stopping count."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_acc: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    def record(self, row: dict[str, Any]) -> bool:
        """Add an epoch's metrics row; True if its validation accuracy is the best so far."""
        self.epoch = row["epoch"]
        self.history.append(row)
        if row["val_acc"] is None:
            return False
        if self.best_val_acc is None or row["val_acc"] > self.best_val_acc:
            self.best_val_acc, self.best_epoch, self.bad_epochs = row["val_acc"], self.epoch, 0
            return True
        self.bad_epochs += 1
        return False


@dataclass
class TrainState:
    """The whole training state: restoring it continues a run exactly where it stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data_gen: torch.Generator  # data order and augmentation
    device: torch.device
    config: dict[str, Any]
    progress: Progress = field(default_factory=Progress)

    def to_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if cuda else [],
                "data": self.data_gen.get_state(),
            },
            **asdict(self.progress),
            "config": self.config,
        }

    def save(self, path: Path) -> None:
        save_atomic(self.to_dict(), path)

    def restore(self, path: Path) -> None:
        """Load a checkpoint into the live objects; one that does not fit this run is a one-line error."""
        # Read onto the CPU: the RNG states must stay CPU tensors (torch.set_rng_state refuses others, so a
        # CUDA map_location failed every resume on a GPU: tests/test_cuda.py on an H200); load_state_dict
        # moves the weights and the optimizer's state to the live parameters' device.
        state = load_checkpoint(path, map_location="cpu")
        missing = [k for k in (*CHECKPOINT_KEYS, *PROGRESS_KEYS) if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it cannot be resumed")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            self.data_gen.set_state(state["rng"]["data"])
            self._restore_cuda_rng(state["rng"].get("cuda"))
            self.progress = Progress(**{k: state[k] for k in PROGRESS_KEYS})
            _check_progress(self.progress)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit this run's model and optimizer ({first_line(e)})"
            ) from None

    def _restore_cuda_rng(self, cuda_rng: Any) -> None:
        if self.device.type == "cuda" and cuda_rng is not None and len(cuda_rng):
            torch.cuda.set_rng_state(cuda_rng[0] if isinstance(cuda_rng, list) else cuda_rng, self.device)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng")
PROGRESS_KEYS = tuple(f.name for f in fields(Progress))


def _check_progress(p: Progress) -> None:
    if not isinstance(p.epoch, int) or p.epoch < 0 or not isinstance(p.history, list):
        raise ValueError(f"epoch {p.epoch!r} and history are not those of a run")
    if len(p.history) != p.epoch or not all(isinstance(r, dict) and "val_acc" in r for r in p.history):
        raise ValueError(f"its history has {len(p.history)} rows for {p.epoch} epochs")
