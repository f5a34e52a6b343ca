"""Where in the image the evidence is: Grad-CAM and Integrated Gradients maps (Captum), overlays, figures.

`explain(model, images)` returns one map per image in [0, 1] at the image's resolution (the model's input
size: 32x32 for CIFAR):

- "gradcam": Captum's LayerGradCam on the feature map the classifier head reads (see `gradcam_layer`),
  rectified and upsampled bilinearly; each map divided by its maximum (an all-zero map means the layer holds
  no positive evidence for the class).
- "ig": Captum's IntegratedGradients from the dataset-mean image (zero after normalisation) in IG_STEPS
  steps; |attribution| summed over colour channels and divided by its 99th percentile, clipped at 1.

Captum is the `explain` extra; it is imported only when a map is computed, so overlays and the report's
other figures work without it.

Attribution registers forward hooks on the model while it runs: a forward pass of the same model object in
another thread at that moment (a concurrent prediction) would trip them. Serialise calls on one model, or
explain with a copy of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.image
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from . import plots
from .augment import normalize
from .calibration import softmax
from .errors import UserError
from .images import IMAGE_SIZE, ImageError, find_images, read_image_file
from .inference import predict_logits
from .runs import check_writable_dir, write_atomic
from .weights import load_model

METHODS = ("gradcam", "ig")
METHOD_NAMES = {"gradcam": "Grad-CAM", "ig": "Integrated Gradients"}
# Gauss-Legendre steps (Captum's default rule). Measured on a trained airbench_small, 32 test images: the
# [0, 1] maps differ from 128-step ones by 0.002 on average, 0.014 at the 99th percentile of pixels.
IG_STEPS = 32
CHUNK = 64  # images per attribution call, and IG path points per forward pass: bounds memory
MAX_IMAGES = 1000  # per `cifar10 explain` call: every decoded image is held until its figure is written
SHEET_COLUMNS = 8
SHEET_PAGE = 96  # images per contact sheet page, so a page stays a readable PNG
DPI = 100
OVERLAY = 128  # pixels of an overlay's side in the figures

# What a forward pass tells about a model: (Grad-CAM layer name, layer, number of classes).
_PROBES: weakref.WeakKeyDictionary[nn.Module, tuple[str, nn.Module, int]] = weakref.WeakKeyDictionary()


def require_captum() -> Any:
    """The captum.attr module, or one clear error saying how to install it."""
    try:
        import captum.attr
    except ImportError:
        raise UserError("explanations need Captum: python -m pip install -e '.[explain]'") from None
    return captum.attr


def gradcam_layer(model: nn.Module, size: int = IMAGE_SIZE) -> tuple[str, nn.Module]:
    """The name and module of the layer Grad-CAM reads (see `_probe`) for images of size x size."""
    name, layer, _ = _probe(model, size)
    return name, layer


def _probe(model: nn.Module, size: int = IMAGE_SIZE) -> tuple[str, nn.Module, int]:
    """The module whose output is the last spatial feature map (larger than 1x1) of a forward pass.

    That is the map the classifier head pools or flattens: the last convolutional stage's output after its
    normalisation, activation and residual addition (the last Conv2d's raw output would miss the skip path
    of a residual block and the activation). Modules called more than once per forward (a shared activation)
    are skipped: their hooked output would be ambiguous. The probe is a black image of the model's input size
    (the first size asked for is the one remembered: a model takes one size).
    """
    if model in _PROBES:
        return _PROBES[model]
    names = {m: name for name, m in model.named_modules()}
    calls: list[tuple[nn.Module, bool]] = []  # completion order: children before their container

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        spatial = (
            isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1
        )
        calls.append((module, spatial))

    handles = [m.register_forward_hook(hook) for m in names if m is not model]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode(), _eval(model):
            logits = model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    counts: dict[nn.Module, int] = {}
    for m, _ in calls:
        counts[m] = counts.get(m, 0) + 1
    found = [m for m, spatial in calls if spatial and counts[m] == 1]
    if not found:
        raise UserError(f"{type(model).__name__} has no spatial feature map for Grad-CAM")
    _PROBES[model] = (names[found[-1]], found[-1], logits.shape[1])
    return _PROBES[model]


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration of a block, then the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _targets(target: int | Sequence[int] | np.ndarray | None, n: int, classes: int) -> np.ndarray | None:
    if target is None:
        return None
    t = np.broadcast_to(np.asarray(target, dtype=np.int64), (n,))
    if len(t) and (t.min() < 0 or t.max() >= classes):
        raise UserError(f"target class {int(t.min() if t.min() < 0 else t.max())} is not in 0..{classes - 1}")
    return t


def _check_images(images: np.ndarray) -> None:
    square = images.ndim == 4 and images.shape[1] == images.shape[2] and images.shape[3] == 3
    if images.dtype != np.uint8 or not square:
        raise ValueError(f"expected square uint8 images (N, S, S, 3), got {images.dtype} {images.shape}")


def _top_logit(model: nn.Module) -> Any:
    """A forward function whose one output is each image's highest logit (the argmax is a constant index)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return logits.gather(1, logits.argmax(1, keepdim=True).detach())

    return forward


def _gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    attr = require_captum()
    # The predicted class in the same forward pass as its gradient: one forward instead of two.
    forward, target = (model, target) if target is not None else (_top_logit(model), 0)
    layer = gradcam_layer(model, x.shape[-1])[1]
    cam = attr.LayerGradCam(forward, layer).attribute(x, target=target, relu_attributions=True)
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).clamp(0, 1)


def _integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    attr = require_captum()
    if target is None:  # the class predicted for the image itself, not for each point of the path
        with torch.no_grad():
            target = model(x).argmax(1)
    ig = attr.IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=target, n_steps=IG_STEPS, internal_batch_size=CHUNK
    )
    saliency = ig.abs().sum(1)
    scale = torch.quantile(saliency.flatten(1), 0.99, dim=1).clamp_min(1e-12)[:, None, None]
    return (saliency / scale).clamp(0, 1)


def _memory_format(model: nn.Module) -> torch.memory_format:
    """The layout of the model's first conv filters: inputs in another layout cost a copy at every conv."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def explain(
    model: nn.Module,
    images: np.ndarray,
    *,
    method: str = "gradcam",
    target: int | Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Maps (N, S, S) float32 in [0, 1] of uint8 images (N, S, S, 3): where the evidence for a class is.

    target: one class index for all images, one per image, or None for each image's predicted class.
    """
    if method not in METHODS:
        raise UserError(f"unknown explanation method {method!r}; use one of: {', '.join(METHODS)}")
    _check_images(images)
    size = images.shape[1]
    targets = _targets(target, len(images), _probe(model, size)[2])
    device = next(model.parameters()).device
    out = np.zeros((len(images), size, size), np.float32)
    fn = _gradcam if method == "gradcam" else _integrated_gradients
    with torch.inference_mode(False), _eval(model):
        for start in range(0, len(images), CHUNK):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + CHUNK])).permute(0, 3, 1, 2)
            x = normalize(batch.to(device)).contiguous(memory_format=_memory_format(model))
            t = (
                None
                if targets is None
                else torch.from_numpy(targets[start : start + len(x)].copy()).to(device)
            )
            with torch.enable_grad():
                out[start : start + len(x)] = fn(model, x, t).detach().float().cpu().numpy()
    return out


# --- pictures ---------------------------------------------------------------------------------------------


def overlay(
    image: np.ndarray, heatmap: np.ndarray, *, size: int = 128, alpha: float = 0.6, cmap: str = "jet"
) -> np.ndarray:
    """uint8 (size, size, 3): the image enlarged (bicubic) with the map (bilinear) coloured on top.

    The colour's weight is alpha times the map, so where there is no evidence the image shows unchanged.
    """
    if image.ndim != 3 or image.shape[2] != 3 or heatmap.shape != image.shape[:2]:
        raise ValueError(
            f"expected an (H, W, 3) image and an (H, W) map, got {image.shape} and {heatmap.shape}"
        )
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    img = nn.functional.interpolate(img, size=(size, size), mode="bicubic", align_corners=False)
    img = img.clamp(0, 255)[0].permute(1, 2, 0).numpy() / 255
    heat = torch.from_numpy(np.nan_to_num(heatmap.astype(np.float32)))[None, None]
    heat = nn.functional.interpolate(heat, size=(size, size), mode="bilinear", align_corners=False)
    heat = heat.clamp(0, 1)[0, 0].numpy()[..., None]
    colour = matplotlib.colormaps[cmap](heat[..., 0])[..., :3]
    blend = (1 - alpha * heat) * img + alpha * heat * colour
    return np.round(blend * 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image as PNG bytes (for the JSON API's base64 field or a file)."""
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, np.ascontiguousarray(rgb), format="png")
    return buf.getvalue()


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.1, facecolor="white")
    return buf.getvalue()


def _panel(ax: Any, picture: np.ndarray, title: str, fontsize: float = 9) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize, pad=3)
    ax.set_axis_off()


def explanation_figure(
    image: np.ndarray, maps: np.ndarray, captions: Sequence[str], title: str = ""
) -> Figure:
    """The input beside one overlay per map (maps (K, S, S), one caption each, e.g. "cat 83.1%")."""
    fig = Figure(figsize=(1.9 * (len(maps) + 1), 2.35))
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    _panel(axes[0], overlay(image, np.zeros(image.shape[:2], np.float32)), "input")
    for ax, heat, caption in zip(axes[1:], maps, captions, strict=True):
        _panel(ax, overlay(image, heat), caption)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def contact_sheet(images: np.ndarray, maps: np.ndarray, captions: Sequence[str], title: str = "") -> Figure:
    """A grid of overlays, one per image, each captioned (e.g. its file name and predicted class)."""
    n = len(images)
    cols = min(SHEET_COLUMNS, max(n, 1))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.6 * cols, 1.85 * rows + (0.4 if title else 0)))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:  # the unfilled end of the last row
        ax.set_axis_off()
    for ax, image, heat, caption in zip(axes[:n], images, maps, captions, strict=True):
        _panel(ax, overlay(image, heat), caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def explanation_rows(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[Sequence[str]]]], per_line: int = 4
) -> Figure:
    """Groups of images, one band each: (title, images (N, S, S, 3), maps (N, K, S, S), captions).

    Each image takes K + 1 panels, the input then its K overlays; captions hold K + 1 strings per image.
    Each band is one canvas (plots.captioned_grid): a 36-panel figure draws in well under a second.
    """
    k = max((maps.shape[1] for _, _, maps, _ in rows), default=1)
    cols, scale, title_height = per_line * (k + 1), 1.2 / OVERLAY, 0.3
    width, band_height = plots.grid_shape(cols, cols, OVERLAY, scale, lines=2, fontsize=7)
    fig = Figure(figsize=(width, len(rows) * (band_height + title_height)), facecolor="white")
    for r, (title, images, maps, captions) in enumerate(rows):
        pictures, texts = [], []
        for image, heat, caption in zip(images[:per_line], maps, captions, strict=False):
            blank = np.zeros(image.shape[:2], np.float32)
            pictures += [overlay(image, blank)] + [overlay(image, h) for h in heat]
            texts += list(caption)
        bottom = 1 - (r + 1) / len(rows)
        ax = fig.add_axes((0, bottom, 1, band_height / (band_height + title_height) / len(rows)))
        if pictures:
            plots.captioned_grid(ax, np.stack(pictures), texts, ncols=cols, scale=scale, lines=2, fontsize=7)
        ax.set_axis_off()
        ax.set_title(title, fontsize=10, pad=4, loc="center")
        ax.set_xlim(-0.5, width / scale - 0.5)  # a short band keeps the width of a full one
    return fig


# --- the verb -----------------------------------------------------------------------------------------------


def resolve_class(value: str | int, classes: Sequence[str]) -> int:
    """A class given by name (any case) or index -> its index; UserError naming the choices otherwise."""
    text = str(value).strip()
    names = [c.lower() for c in classes]
    if text.lower() in names:
        return names.index(text.lower())
    # isdecimal, not isdigit: '²' is a digit that int() cannot read; the length keeps int() from refusing 5,000 digits
    if text.isdecimal() and len(text) <= 9 and int(text) < len(classes):
        return int(text)
    raise UserError(f"unknown class {text!r}; use one of: {', '.join(classes)} (or 0..{len(classes) - 1})")


def read_images(
    inputs: Sequence[str | os.PathLike], size: int = IMAGE_SIZE
) -> tuple[list[int], list[Path], np.ndarray, list[tuple[int, Path, str]]]:
    """Image files and folders -> the readable ones (input positions, paths, uint8 (N, size, size, 3)) and the
    rest.

    As in predict, a file that cannot be read is listed with why (position, path, reason) and the others go on;
    a UserError only when no file could be read (it names the first one).
    """
    paths = find_images(inputs)
    if not paths:
        raise UserError(f"no image files found in {', '.join(map(str, inputs))}")
    if len(paths) > MAX_IMAGES:
        raise UserError(f"{len(paths)} images given; explain at most {MAX_IMAGES} at a time")
    positions, good, images, failed = [], [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(read_image_file(path, size=size))
        except ImageError as e:
            failed.append((i, path, str(e)))
            continue
        positions.append(i)
        good.append(path)
    if not good:
        _, path, why = failed[0]
        more = f" (and {len(failed) - 1} more that cannot be read)" if len(failed) > 1 else ""
        raise UserError(f"{path}: {why}{more}")
    return positions, good, np.stack(images), failed


def _output_dir(out: Path | None) -> Path:
    """--out, which must be new or empty (nothing of the user's is overwritten), or a new timestamped one."""
    out = Path(out) if out is not None else Path(f"explain-{dt.datetime.now():%Y%m%d-%H%M%S}")
    check_writable_dir(out)  # --out, or a folder above it, is a file; or read-only
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not an empty folder; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _file_name(index: int, width: int, path: Path) -> str:
    """A unique, portable output name: the input's position, then its name's safe characters."""
    return f"{index + 1:0{width}d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', path.stem)[:60]}.png"


def explain_command(
    run: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    method: str = "gradcam",
    target: str | None = None,
    top: int = 3,
    out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """`cifar10 explain`: a PNG per image (the input, maps of the top classes or --target), contact sheets.

    Files that cannot be read are listed and skipped, as predict does; the exit status is then 1, else 0.
    """
    if top < 1:
        raise UserError(f"--top {top}: give 1 or more")
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; use one of: {', '.join(METHODS)}")
    require_captum()
    model, meta = load_model(run)
    classes = list(meta.classes)
    wanted = None if target is None else resolve_class(target, classes)
    positions, paths, images, failed = read_images(inputs, meta.image_size)
    out = _output_dir(out)
    logits = predict_logits(model, torch.from_numpy(images).permute(0, 3, 1, 2))
    probs = softmax(logits.numpy(), meta.temperature)
    shown = np.argsort(-probs, axis=1, kind="stable")[:, : min(top, len(classes))]
    if wanted is not None:
        shown = np.full((len(images), 1), wanted)
    maps = np.stack(
        [explain(model, images, method=method, target=shown[:, r]) for r in range(shown.shape[1])], 1
    )
    width = max(3, len(str(len(positions) + len(failed))))
    errors = {i: f"{path}  error: {why}" for i, path, why in failed}
    captions = []
    for k, (i, path) in enumerate(zip(positions, paths, strict=True)):
        for j in sorted(e for e in errors if e < i):  # the failures before this file, in input order
            echo(errors.pop(j))
        labels = [f"{classes[c]} {probs[k, c]:.1%}" for c in shown[k]]
        fig = explanation_figure(images[k], maps[k], labels, title=f"{path.name} · {METHOD_NAMES[method]}")
        name = out / _file_name(i, width, path)
        write_atomic(name, figure_png(fig))
        echo(f"{name}  {path}  {', '.join(labels)}")
        captions.append(f"{path.name[:18]}\n{labels[0]}")
    for line in errors.values():
        echo(line)
    _write_sheets(out, images, maps[:, 0], captions, f"{METHOD_NAMES[method]} · {Path(run).name}", echo)
    failures = f"; {len(failed)} failed" if failed else ""
    echo(
        f"{len(paths)} image{'s' * (len(paths) != 1)} explained with {METHOD_NAMES[method]} in {out}{failures}"
    )
    return 1 if failed else 0


def _write_sheets(
    out: Path, images: np.ndarray, maps: np.ndarray, captions: list[str], title: str, echo: Callable
) -> None:
    """Contact sheets of SHEET_PAGE images each (one, named contact-sheet.png, when they fit on one)."""
    for page, start in enumerate(range(0, len(images), SHEET_PAGE), 1):
        sl = slice(start, start + SHEET_PAGE)
        sheet = out / ("contact-sheet.png" if len(images) <= SHEET_PAGE else f"contact-sheet-{page:02d}.png")
        write_atomic(sheet, figure_png(contact_sheet(images[sl], maps[sl], captions[sl], title)))
        echo(f"{sheet}  contact sheet of {len(captions[sl])} image{'s' * (len(captions[sl]) != 1)}")
