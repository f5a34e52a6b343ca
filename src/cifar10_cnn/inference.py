"""Logits of uint8 images for any model: the one batched inference loop (evaluation, validation, predict, export).

Images are uint8 (N, 3, 32, 32) tensors, on any device and in any memory format; they are normalised here
by augment.normalize, as in training (norm: a stored model's own (mean, std); CIFAR-10's by default). Test-time augmentation: level 1 averages each image with its mirror; level 2 also
averages that with two views shifted by one pixel (up-left and down-right, reflect padding), the unshifted
views weighted one half. Selective TTA (tta_margin < 1) augments only the images the plain view is unsure
of: those whose two most probable classes are closer than tta_margin in softmax probability. An image's
logits depend on that image alone, never on the others evaluated with it.
"""

from __future__ import annotations

import torch
from torch import nn

from .augment import CIFAR10_NORM, Norm, normalize
from .data import Split
from .device import autocast


def _views(model: nn.Module, x: torch.Tensor, tta: int, plain: torch.Tensor | None = None) -> torch.Tensor:
    """The TTA logits of a normalised batch; plain: the batch's unaugmented logits if already computed."""

    def mirrored(v: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        v = v.contiguous(memory_format=torch.channels_last)
        logits = model(v).float() if known is None else known
        return 0.5 * (logits + model(v.flip(3)).float()) if tta else logits

    logits = mirrored(x, plain)
    if tta == 2:
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        logits = 0.5 * logits + 0.25 * (mirrored(padded[:, :, :-2, :-2]) + mirrored(padded[:, :, 2:, 2:]))
    return logits


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int | None = None,
    tta: int = 0,
    amp_dtype: torch.dtype | None = None,
    norm: Norm = CIFAR10_NORM,
    plain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (float32, on CPU) of uint8 images (N, 3, H, W), batch by batch, in eval mode (batch_size None:
    the device's, see eval_batch_size). plain: the images' logits without TTA, if known (not computed again)."""
    model.eval()
    device = next(model.parameters()).device
    batch_size = eval_batch_size(device) if batch_size is None else batch_size
    out = []
    with (
        torch.inference_mode(),
        autocast(device, amp_dtype),
    ):
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device, non_blocking=True), norm=norm)
            known = None if plain is None else plain[start : start + batch_size].to(device)
            out.append(_views(model, x, tta, known).cpu())
    return torch.cat(out) if out else torch.zeros(0, _num_outputs(model))


def _num_outputs(model: nn.Module) -> int:
    """Logits per image: the out_features of the model's last linear layer (every model here ends in one)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def eval_batch_size(device: torch.device) -> int:
    """Images per forward pass of evaluation: 250 on a CPU, where the activations of 1,000 fall out of the
    caches (batches of 1,000 were 1.45-1.6x slower: benchmarks/step_efficiency.py), 1,000 on CUDA and MPS."""
    return 250 if device.type == "cpu" else 1000


def evaluate_logits(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int | None = None,
    tta: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits for a whole split (float32, on CPU), with test-time augmentation at level tta."""
    return predict_logits(model, split.images, batch_size=batch_size, tta=tta, amp_dtype=amp_dtype)


def selective_tta_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    tta: int,
    tta_margin: float = 1.0,
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of uint8 images with TTA only where the plain view is unsure, and the mask of those images."""
    kw = dict(batch_size=batch_size, amp_dtype=amp_dtype)
    if not tta or tta_margin >= 1:
        return predict_logits(model, images, tta=tta, **kw), torch.full((len(images),), bool(tta))
    logits = predict_logits(model, images, **kw)
    top2 = logits.softmax(1).topk(2, dim=1).values
    unsure = (top2[:, 0] - top2[:, 1]) < tta_margin
    if unsure.any():
        picked = images[unsure.to(images.device)]
        logits[unsure] = predict_logits(model, picked, tta=tta, plain=logits[unsure], **kw)
    return logits, unsure


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of logits against labels."""
    labels = labels.to(logits.device)
    loss = nn.functional.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()
