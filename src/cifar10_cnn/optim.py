"""Optimizers and LR schedules: parameter groups, Muon for conv filters with SGD for the rest, warm-up and decay.

Muon (Jordan et al., 2024) replaces each filter's momentum update by the nearest semi-orthogonal matrix,
computed with a few Newton-Schulz iterations; it is what lets the fast recipe reach 94% in 8 epochs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig

# Coefficients of the quintic Newton-Schulz iteration published with Muon (tuned for speed, not exactness).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (g is 2-D), by Newton-Schulz iterations."""
    a, b, c = NS_COEFFS
    x = g / (g.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Param groups with muon=True get Muon updates (normalised weights, orthogonalised Nesterov momentum);
    the others get SGD with (Nesterov) momentum and weight decay, exactly like torch.optim.SGD."""

    def __init__(
        self,
        params,
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        muon: bool = False,
        ns_steps: int = 3,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            muon=muon,
            ns_steps=ns_steps,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and not group["muon"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(g)
                buf = state["momentum_buffer"]
                update = g.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm())  # keep each filter bank at a fixed norm
                    update = orthogonalize(update.reshape(len(update), -1), group["ns_steps"]).view_as(p)
                p.add_(update, alpha=-lr)


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

    def schedule(step: int) -> float:
        return lr_factor(cfg, step, steps_per_epoch)

    groups = [
        {"params": weights, "lr": cfg.lr, "weight_decay": decay(cfg.lr, True)},
        {"params": biases, "lr": bias_lr, "weight_decay": decay(bias_lr, False)},
    ]
    schedules = [schedule, schedule]
    if whiten_bias is not None and whiten_bias.requires_grad:
        whiten_steps = max(1, round(cfg.whiten_bias_epochs * steps_per_epoch))
        groups.append({"params": [whiten_bias], "lr": bias_lr, "weight_decay": decay(bias_lr, False)})
        schedules.append((lambda s: max(0.0, 1 - s / whiten_steps)) if cfg.whiten_bias_epochs else schedule)
    if muon:
        groups.append({"params": filters, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "muon": True})
        schedules.append(schedule)
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
