"""Training, top to bottom: set-up, then per epoch train_one_epoch -> validate -> checkpoint / early stop.

    cifar10 train --recipe seed                                    # one process: CPU, one GPU or MPS
    cifar10 train --resume runs/<run>                              # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m cifar10_cnn train --recipe fast  # data-parallel (see distributed.py)

`fit()` is the loop alone and returns the fitted model (the best epoch's after early stopping) with its history;
`train_step()` is one optimisation step, which the benchmarks call too. The job around it (data, run directory,
final weights, evaluation, report) is pipeline.py's: this module loads nothing of evaluation or plotting.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .augment import alternating_flips, augment_batch, downscale, normalize
from .checkpoint import TrainState, load_checkpoint
from .config import TrainConfig
from .data import Split, Splits, batch_indices
from .device import autocast, autocast_dtype, select_device
from .errors import CheckpointError, TrainingDiverged
from .inference import evaluate_logits, loss_and_accuracy
from .logs import EpochLog, SilentLog
from .models import create_model
from .optim import build_optimizer
from .runs import Run

EpochHook = Callable[[int, nn.Module, dict[str, Any]], None]


# --- one step ----------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What every step needs, built once by `setup()`."""

    cfg: TrainConfig
    model: nn.Module
    net: nn.Module  # what the steps call: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    world: distributed.World
    steps_per_epoch: int
    micro_batch: int | None  # what the steps run in on this device (TrainConfig.micro_batch_on)


def setup(cfg: TrainConfig, train: Split, device: torch.device, num_classes: int = 10) -> Trainer:
    """The model (seeded by cfg.seed, whitened from the training images), optimizer, schedule and loss."""
    world = distributed.current()
    set_determinism(cfg.deterministic, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=num_classes, image_size=cfg.image_size)
    model = model.to(device, memory_format=memory_format)
    if world.size > 1 and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch)
    amp_dtype = autocast_dtype(cfg.amp, device)
    if hasattr(model, "init_whitening"):  # set from the data before any step (a resume overwrites it)
        model.init_whitening(normalize(train.images[:5000]).to(device))
    net = model
    if world.size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if cfg.compile:  # the steps run the compiled graph; evaluation and checkpoints use `model`, eager
        net = torch.compile(net)
    return Trainer(
        cfg=cfg, model=model, net=net, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction=cfg.loss_reduction),
        device=device, amp_dtype=amp_dtype, memory_format=memory_format, world=world,
        steps_per_epoch=steps_per_epoch, micro_batch=cfg.micro_batch_on(device),
    )  # fmt: skip


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels, or the fastest ones (cuDNN's autotuner picks per shape on CUDA).

    CPU kernels here are deterministic either way; on CUDA, cuDNN's and cuBLAS's fastest ones may sum in any
    order, so a resumed run matches an uninterrupted one bit for bit only with deterministic=True."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # ops without one warn, not fail
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def train_step(
    t: Trainer, x: torch.Tensor, y: torch.Tensor, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on augmented uint8 images x (this rank's share of the batch) and labels y,
    downscaled to size x size first if size is given (progressive resizing: fewer FLOPs per image).

    Micro-batches accumulate gradients: the same step in smaller tensors (faster on CPU), with batch-norm
    statistics per micro-batch; DDP averages over ranks once, after the last one. Returns the summed loss and
    the number of correct predictions, as tensors on the device (no host synchronisation).
    """
    cfg, world = t.cfg, t.world
    t.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=t.device)
    correct = torch.zeros((), device=t.device, dtype=torch.long)
    parts = torch.arange(len(y)).split(t.micro_batch or len(y))
    for k, part in enumerate(parts):
        xb = downscale(normalize(x[part.to(x.device)]), size).contiguous(memory_format=t.memory_format)
        yb = y[part.to(y.device)]
        sync = world.size == 1 or k == len(parts) - 1
        with contextlib.nullcontext() if sync else t.net.no_sync():
            with autocast(t.device, t.amp_dtype):
                out = t.net(xb)
                loss = t.criterion(out, yb)
            # mean: each rank's share of its mean, and DDP's average over ranks is the batch mean.
            # sum: DDP's average over ranks would divide the batch sum by their number.
            scale = len(part) / len(y) if cfg.loss_reduction == "mean" else world.size
            t.scaler.scale(loss * scale if scale != 1 else loss).backward()
        loss_sum += loss.detach() * (len(yb) if cfg.loss_reduction == "mean" else 1)
        correct += (out.argmax(1) == yb).sum()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    return loss_sum, correct


def rank_batch(
    t: Trainer, train: Split, idx: torch.Tensor, gen: torch.Generator, flip_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank augments the whole batch with the same draws, then keeps its own contiguous share."""
    cfg = t.cfg
    x_all = augment_batch(
        train.images[idx.to(train.images.device)], gen, crop_padding=cfg.crop_padding,
        crop_mode=cfg.crop_mode, flip=cfg.flip, flip_mask=flip_mask, cutout_size=cfg.cutout,
    )  # fmt: skip
    mine = torch.arange(len(idx)).tensor_split(t.world.size)[t.world.rank]
    return x_all[mine.to(x_all.device)], train.labels[idx[mine].to(train.labels.device)]


# --- one epoch ----------------------------------------------------------------------------------------------------


def train_one_epoch(
    t: Trainer, train: Split, epoch: int, gen: torch.Generator, base_flips: torch.Tensor | None, log: EpochLog
) -> dict[str, Any]:
    """One pass over the training images in batches drawn by gen; the epoch's train loss, accuracy and LR."""
    t.model.train()
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=t.device)
    correct = torch.zeros((), device=t.device, dtype=torch.long)
    seen = 0
    size = t.cfg.train_size(epoch)  # progressive resizing: None is full size
    bar = log.epoch_bar(epoch, t.cfg.epochs, t.steps_per_epoch)
    for step, idx in enumerate(batch_indices(len(train), t.cfg.batch_size, gen, drop_last=True), 1):
        flip_mask = None if base_flips is None else base_flips[idx] ^ (epoch % 2 == 0)
        x, y = rank_batch(t, train, idx, gen, flip_mask)
        step_loss, step_correct = train_step(t, x, y, size)
        loss_sum, correct, seen = loss_sum + step_loss, correct + step_correct, seen + len(y)
        if step % 25 == 0 or step == t.steps_per_epoch:
            mean_loss = check_finite(t, loss_sum, seen, epoch, step)
            if log.bar:
                rate = seen / (time.perf_counter() - started)
                bar.set_postfix(
                    loss=f"{mean_loss:.3f}", acc=f"{correct.item() / seen:.1%}", img_s=f"{rate:.0f}"
                )
                bar.update(step - bar.n)
    bar.close()
    if size is not None:
        recalibrate_norms(t, train)
    t.world.share_buffers(t.model)
    loss_sum, correct, total = t.world.sum(loss_sum, correct, torch.tensor(seen))
    return {
        "epoch": epoch,
        "train_loss": loss_sum.item() / total.item(),
        "train_acc": correct.item() / total.item(),
        "lr": t.optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def recalibrate_norms(t: Trainer, train: Split, images: int = 4000) -> None:
    """After an epoch on downscaled images, batch-norm running statistics of full-size ones (what evaluation
    sees): the exact mean over the first `images` training images, unaugmented, in forward passes only.

    Training itself uses batch statistics, so this changes what validation and the saved model compute, not
    what the next epoch learns; it reads no random numbers, so resumed runs stay exact."""
    norms = [m for m in t.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the passes below
    for x in train.images[:images].split(t.micro_batch or t.cfg.batch_size):
        xb = normalize(x.to(t.device)).contiguous(memory_format=t.memory_format)
        with autocast(t.device, t.amp_dtype):
            t.model(xb)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def check_finite(t: Trainer, loss_sum: torch.Tensor, seen: int, epoch: int, step: int) -> float:
    """The mean loss so far over all ranks; a NaN or infinite loss stops training with the last checkpoint intact."""
    total_loss, total_seen = t.world.sum(loss_sum, torch.tensor(seen))
    mean_loss = total_loss.item() / total_seen.item()
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(
            f"the loss became {mean_loss} in epoch {epoch} (step {step}); training stopped and the "
            f"checkpoint of epoch {epoch - 1} is intact; try a lower --lr"
        )
    return mean_loss


def validate(t: Trainer, val: Split) -> tuple[float | None, float | None]:
    """Validation loss and accuracy (None without a validation split); rank 0's figures decide for all ranks."""
    if len(val) == 0:
        return None, None
    if not t.world.main:
        return t.world.broadcast(None)
    logits = evaluate_logits(t.model, val, amp_dtype=t.amp_dtype)
    return t.world.broadcast(loss_and_accuracy(logits, val.labels))


# --- the loop ------------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int | None
    best_val_acc: float | None
    stopped_early: bool
    train_seconds: float


def fit(
    cfg: TrainConfig,
    splits: Splits,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    on_epoch_end: EpochHook | None = None,
    trainer: Trainer | None = None,
) -> FitResult:
    """Train cfg.model on splits.train, validating on splits.val after every epoch; checkpoints in run_dir.

    on_epoch_end(epoch, model, row) runs after each epoch's checkpoint, outside the epoch's timing, with the
    epoch's metrics row (benchmarks follow test accuracy with it, never fed back; the tuner prunes on val_acc).
    """
    t = trainer or setup(cfg, splits.train, distributed.local_device(select_device(cfg.device)))
    gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation, the same on every rank
    base_flips = alternating_flips(len(splits.train), cfg.seed) if cfg.alternate_flip else None
    run = Run(Path(run_dir))
    state = TrainState(t.model, t.optimizer, t.scheduler, t.scaler, gen, t.device, cfg.to_dict())
    if resume:
        restore(run, state, echo)
    # Every rank must have read the same checkpoint: on several machines the run directory must be shared.
    t.world.check_same("checkpoint", {"epoch": state.progress.epoch, "run_dir": str(run_dir)})
    log = (
        EpochLog(run, progress=progress, start_epoch=state.progress.epoch, echo=echo)
        if t.world.main
        else SilentLog()
    )
    stopped_early = False
    try:
        for epoch in range(state.progress.epoch + 1, cfg.epochs + 1):
            if cfg.patience and state.progress.bad_epochs >= cfg.patience:
                stopped_early = True
                break
            started = time.perf_counter()
            row = train_one_epoch(t, splits.train, epoch, gen, base_flips, log)
            row["val_loss"], row["val_acc"] = validate(t, splits.val)
            row["seconds"] = time.perf_counter() - started
            improved = state.progress.record(row)
            if t.world.main:
                save_checkpoints(run, state, best=improved or len(splits.val) == 0)
            t.world.barrier()  # the checkpoint exists before any rank goes on (early stopping reads it)
            log.log_epoch(row, state.progress.history, cfg.epochs)
            if on_epoch_end is not None:
                on_epoch_end(epoch, t.model, row)
    finally:
        log.close()
    p = state.progress
    if stopped_early and p.best_epoch is not None:
        echo(
            f"early stopping: no better val_acc for {cfg.patience} epochs; using the weights of epoch {p.best_epoch}"
        )
        t.model.load_state_dict(best_checkpoint(run, p.best_epoch, t.device)["model"])
    return FitResult(
        model=t.model, history=p.history, best_epoch=p.best_epoch, best_val_acc=p.best_val_acc,
        stopped_early=stopped_early, train_seconds=sum(r["seconds"] for r in p.history),
    )  # fmt: skip


def save_checkpoints(run: Run, state: TrainState, *, best: bool) -> None:
    """best.pt before last.pt: whatever instant a kill comes, last.pt never names a best epoch best.pt lacks."""
    run.mkdir("checkpoints")
    if best:
        state.save(run.file("best"))
    state.save(run.file("last"))


def restore(run: Run, state: TrainState, echo: Callable[[str], None]) -> None:
    """Continue from last.pt (if an epoch finished), after removing what an interrupted write left behind."""
    for path in run.remove_stale_temporaries():
        echo(f"removed {path.relative_to(run.path)}, left by an interrupted write")
    if not run.file("last").exists():
        return
    state.restore(run.file("last"))
    p = state.progress
    best = run.file("best")
    best_epoch = load_checkpoint(best, map_location="cpu")["epoch"] if best.is_file() else None
    # best.pt may be one epoch ahead of last.pt (killed between the two writes): that epoch is re-run.
    if p.best_epoch is not None and best_epoch != p.best_epoch and not (best_epoch or 0) > p.epoch:
        if p.best_epoch != p.epoch:
            raise CheckpointError(
                f"{best} does not hold epoch {p.best_epoch}, the best one, so early stopping could not restore "
                f"it; start the run again with --force"
            )
        state.save(best)  # last.pt holds the best epoch's weights
    echo(f"resumed {run.path} after epoch {p.epoch}")


def best_checkpoint(run: Run, best_epoch: int, device: torch.device) -> dict[str, Any]:
    state = load_checkpoint(run.file("best"), map_location=device)
    if state.get("epoch") != best_epoch:
        raise CheckpointError(
            f"{run.file('best')} holds epoch {state.get('epoch')}, not the best epoch {best_epoch}"
        )
    return state
