"""The training loop: optimizer, LR schedule, mixed precision, early stopping, checkpoints, logging.

    cifar10 train --recipe seed                      # one process, CPU or one GPU
    cifar10 train --resume runs/<run>                # continue exactly where it stopped

`train()` is the whole job (data -> fit -> final evaluation -> report); `fit()` is the loop alone and
knows nothing of files other than its run directory.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as D
from .checkpoint import load_checkpoint, save_atomic, save_weights
from .config import TrainConfig
from .errors import TrainingDiverged, UserError
from .evaluate import augmentation_preview, evaluate_logits, evaluate_run, loss_and_accuracy
from .models import count_params, create_model
from .optim import Muon
from .runs import default_run_dir, prepare_run_dir, read_json, write_json, write_metrics_csv

# --- device and precision ---------------------------------------------------------------------------------


def select_device(name: str = "auto") -> torch.device:
    """auto picks CUDA, then MPS, then CPU; an explicit choice that is not available is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and not has_mps:
        raise UserError("--device mps was asked for, but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: on CUDA bf16 where supported else fp16 by default; fp32 elsewhere unless asked."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


# --- optimizer and schedule -----------------------------------------------------------------------------------


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer with its parameter groups, and the per-step LR schedule of each group.

    Biases and norm shifts get lr * bias_lr_scale; with optimizer=muon, conv filters get Muon. Weight decay
    is coupled (PyTorch's, weights only) unless decoupled_wd, where every group shrinks by weight_decay per
    step at peak LR. A whitening layer's bias has its own schedule, decaying to 0 over whiten_bias_epochs.
    """
    whiten_bias = getattr(getattr(model, "whiten", None), "bias", None)
    trainable = [p for p in model.parameters() if p.requires_grad and p is not whiten_bias]
    muon = cfg.optimizer == "muon"
    filters = [p for p in trainable if p.ndim == 4]
    weights = [p for p in trainable if p.ndim > 1 and not (muon and p.ndim == 4)]
    biases = [p for p in trainable if p.ndim <= 1]
    bias_lr = cfg.lr * cfg.bias_lr_scale

    def decay(lr: float, is_weight: bool) -> float:
        if cfg.decoupled_wd:
            return cfg.weight_decay / lr
        return cfg.weight_decay if is_weight else 0.0

    def main(step: int) -> float:
        return lr_factor(cfg, step, steps_per_epoch)

    groups = [
        {"params": weights, "lr": cfg.lr, "weight_decay": decay(cfg.lr, True)},
        {"params": biases, "lr": bias_lr, "weight_decay": decay(bias_lr, False)},
    ]
    schedules = [main, main]
    if whiten_bias is not None and whiten_bias.requires_grad:
        whiten_steps = max(1, round(cfg.whiten_bias_epochs * steps_per_epoch))
        groups.append({"params": [whiten_bias], "lr": bias_lr, "weight_decay": decay(bias_lr, False)})
        schedules.append((lambda s: max(0.0, 1 - s / whiten_steps)) if cfg.whiten_bias_epochs else main)
    if muon:
        groups.append({"params": filters, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "muon": True})
        schedules.append(main)
        optimizer: torch.optim.Optimizer = Muon(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
        )
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The LR multiplier at a step: linear warm-up, then the schedule; one-cycle warms up over 25%."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and not warmup:
        warmup = max(1, round(0.25 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule in ("onecycle", "linear"):
        return max(0.0, 1 - progress)
    if cfg.schedule == "step":
        return cfg.step_gamma ** (step // (cfg.step_size * steps_per_epoch))
    return 1.0


# --- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int | None
    best_val_acc: float | None
    stopped_early: bool
    train_seconds: float


class Logger:
    """Per-epoch metrics to metrics.csv, TensorBoard and the console; a live bar per epoch on a TTY."""

    def __init__(
        self, run_dir: Path, *, progress: bool, start_epoch: int, echo: Callable[[str], None] = print
    ):
        from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

        self.run_dir = run_dir
        self.bar = progress and sys.stderr.isatty()
        self.echo = echo
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1)

    def epoch_bar(self, epoch: int, epochs: int, steps: int):
        from tqdm.auto import tqdm

        return tqdm(
            total=steps,
            desc=f"epoch {epoch}/{epochs}",
            leave=False,
            disable=not self.bar,
            dynamic_ncols=True,
            unit="step",
        )

    def log_epoch(self, row: dict[str, float], history: list[dict[str, float]], epochs: int) -> None:
        write_metrics_csv(self.run_dir / "metrics.csv", history)
        for key, value in row.items():
            if key != "epoch" and value is not None:
                self.tb.add_scalar(key, value, row["epoch"])
        self.tb.flush()
        val = (
            ""
            if row["val_acc"] is None
            else f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.2%}"
        )
        self.echo(
            f"epoch {row['epoch']:>3}/{epochs}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.2%}"
            f"{val}  lr {row['lr']:.4g}  {row['seconds']:.1f}s"
        )

    def close(self) -> None:
        self.tb.close()


def fit(
    cfg: TrainConfig,
    splits: D.Splits,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> FitResult:
    """Train cfg.model on splits.train, validating on splits.val after every epoch; checkpoints in run_dir.

    on_epoch_end(epoch, model) runs after each epoch's checkpoint, outside the epoch's timing (benchmarks use
    it to follow test accuracy; training itself never sees the test set).
    """
    device = select_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model).to(device, memory_format=memory_format)
    steps_per_epoch = max(1, len(splits.train) // cfg.batch_size)
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction=cfg.loss_reduction)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation
    base_flips = D.alternating_flips(len(splits.train), cfg.seed) if cfg.alternate_flip else None
    if hasattr(model, "init_whitening"):  # set from the data before any step (a resume overwrites it)
        model.init_whitening(D.normalize(splits.train.images[:5000]).to(device))

    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    best_val, best_epoch, bad_epochs, start_epoch = None, None, 0, 0
    if resume and (ckpt_dir / "last.pt").exists():
        state = load_checkpoint(ckpt_dir / "last.pt", map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        data_gen.set_state(state["rng"]["data"])
        history, start_epoch = state["history"], state["epoch"]
        best_val, best_epoch, bad_epochs = state["best_val_acc"], state["best_epoch"], state["bad_epochs"]
        echo(f"resumed {run_dir} after epoch {start_epoch}")

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "data": data_gen.get_state(),
            },
            "epoch": epoch,
            "history": history,
            "best_val_acc": best_val,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "config": cfg.to_dict(),
        }

    logger = Logger(run_dir, progress=progress, start_epoch=start_epoch, echo=echo)
    has_val = len(splits.val) > 0
    stopped_early = False
    train_set = splits.train
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if cfg.patience and bad_epochs >= cfg.patience:
                stopped_early = True
                break
            t0 = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            bar = logger.epoch_bar(epoch, cfg.epochs, steps_per_epoch)
            batches = D.batch_indices(len(train_set), cfg.batch_size, data_gen, drop_last=True)
            for step, idx in enumerate(batches, 1):
                optimizer.zero_grad(set_to_none=True)
                # Micro-batches accumulate gradients: the same step in smaller tensors (faster on CPU), with
                # batch-norm statistics per micro-batch.
                for part in idx.split(cfg.micro_batch or cfg.batch_size):
                    x = train_set.images[part.to(train_set.images.device)]
                    y = train_set.labels[part.to(train_set.labels.device)]
                    flips = None if base_flips is None else base_flips[part] ^ (epoch % 2 == 0)
                    x = D.augment(
                        x,
                        data_gen,
                        crop_padding=cfg.crop_padding,
                        crop_mode=cfg.crop_mode,
                        flip=cfg.flip,
                        flip_mask=flips,
                        cutout_size=cfg.cutout,
                    )
                    x = D.normalize(x).contiguous(memory_format=memory_format)
                    with torch.autocast(
                        device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None
                    ):
                        out = model(x)
                        loss = criterion(out, y)
                    share = len(part) / len(idx) if cfg.loss_reduction == "mean" else 1.0
                    scaler.scale(loss * share if share != 1.0 else loss).backward()
                    loss_sum += loss.detach() * (len(y) if cfg.loss_reduction == "mean" else 1)
                    correct += (out.argmax(1) == y).sum()
                    seen += len(y)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if step % 25 == 0 or step == steps_per_epoch:
                    mean_loss = loss_sum.item() / seen
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(
                            f"the loss became {mean_loss} in epoch {epoch} (step {step}); training stopped and the "
                            f"checkpoint of epoch {epoch - 1} is intact; try a lower --lr"
                        )
                    if logger.bar:
                        rate = seen / (time.perf_counter() - t0)
                        bar.set_postfix(
                            loss=f"{mean_loss:.3f}",
                            acc=f"{correct.item() / seen:.1%}",
                            img_s=f"{rate:.0f}",
                            refresh=False,
                        )
                        bar.update(step - bar.n)
            bar.close()
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": loss_sum.item() / seen,
                "train_acc": correct.item() / seen,
                "val_loss": None,
                "val_acc": None,
                "lr": optimizer.param_groups[0]["lr"],
            }
            if has_val:
                row["val_loss"], row["val_acc"] = loss_and_accuracy(
                    evaluate_logits(model, splits.val, amp_dtype=amp_dtype), splits.val.labels
                )
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            improved = has_val and (best_val is None or row["val_acc"] > best_val)
            if improved:
                best_val, best_epoch, bad_epochs = row["val_acc"], epoch, 0
            elif has_val:
                bad_epochs += 1
            state = checkpoint(epoch)
            save_atomic(state, ckpt_dir / "last.pt")
            if improved or not has_val:
                save_atomic(state, ckpt_dir / "best.pt")
            logger.log_epoch(row, history, cfg.epochs)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
    finally:
        logger.close()

    if stopped_early and best_epoch is not None:
        echo(
            f"early stopping: no better val_acc for {cfg.patience} epochs; using the weights of epoch {best_epoch}"
        )
        model.load_state_dict(load_checkpoint(ckpt_dir / "best.pt", map_location=device)["model"])
    return FitResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_val_acc=best_val,
        stopped_early=stopped_early,
        train_seconds=sum(r["seconds"] for r in history),
    )


# --- the whole job ---------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    out: Path | None = None,
    resume: Path | None = None,
    data: D.CIFAR10 | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """The whole job: load data, fit, write final weights, evaluate on the test set once, write the report."""
    t_start = time.perf_counter()
    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = Path(out) if out else default_run_dir(cfg)
        prepare_run_dir(run_dir, force=force)
        cfg.save(run_dir / "config.json")
    if data is None:
        data = D.load_cifar10(data_dir, allow_unverified=allow_unverified, progress=progress)
    device = select_device(cfg.device)
    splits = D.make_splits(
        data, val_size=cfg.resolved_val_size, split_seed=cfg.split_seed, subset=cfg.subset, device=device
    )
    if resume is None:
        augmentation_preview(splits.train, run_dir / "plots" / "augmentations.png", cfg)
    params = count_params(create_model(cfg.model))
    echo(
        f"model {cfg.model} ({params:,} params) | device {device} | data {data.source} "
        f"({'verified' if data.verified else 'UNVERIFIED'}) | train {len(splits.train)} / val {len(splits.val)} "
        f"/ test {len(splits.test)} | recipe {cfg.recipe}: {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}"
    )
    result = fit(cfg, splits, run_dir, resume=resume is not None, progress=progress, echo=echo)
    save_weights(result.model, run_dir / "model.safetensors", architecture=cfg.model, config=cfg.to_dict())
    write_json(
        run_dir / "results.json",
        {
            "model": cfg.model,
            "params": params,
            "recipe": cfg.recipe,
            "device": str(device),
            "train_size": len(splits.train),
            "val_size": len(splits.val),
            "epochs_run": len(result.history),
            "train_seconds": result.train_seconds,
            "best_val_accuracy": result.best_val_acc,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "weights": "best" if result.stopped_early and result.best_epoch else "final",
            "final_val_accuracy": result.history[-1]["val_acc"] if result.history else None,
            "data": data.describe(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    results = evaluate_run(run_dir, splits.test, tta=cfg.tta, model=result.model, val=splits.val, echo=echo)
    # Every second from the call to the finished report, data loading and evaluation included.
    write_json(run_dir / "results.json", {**results, "total_seconds": time.perf_counter() - t_start})
    return run_dir


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def train_seeds(
    cfg: TrainConfig,
    seeds: int,
    *,
    out: Path | None = None,
    data: D.CIFAR10 | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """`seeds` runs of cfg with seeds cfg.seed, cfg.seed + 1, ...; writes summary.json beside their run dirs."""
    if out is None:
        base = default_run_dir(cfg)  # once: two calls could straddle a second and name different folders
        out = base.with_name(f"{base.name}-{seeds}seeds")
    out = Path(out)
    if data is None:
        data = D.load_cifar10(data_dir, allow_unverified=allow_unverified, progress=progress)
    runs = []
    for k in range(seeds):
        run_cfg = TrainConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + k})
        echo(f"--- seed {run_cfg.seed} ({k + 1}/{seeds})")
        runs.append(
            train(
                run_cfg, out=out / f"seed{run_cfg.seed}", data=data, force=force, progress=progress, echo=echo
            )
        )
    results = [read_json(run / "results.json") for run in runs]
    summary = {
        "recipe": cfg.recipe,
        "model": cfg.model,
        "runs": [str(run) for run in runs],
        "seeds": [cfg.seed + k for k in range(seeds)],
        **{
            key: summarize([r[key] for r in results])
            for key in ("test_accuracy", "train_seconds", "total_seconds")
        },
    }
    write_json(out / "summary.json", summary)
    acc, secs = summary["test_accuracy"], summary["total_seconds"]
    echo(
        f"{cfg.recipe}: test accuracy {acc['mean']:.2%} ± {acc['std']:.2%} (min {acc['min']:.2%}, max "
        f"{acc['max']:.2%}) over {seeds} seeds; {secs['mean']:.0f} ± {secs['std']:.0f} s per run -> {out}"
    )
    return out
