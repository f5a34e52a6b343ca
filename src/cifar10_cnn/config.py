"""The run configuration: one dataclass that travels with the run, and the named recipes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SCHEDULES = ("none", "step", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "off", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (saved as config.json and in checkpoints)."""

    recipe: str = "seed"
    model: str = "seed_cnn"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "none"
    warmup_epochs: float = 0.0
    step_size: int = 10  # epochs between LR drops for schedule=step
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    crop_padding: int = 4  # random crop with this much zero padding; 0 turns it off
    flip: bool = True
    cutout: int = 0  # side of the square cut out of each training image; 0 turns it off
    seed: int = 0
    split_seed: int = 0  # the validation split's seed, separate so that all seeds share one split
    val_size: int | None = None  # None: 5000, or a tenth of --subset
    subset: int | None = None
    patience: int | None = None
    tta: bool = False  # flip test-time augmentation in the final evaluation
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.amp not in AMP_MODES:
            raise UserError(f"unknown amp mode {self.amp!r}; choose one of {', '.join(AMP_MODES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if self.subset is not None and not 10 <= self.subset <= 50_000:
            raise UserError("--subset must be between 10 and 50000")
        if self.val_size is not None and self.val_size < 0:
            raise UserError("--val-size must be 0 or more")
        if self.patience is not None and self.patience < 1:
            raise UserError("--patience must be at least 1")

    @property
    def resolved_val_size(self) -> int:
        if self.val_size is not None:
            return self.val_size
        return 5000 if self.subset is None else self.subset // 10

    @property
    def augment(self) -> str:
        parts = [f"crop{self.crop_padding}"] if self.crop_padding else []
        parts += ["flip"] if self.flip else []
        parts += [f"cutout{self.cutout}"] if self.cutout else []
        return "+".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"unknown config keys {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data)


# Named recipes: each is a set of overrides of the TrainConfig defaults.
RECIPES: dict[str, dict[str, Any]] = {
    # The classic CIFAR-10 tutorial CNN, trained the classic way.
    "seed": dict(model="seed_cnn", epochs=20, batch_size=64, lr=0.01, momentum=0.9),
}
DEFAULT_RECIPE = "seed"


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """The config of a named recipe, with the given fields replaced."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return TrainConfig(**{**RECIPES[name], "recipe": name, **overrides})
