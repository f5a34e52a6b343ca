"""The run configuration: one dataclass that travels with the run, and the named recipes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SCHEDULES = ("none", "step", "cosine", "onecycle", "linear")
OPTIMIZERS = ("sgd", "muon")
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "off", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (saved as config.json and in checkpoints)."""

    recipe: str = "seed"
    model: str = "seed_cnn"
    epochs: int = 20
    batch_size: int = 64
    micro_batch: int | None = None  # split each batch into micro-batches of this size (gradient accumulation)
    optimizer: str = "sgd"  # sgd, or muon: Muon on conv filters and SGD on the rest
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    decoupled_wd: bool = False  # weight_decay is then the per-step shrink factor at peak LR, in every group
    bias_lr_scale: float = 1.0  # LR multiplier for biases and norm shifts
    muon_lr: float = 0.24
    muon_momentum: float = 0.6
    whiten_bias_epochs: float = 0.0  # a whitening layer's bias learns for this long (its LR decays to 0)
    loss_reduction: str = "mean"  # mean, or sum over the batch (the LRs scale with it)
    schedule: str = "none"
    warmup_epochs: float = 0.0
    step_size: int = 10  # epochs between LR drops for schedule=step
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    crop_padding: int = 4  # random crop with this much padding; 0 turns it off
    crop_mode: str = "zeros"  # padding of the crop: zeros, or reflect
    flip: bool = True
    alternate_flip: bool = False  # flip each image on every other epoch instead of at random
    cutout: int = 0  # side of the square cut out of each training image; 0 turns it off
    seed: int = 0
    split_seed: int = 0  # the validation split's seed, separate so that all seeds share one split
    val_size: int | None = None  # None: 5000, or a tenth of --subset
    folds: int = 0  # cross-validation: validate on fold `fold` of this many stratified folds (0: off)
    fold: int = 0
    subset: int | None = None
    patience: int | None = None
    tta: int = (
        0  # test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror + 1-pixel shifts
    )
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    sync_bn: bool = False  # under torchrun: batch-norm statistics over the whole global batch (SyncBatchNorm)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss_reduction not in ("mean", "sum"):
            raise UserError("loss_reduction must be mean or sum")
        if self.crop_mode not in ("zeros", "reflect"):
            raise UserError("crop_mode must be zeros or reflect")
        if self.tta not in (0, 1, 2):
            raise UserError("--tta must be 0, 1 or 2")
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
        if self.folds == 1 or self.folds < 0 or not 0 <= self.fold < max(self.folds, 1):
            raise UserError("--cv needs at least 2 folds (and fold must be one of them)")
        if self.patience is not None and self.patience < 1:
            raise UserError("--patience must be at least 1")

    @property
    def resolved_val_size(self) -> int:
        if self.folds:
            return (self.subset or 50_000) // self.folds
        if self.val_size is not None:
            return self.val_size
        return 5000 if self.subset is None else self.subset // 10

    @property
    def augment(self) -> str:
        parts = (
            [f"crop{self.crop_padding}" + ("-reflect" if self.crop_mode == "reflect" else "")]
            if self.crop_padding
            else []
        )
        parts += [("alternating " if self.alternate_flip else "") + "flip"] if self.flip else []
        parts += [f"cutout{self.cutout}"] if self.cutout else []
        return "+".join(parts) or "none"

    def split_args(self) -> dict[str, Any]:
        """The arguments of data.make_splits that rebuild this run's train/validation split."""
        return dict(
            val_size=self.resolved_val_size,
            split_seed=self.split_seed,
            subset=self.subset,
            folds=self.folds,
            fold=self.fold,
        )

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
    # airbench94_muon's recipe (Jordan, 2024): 94% in 8 epochs on all 50,000 images. The loss is summed over
    # the batch, as there, so these LRs are theirs: SGD for the head (lr) and biases, Muon for conv filters.
    # Batches of 2000 run as 4 micro-batches of 500: 1.33x faster on CPU (less page-fault churn), with
    # batch-norm statistics per 500 images.
    "fast": dict(
        model="airbench",
        epochs=8,
        batch_size=2000,
        micro_batch=500,
        optimizer="muon",
        lr=0.67,
        bias_lr_scale=0.053 / 0.67,
        momentum=0.85,
        nesterov=True,
        muon_lr=0.24,
        muon_momentum=0.6,
        weight_decay=2e-6 * 2000,
        decoupled_wd=True,
        loss_reduction="sum",
        schedule="linear",
        label_smoothing=0.2,
        whiten_bias_epochs=3,
        crop_padding=2,
        crop_mode="reflect",
        alternate_flip=True,
        tta=2,
        val_size=0,
    ),
}
# The same tricks on the narrow net (32/64/128) for a few epochs: the short-budget recipe for CPUs.
RECIPES["quick"] = {
    **RECIPES["fast"],
    "model": "airbench_small",
    "epochs": 4,
    "batch_size": 1000,
    "weight_decay": 2e-6 * 1000,
    "whiten_bias_epochs": 1,
}
DEFAULT_RECIPE = "seed"


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """The config of a named recipe, with the given fields replaced."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return TrainConfig(**{**RECIPES[name], "recipe": name, **overrides})
