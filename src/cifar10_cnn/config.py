"""The run configuration: one dataclass that travels with the run, and the named recipes."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constants import IMAGE_SIZE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from .errors import UserError
from .files import read_json_object

if TYPE_CHECKING:
    import torch

SCHEDULES = ("none", "step", "cosine", "onecycle", "linear")
OPTIMIZERS = ("sgd", "muon")
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "off", "fp16", "bf16")
LOSS_REDUCTIONS = ("mean", "sum")
CROP_MODES = ("zeros", "reflect")
DATASETS = ("auto", "cifar10", "cifar100", "folder")
LABELS = ("fine", "coarse")


def opt(default: Any, help: str = "", *, choices: tuple | None = None, cli: bool = True, **kw: Any) -> Any:
    """A TrainConfig field whose metadata makes its command-line option (--name-with-dashes)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli, **kw})


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (saved as config.json and in checkpoints).

    Each field with cli=True is a `cifar10 train` / `cifar10 tune` option; the help texts are here, once.
    """

    recipe: str = opt("seed", cli=False)
    dataset: str = opt(
        "auto",
        "cifar10, cifar100, or folder (--data-dir holds class subfolders); auto: what --data-dir holds",
        choices=DATASETS,
    )
    labels: str = opt(
        "fine", "CIFAR-100's labels: fine (100 classes) or coarse (20 superclasses)", choices=LABELS
    )
    max_classes: int = opt(1000, "the most class folders a --data-dir of your own images may hold")
    image_size: int = opt(
        IMAGE_SIZE,
        f"the side images of a --data-dir of your own are resized to ({MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}; "
        "CIFAR's are 32); every net takes any size from its minimum (airbench 9, vgg11 32, the others 8)",
    )
    model: str = opt(
        "seed_cnn", "architecture by name: seed_cnn, resnet18, airbench, ... (a wrong name lists all)"
    )
    epochs: int = opt(20, "passes over the training images")
    batch_size: int = opt(64, "images per optimisation step (the global batch under torchrun)")
    micro_batch: int | None = opt(
        None, "accumulate each batch from micro-batches of this size (a recipe's: not on CUDA)"
    )
    # The micro-batch is the recipe's, not the user's: a CPU choice (faster there); CUDA steps whole batches.
    micro_batch_by_recipe: bool = opt(False, cli=False)
    optimizer: str = opt("sgd", "sgd, or muon (Muon on conv filters, SGD on the rest)", choices=OPTIMIZERS)
    lr: float = opt(0.01, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(0.0, "L2 weight decay (with --decoupled-wd: the per-step shrink at peak LR)")
    decoupled_wd: bool = opt(False, "decoupled weight decay, the same shrink factor in every group")
    bias_lr_scale: float = opt(1.0, "LR multiplier for biases and norm shifts")
    muon_lr: float = opt(0.24, "Muon's learning rate (conv filters)")
    muon_momentum: float = opt(0.6, "Muon's momentum")
    whiten_bias_epochs: float = opt(0.0, "a whitening layer's bias learns for this long (its LR decays to 0)")
    loss_reduction: str = opt(
        "mean", "mean, or sum over the batch (the LRs scale with it)", choices=LOSS_REDUCTIONS
    )
    schedule: str = opt("none", "LR schedule after the warm-up", choices=SCHEDULES)
    warmup_epochs: float = opt(0.0, "linear warm-up length (fractions allowed)")
    step_size: int = opt(10, "epochs between LR drops for --schedule step")
    step_gamma: float = opt(0.1, "LR factor at each drop for --schedule step")
    label_smoothing: float = opt(0.0, "label smoothing of the loss")
    crop_padding: int = opt(4, "random-crop padding in pixels (0: no crop)")
    crop_mode: str = opt("zeros", "padding of the random crop", choices=CROP_MODES)
    flip: bool = opt(True, "random horizontal flip")
    alternate_flip: bool = opt(False, "flip each image on alternate epochs instead of at random")
    cutout: int = opt(0, "cutout square size in pixels (0: off)")
    train_sizes: str = opt(
        "",
        "progressive resizing: the first epochs train on images downscaled to these sides, e.g. 16/24/24 "
        "(epoch 1 at 16x16, 2 and 3 at 24x24); later epochs and every evaluation at full size",
    )
    seed: int = opt(0, "the seed of initialisation, data order and augmentation")
    split_seed: int = opt(0, "seed of the validation split (shared by all --seed values)")
    val_size: int | None = opt(None, "images held out for validation (default 5000, or a tenth of --subset)")
    folds: int = opt(0, cli=False)  # cross-validation: validate on fold `fold` of this many folds (0: off)
    fold: int = opt(0, cli=False)
    # val_size is the recipe's (e.g. quick's 1,000), not the user's: sized_for makes it a tenth of a small set.
    val_size_by_recipe: bool = opt(False, cli=False)
    subset: int | None = opt(None, "train on the first N training images only")
    patience: int | None = opt(None, "stop after N epochs without a better validation accuracy")
    # The two test-time augmentation options, declared here once: `cifar10 evaluate` takes them too.
    tta: int = opt(0, "test-time augmentation of the test evaluation: 1 mirror, 2 mirror + 1-pixel shifts "
                   "(alone: 1)", choices=(0, 1, 2), const=1)  # fmt: skip
    tta_margin: float = opt(
        1.0, "TTA only for test images whose top-two class probabilities are closer than this (1: all)"
    )
    device: str = opt("auto", "where to train", choices=DEVICES)
    amp: str = opt(
        "auto", "mixed precision (auto: on for CUDA and for CPUs with native bf16)", choices=AMP_MODES
    )
    channels_last: bool = opt(True, "channels-last memory format (faster convolutions on CPU and GPU)")
    compile: bool = opt(False, "torch.compile the training steps (compile time counts; measured in README)")
    deterministic: bool = opt(
        False,
        "deterministic kernels where PyTorch has them (torch.use_deterministic_algorithms): a resumed CUDA run "
        "is then bit-identical unless a layer has none (airbench's global max-pool: a warning says so)",
    )
    sync_bn: bool = opt(False, "under torchrun: batch-norm statistics over the global batch (SyncBatchNorm)")

    def micro_batch_on(self, device: torch.device) -> int | None:
        """The micro-batch that steps run in on device: none of a recipe's on CUDA (measured on an H200, fast's
        batches of 2,000 ran 2.1x faster whole than as four of 500: docs/RESULTS.md "On a GPU"); a user's
        everywhere. MPS keeps the recipe's (not measured)."""
        return None if self.micro_batch_by_recipe and device.type == "cuda" else self.micro_batch

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()

    def _check_types(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), _TYPES[hints[f.name]]
            if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
                if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                    setattr(self, f.name, float(value))  # JSON writes 1.0 as 1
                    continue
                raise UserError(
                    f"config value {f.name}={value!r} must be {' or '.join(t.__name__ for t in allowed)}"
                )

    def _check_values(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise UserError("loss_reduction must be mean or sum")
        if self.crop_mode not in CROP_MODES:
            raise UserError("crop_mode must be zeros or reflect")
        if self.dataset not in DATASETS or self.labels not in LABELS:
            raise UserError(f"--dataset must be one of {', '.join(DATASETS)}; --labels fine or coarse")
        if self.labels != "fine" and self.dataset != "cifar100":
            raise UserError("--labels coarse is for --dataset cifar100 (its 20 superclasses)")
        if self.max_classes < 2:
            raise UserError("--max-classes must be at least 2")
        self._check_image_size()
        check_tta(self.tta, self.tta_margin)
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
        if self.split_seed < 0:  # numpy's generators take no negative seed
            raise UserError("--split-seed must be 0 or more")
        if self.folds == 1 or self.folds < 0 or not 0 <= self.fold < max(self.folds, 1):
            raise UserError("--cv needs at least 2 folds (and fold must be one of them)")
        if self.patience is not None and self.patience < 1:
            raise UserError("--patience must be at least 1")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise UserError("--micro-batch must be at least 1")
        sizes = self.sizes_of_epochs  # a bad list raises here
        if len(sizes) > self.epochs:
            raise UserError(f"--train-sizes lists {len(sizes)} epochs but the run has {self.epochs}")
        if any(s > self.image_size for s in sizes):
            raise UserError(f"--train-sizes {self.train_sizes[:40]} downscales the images, so its sides must be "
                            f"at most the image size, {self.image_size}")  # fmt: skip
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")

    def _check_image_size(self) -> None:
        """A bounded side (memory: the whole set is held as uint8), and only for a folder: CIFAR's are 32x32."""
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise UserError(
                f"--image-size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels (the whole training set is held "
                f"in memory), not {self.image_size}"
            )
        if self.image_size != IMAGE_SIZE and self.dataset in ("cifar10", "cifar100"):
            raise UserError(
                f"--image-size {self.image_size} is for a --data-dir of your own images; {self.dataset}'s images "
                f"are {IMAGE_SIZE}x{IMAGE_SIZE} (leave --image-size out)"
            )

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

    @property
    def sizes_of_epochs(self) -> list[int]:
        """--train-sizes as a list: the side of the training images of epochs 1, 2, ... (then full size)."""
        if not self.train_sizes:
            return []
        try:
            sizes = [int(part) for part in self.train_sizes.split("/")]
        except ValueError:
            sizes = []
        if not sizes or not all(8 <= s <= 1024 for s in sizes):
            raise UserError(f"--train-sizes must be sides of 8 to 1024 pixels joined by '/', e.g. 16/24/24, "
                            f"not {self.train_sizes[:40]!r}")  # fmt: skip
        return sizes

    def train_size(self, epoch: int) -> int | None:
        """The side the training images of an epoch (from 1) are downscaled to; None: their own size."""
        sizes = self.sizes_of_epochs
        return sizes[epoch - 1] if epoch <= len(sizes) else None

    def split_args(self) -> dict[str, Any]:
        """The arguments of data.make_splits that rebuild this run's train/validation split."""
        return dict(
            val_size=self.resolved_val_size,
            split_seed=self.split_seed,
            subset=self.subset,
            folds=self.folds,
            fold=self.fold,
        )

    def sized_for(self, n_train: int, n_classes: int = 1) -> TrainConfig:
        """This config for a dataset of n_train training images (of n_classes), written into the config so
        that evaluate rebuilds the same split: the default validation split (5,000 of CIFAR's 50,000) becomes
        a tenth of a smaller set, and so does a recipe's fixed one that would leave less than 90% of the
        images (of --subset) to train on (then at least one per class, where the classes can spare one). A
        --val-size the user gave is kept as it is: one too large is make_splits' one-line error."""
        if self.folds:
            return self
        if self.val_size is None and self.subset is None and n_train < 50_000:
            return dataclasses.replace(self, val_size=n_train // 10)
        n = min(self.subset, n_train) if self.subset is not None else n_train
        if self.val_size_by_recipe and self.val_size is not None and self.val_size * 10 > n:
            return dataclasses.replace(self, val_size=held_out_tenth(n, n_classes))
        return self

    def data_args(self) -> dict[str, Any]:
        """The arguments of datasets.load_data that choose this run's dataset (data_dir aside)."""
        return dict(
            dataset=self.dataset, labels=self.labels, max_classes=self.max_classes, image_size=self.image_size
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        """A config file (a run's config.json, a --config): bounded, a regular file, a JSON object."""
        return cls.from_dict(read_json_object(path, required=True))


def held_out_tenth(n: int, n_classes: int) -> int:
    """A tenth of n images for validation, and at least one per class where each class can spare one."""
    return max(n // 10, n_classes) if 2 * n_classes <= n else n // 10


def check_tta(level: int, margin: float) -> None:
    """Test-time augmentation: level 0 (none), 1 (mirror) or 2 (mirror + shifts), on images below the margin."""
    if level not in (0, 1, 2):
        raise UserError("--tta must be 0, 1 or 2")
    check_tta_margin(margin)


def check_tta_margin(margin: float) -> None:
    """Selective TTA's margin is a difference of two probabilities: 0 (no TTA) to 1 (TTA on every image)."""
    if not 0 <= margin <= 1:
        raise UserError("--tta-margin must be between 0 and 1")


_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (float,),
    bool: (bool,),
    str: (str,),
    int | None: (int, type(None)),
}

# Named recipes: each is a set of overrides of the TrainConfig defaults.
RECIPES: dict[str, dict[str, Any]] = {
    # The classic CIFAR-10 tutorial CNN, trained the classic way.
    "seed": dict(model="seed_cnn", epochs=20, batch_size=64, lr=0.01, momentum=0.9),
    # airbench94_muon's recipe (Jordan, 2024): 94% in 8 epochs on all 50,000 images. The loss is summed over
    # the batch, as there, so these LRs are theirs: SGD for the head (lr) and biases, Muon for conv filters.
    # Batches of 2000 run as 4 micro-batches of 500: faster on CPU (less page-fault churn; the ratio on this
    # machine: python benchmarks/profile_step.py), with batch-norm statistics per 500 images.
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
        # Measured on the validation split (benchmarks/ablation.py, quick, 2 seeds): TTA only where the top-two
        # margin is < 0.3 (22% of images) matched TTA on all of them within 0.05% at 2.7x less evaluation time.
        tta_margin=0.3,
        # 1,000 training images held out to fit the softmax temperature (and validate on): ECE 20.3% -> 1.7%
        # on the same split, with no measurable accuracy cost. --val-size 0 trains on all 50,000 as published.
        val_size=1000,
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
# The short-budget recipe: quick's net and tricks for 2 epochs, the first at 16x16 and the second at 28x28
# (progressive resizing, batch-norm statistics recomputed at 32x32). Decided on the validation split
# (benchmarks/ablation.py --recipe quick, docs/RESULTS.md): 81.70% there in 5.2 TFLOP, against 83.16% for
# 16/32 (6.5 TFLOP), 78.90% for 16/24 and 78.94% for one epoch at 32x32; the seed recipe's is about 81.1%.
RECIPES["sprint"] = {**RECIPES["quick"], "epochs": 2, "train_sizes": "16/28"}
DEFAULT_RECIPE = "seed"


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """The config of a named recipe, with the given fields replaced."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    recipe = {**RECIPES[name], "recipe": name, "val_size_by_recipe": "val_size" in RECIPES[name],
              "micro_batch_by_recipe": "micro_batch" in RECIPES[name]}  # fmt: skip
    return with_options(recipe, overrides)


def with_options(base: dict[str, Any], options: dict[str, Any]) -> TrainConfig:
    """base (a recipe's or a config file's fields) with the options given: a val_size or micro_batch given
    is the user's (see users())."""
    return TrainConfig(**{**base, **options, **users(options)})


def users(options: dict[str, Any]) -> dict[str, bool]:
    """The *_by_recipe flags that options given by the user (command line, tuner) turn off."""
    return {f"{k}_by_recipe": False for k in ("val_size", "micro_batch") if k in options}
