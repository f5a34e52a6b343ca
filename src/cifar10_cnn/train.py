"""The training loop: optimizer, LR schedule, mixed precision, early stopping, checkpoints, logging.

    cifar10 train --recipe seed                      # one process, CPU or one GPU
    cifar10 train --resume runs/<run>                # continue exactly where it stopped

`train()` is the whole job (data -> fit -> final evaluation -> report); `fit()` is the loop alone and
knows nothing of files other than its run directory.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import augment, distributed
from . import data as D
from .checkpoint import load_checkpoint, save_atomic
from .config import TrainConfig
from .errors import TrainingDiverged, UserError
from .evaluate import augmentation_preview, evaluate_into_run
from .inference import evaluate_logits, loss_and_accuracy
from .models import count_params, create_model
from .optim import Muon
from .runs import Run, create_run, default_run_dir, read_json, write_json
from .weights import save_weights

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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Measured here (benchmarks/profile_step.py): with AVX512-BF16, bf16 autocast trains 1.8-2.2x faster than
    fp32; a CPU without it emulates bf16 and runs many times slower, so it stays in fp32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training, None for fp32.

    auto: bf16 on CUDA where supported, else fp16; bf16 on a CPU with native bf16; fp32 otherwise (MPS, older
    CPUs). Weights, optimizer state and evaluation stay fp32 either way.
    """
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
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
        Run(self.run_dir).write_metrics(history)
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


class SilentLogger(Logger):
    """The logger of ranks other than 0: no files, no console."""

    bar = False

    def __init__(self) -> None:
        pass

    def log_epoch(self, row: dict[str, float], history: list[dict[str, float]], epochs: int) -> None:
        pass

    def close(self) -> None:
        pass


def fit(
    cfg: TrainConfig,
    splits: D.Splits,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, nn.Module, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train cfg.model on splits.train, validating on splits.val after every epoch; checkpoints in run_dir.

    on_epoch_end(epoch, model, row) runs after each epoch's checkpoint, outside the epoch's timing, with the
    epoch's metrics row (benchmarks follow test accuracy with it, never fed back; the tuner prunes on val_acc).
    """
    world = distributed.current()
    device = distributed.local_device(select_device(cfg.device))
    amp_dtype = autocast_dtype(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model).to(device, memory_format=memory_format)
    if world.size > 1 and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    steps_per_epoch = max(1, len(splits.train) // cfg.batch_size)
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction=cfg.loss_reduction)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation, the same on every rank
    base_flips = augment.alternating_flips(len(splits.train), cfg.seed) if cfg.alternate_flip else None
    if hasattr(model, "init_whitening"):  # set from the data before any step (a resume overwrites it)
        model.init_whitening(augment.normalize(splits.train.images[:5000]).to(device))
    net: nn.Module = model  # what the training steps call: the model, or its DistributedDataParallel wrapper
    if world.size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )

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
        cuda_rng = state["rng"].get("cuda")
        if device.type == "cuda" and cuda_rng is not None and len(cuda_rng):
            torch.cuda.set_rng_state(cuda_rng[0] if isinstance(cuda_rng, list) else cuda_rng, device)
        data_gen.set_state(state["rng"]["data"])
        history, start_epoch = state["history"], state["epoch"]
        best_val, best_epoch, bad_epochs = state["best_val_acc"], state["best_epoch"], state["bad_epochs"]
        echo(f"resumed {run_dir} after epoch {start_epoch}")
    # Every rank must have read the same checkpoint: on several machines the run directory must be shared.
    world.check_same("checkpoint", {"epoch": start_epoch, "run_dir": str(run_dir)})

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else [],
                "data": data_gen.get_state(),
            },
            "epoch": epoch,
            "history": history,
            "best_val_acc": best_val,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "config": cfg.to_dict(),
        }

    logger = (
        Logger(run_dir, progress=progress, start_epoch=start_epoch, echo=echo)
        if world.main
        else SilentLogger()
    )
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
                # Every rank augments the whole batch with the same draws, then trains on its own share.
                x_all = augment.augment_batch(
                    train_set.images[idx.to(train_set.images.device)],
                    data_gen,
                    crop_padding=cfg.crop_padding,
                    crop_mode=cfg.crop_mode,
                    flip=cfg.flip,
                    flip_mask=None if base_flips is None else base_flips[idx] ^ (epoch % 2 == 0),
                    cutout_size=cfg.cutout,
                )
                mine = torch.arange(len(idx)).tensor_split(world.size)[world.rank]
                x_mine = x_all[mine.to(x_all.device)]
                y_mine = train_set.labels[idx[mine].to(train_set.labels.device)]
                # Micro-batches accumulate gradients: the same step in smaller tensors (faster on CPU), with
                # batch-norm statistics per micro-batch. DDP averages over ranks once, after the last one.
                parts = torch.arange(len(mine)).split(cfg.micro_batch or len(mine))
                for k, part in enumerate(parts):
                    x = augment.normalize(x_mine[part.to(x_mine.device)]).contiguous(
                        memory_format=memory_format
                    )
                    y = y_mine[part.to(y_mine.device)]
                    sync = world.size == 1 or k == len(parts) - 1
                    with contextlib.nullcontext() if sync else net.no_sync():
                        with torch.autocast(
                            device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None
                        ):
                            out = net(x)
                            loss = criterion(out, y)
                        # mean: each rank's share of its mean, and DDP's average over ranks is the batch mean.
                        # sum: DDP's average over ranks would divide the batch sum by their number.
                        scale = len(part) / len(mine) if cfg.loss_reduction == "mean" else world.size
                        scaler.scale(loss * scale if scale != 1 else loss).backward()
                    loss_sum += loss.detach() * (len(y) if cfg.loss_reduction == "mean" else 1)
                    correct += (out.argmax(1) == y).sum()
                    seen += len(y)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if step % 25 == 0 or step == steps_per_epoch:
                    total_loss, total_seen = world.sum(loss_sum, torch.tensor(seen))
                    mean_loss = total_loss.item() / total_seen.item()
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
            world.share_buffers(model)
            loss_sum, correct, seen = world.sum(loss_sum, correct, torch.tensor(seen))
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": loss_sum.item() / seen.item(),
                "train_acc": correct.item() / seen.item(),
                "val_loss": None,
                "val_acc": None,
                "lr": optimizer.param_groups[0]["lr"],
            }
            if has_val:  # rank 0's figures decide for every rank (kernels may differ between GPUs)
                row["val_loss"], row["val_acc"] = world.broadcast(
                    loss_and_accuracy(
                        evaluate_logits(model, splits.val, amp_dtype=amp_dtype), splits.val.labels
                    )
                    if world.main
                    else None
                )
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            improved = has_val and (best_val is None or row["val_acc"] > best_val)
            if improved:
                best_val, best_epoch, bad_epochs = row["val_acc"], epoch, 0
            elif has_val:
                bad_epochs += 1
            if world.main:
                state = checkpoint(epoch)
                save_atomic(state, ckpt_dir / "last.pt")
                if improved or not has_val:
                    save_atomic(state, ckpt_dir / "best.pt")
            world.barrier()  # the checkpoint exists before any rank goes on (early stopping reads it)
            logger.log_epoch(row, history, cfg.epochs)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, row)
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
    on_epoch_end: Callable[[int, nn.Module, dict[str, Any]], None] | None = None,
) -> Path:
    """The whole job: load data, fit, write final weights, evaluate on the test set once, write the report."""
    t_start = time.perf_counter()
    world = distributed.current()
    world.check_same("config", cfg.to_dict())
    if cfg.batch_size % world.size:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of the {world.size} processes")
    if cfg.sync_bn and world.size > 1 and select_device(cfg.device).type != "cuda":
        raise UserError(
            "--sync-bn needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only); leave it out on CPU"
        )
    if not world.main:
        echo, progress = (lambda *_: None), False

    def make_run_dir() -> Path:
        if resume is not None:
            return Path(resume)
        return create_run(Path(out) if out else default_run_dir(cfg), cfg, force=force).path

    run_dir = world.from_main(make_run_dir)  # one name: ranks' clocks may straddle a second
    if data is None:
        with world.main_first():  # rank 0 downloads and verifies; the others then read its cache
            data = D.load_cifar10(data_dir, allow_unverified=allow_unverified, progress=progress)
    device = distributed.local_device(select_device(cfg.device))
    splits = D.make_splits(data, **cfg.split_args(), device=device)
    if resume is None and world.main:
        augmentation_preview(splits.train, run_dir / "plots" / "augmentations.png", cfg)
    params = count_params(create_model(cfg.model))
    precision = str(autocast_dtype(cfg.amp, device) or torch.float32).removeprefix("torch.")
    echo(
        f"model {cfg.model} ({params:,} params) | device {device}, {precision} | data {data.source} "
        f"({'verified' if data.verified else 'UNVERIFIED'}) | train {len(splits.train)} / val {len(splits.val)} "
        f"/ test {len(splits.test)} | recipe {cfg.recipe}: {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}"
    )
    if world.size > 1:
        echo(
            f"distributed: {world.size} processes ({world.backend}); global batch {cfg.batch_size} = "
            f"{cfg.batch_size // world.size} per process x {world.size}; lr {cfg.lr} applies to the global batch; "
            f"batch-norm statistics {'over the global batch (SyncBatchNorm)' if cfg.sync_bn else 'per process'}"
        )
    result = fit(
        cfg,
        splits,
        run_dir,
        resume=resume is not None,
        progress=progress,
        echo=echo,
        on_epoch_end=on_epoch_end,
    )
    if not world.main:
        return run_dir
    save_weights(result.model, run_dir / "model.safetensors", architecture=cfg.model, config=cfg.to_dict())
    write_json(
        run_dir / "results.json",
        {
            "model": cfg.model,
            "params": params,
            "recipe": cfg.recipe,
            "device": str(device),
            "precision": precision,
            "processes": world.size,
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
    results = evaluate_into_run(
        run_dir, splits.test, tta=cfg.tta, model=result.model, val=splits.val, echo=echo
    )
    # Every second from the call to the finished report, data loading and evaluation included.
    write_json(run_dir / "results.json", {**results, "total_seconds": time.perf_counter() - t_start})
    return run_dir


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def _group_dir(cfg: TrainConfig, out: Path | None, suffix: str) -> Path:
    """The folder of a group of runs: out, or runs/<timestamp>-<recipe>-<suffix> (named once, on rank 0)."""
    if out is not None:
        return Path(out)
    base = default_run_dir(cfg)
    return base.with_name(f"{base.name}-{suffix}")


def _train_group(
    cfgs: dict[str, TrainConfig],
    out: Path,
    *,
    data: D.CIFAR10 | None,
    data_dir: str | os.PathLike | None,
    allow_unverified: bool,
    force: bool,
    progress: bool,
    echo: Callable[[str], None],
    on_run_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]] | None:
    """Each config trained into out/<name>; their results.json (None on ranks other than 0).

    on_run_end(k, results) runs on rank 0 after run k (the tuner prunes between folds with it)."""
    world = distributed.current()
    if data is None:
        with world.main_first():
            data = D.load_cifar10(
                data_dir, allow_unverified=allow_unverified, progress=progress and world.main
            )
    runs = []
    for k, (name, cfg) in enumerate(cfgs.items()):
        echo(f"--- {name} ({k + 1}/{len(cfgs)})")
        run = train(cfg, out=out / name, data=data, force=force, progress=progress, echo=echo)
        if world.main:
            runs.append({"run": str(run), **read_json(run / "results.json")})
            if on_run_end is not None:
                on_run_end(k, runs[-1])
    return runs if world.main else None


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
    world = distributed.current()
    out = world.from_main(lambda: _group_dir(cfg, out, f"{seeds}seeds"))
    cfgs = {f"seed{cfg.seed + k}": replace(cfg, seed=cfg.seed + k) for k in range(seeds)}
    results = _train_group(
        cfgs, out, data=data, data_dir=data_dir, allow_unverified=allow_unverified, force=force,
        progress=progress, echo=echo,
    )  # fmt: skip
    if results is None:
        return out
    summary = {
        "recipe": cfg.recipe,
        "model": cfg.model,
        "runs": [r["run"] for r in results],
        "seeds": [c.seed for c in cfgs.values()],
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


def run_val_accuracy(results: dict[str, Any]) -> float:
    """Validation accuracy of the weights a run kept (the best epoch's after early stopping, else the last)."""
    return results["best_val_accuracy"] if results["weights"] == "best" else results["final_val_accuracy"]


def train_cv(
    cfg: TrainConfig,
    folds: int,
    *,
    out: Path | None = None,
    data: D.CIFAR10 | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    on_fold_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """K-fold cross-validation: one run per stratified fold; cv.json holds the validation accuracy mean ± std."""
    if folds < 2:
        raise UserError("--cv needs at least 2 folds")
    world = distributed.current()
    out = world.from_main(lambda: _group_dir(cfg, out, f"cv{folds}"))
    cfgs = {f"fold{k}": replace(cfg, folds=folds, fold=k, val_size=None) for k in range(folds)}
    results = _train_group(
        cfgs, out, data=data, data_dir=data_dir, allow_unverified=allow_unverified, force=force,
        progress=progress, echo=echo, on_run_end=on_fold_end,
    )  # fmt: skip
    if results is None:
        return out
    val = summarize([run_val_accuracy(r) for r in results])
    summary = {
        "recipe": cfg.recipe,
        "model": cfg.model,
        "folds": folds,
        "runs": [r["run"] for r in results],
        "val_accuracy": val,
        "per_fold_val_accuracy": [run_val_accuracy(r) for r in results],
        "test_accuracy": summarize([r["test_accuracy"] for r in results]),  # reported, never used to choose
        "total_seconds": summarize([r["total_seconds"] for r in results]),
    }
    write_json(out / "cv.json", summary)
    echo(
        f"{cfg.recipe}: {folds}-fold cross-validation accuracy {val['mean']:.2%} ± {val['std']:.2%} "
        f"(min {val['min']:.2%}, max {val['max']:.2%}) -> {out / 'cv.json'}"
    )
    return out
