"""FLOP counts shared by the benchmarks: one forward pass, and a whole training run of a config.

Counted by torch.utils.flop_counter.FlopCounterMode on the real model (convolutions and matmuls; a
multiply-add is two FLOPs). A training step is taken as three forward passes (forward, and the backward's
two products), so a run costs 3 x the forward FLOPs of every image of every epoch at that epoch's size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cifar10_cnn.config import TrainConfig
from cifar10_cnn.models import create_model


def forward_flops(model: nn.Module, size: int = 32) -> int:
    """FLOPs of one image's forward pass at size x size."""
    was_training = model.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, size, size))
    model.train(was_training)
    return counter.get_total_flops()


def epoch_flops(cfg: TrainConfig, n_train: int, num_classes: int = 10, size: int = 32) -> list[float]:
    """FLOPs of each epoch of training cfg on n_train images (full batches only, as fit() steps)."""
    model = create_model(cfg.model, num_classes=num_classes)
    per_epoch = (n_train // cfg.batch_size) * cfg.batch_size
    cost = {s: forward_flops(model, s) for s in {*cfg.sizes_of_epochs, size}}
    return [3 * per_epoch * cost[cfg.train_size(e) or size] for e in range(1, cfg.epochs + 1)]


def training_flops(cfg: TrainConfig, n_train: int, num_classes: int = 10, size: int = 32) -> float:
    """FLOPs of a whole training run of cfg on n_train images, --train-sizes included."""
    return sum(epoch_flops(cfg, n_train, num_classes, size))
