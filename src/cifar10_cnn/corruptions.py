"""Common corruptions of the test set, regenerated in code after CIFAR-10-C (Hendrycks & Dietterich, 2019).

The official CIFAR-10-C files cannot be downloaded here, so ten of its fifteen corruptions are rebuilt from
the published definitions and per-severity constants of the 32x32 version: the same formulas, the same
constants, the same libraries where it matters (Pillow for pixelate and JPEG), and ImageMagick's motion-blur
kernel written out in numpy. The random parts are drawn from a seeded generator per (corruption, severity),
so every model is tested on the same corrupted images. This is a regenerated approximation: figures are
close to, not identical with, those on the official files.

Pure numpy (and Pillow): images in, images out. `evaluate.evaluate_corruptions` runs a model over them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)
CHUNK = 1000  # images corrupted at once: bounds the float64 temporaries to a few tens of MB

# The per-severity constants of the CIFAR-10-C generator (32x32 images).
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # std of additive noise on [0, 1] pixels
SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity (Poisson)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # disk radius, anti-alias sigma
MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # ImageMagick radius, sigma
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))  # strength, fractal wibble decay
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to the HSV value channel
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the distance from each channel's mean
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # downscale factor before scaling back up
JPEG_QUALITY = (80, 65, 58, 50, 40)

APPROXIMATION_NOTE = (
    "These corruptions are a regenerated approximation, not the official CIFAR-10-C files (which were not "
    "used): 10 of the 15 corruptions of Hendrycks & Dietterich (2019), rebuilt in code with the published "
    "32x32 constants and a fixed seed. The mean is over these 10 only, so it is not comparable with published "
    "15-corruption figures."
)


# --- the corruptions: float images in [0, 1] (N, H, W, 3) -> float images (clipped later) --------------------


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=GAUSSIAN_NOISE[severity - 1], size=x.shape)


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SHOT_NOISE[severity - 1]
    return rng.poisson(x * c) / c


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on each value independently, half salt and half pepper (scikit-image's s&p)."""
    flipped = rng.random(x.shape) < IMPULSE_NOISE[severity - 1]
    salt = rng.random(x.shape) < 0.5
    return np.where(flipped, salt.astype(x.dtype), x)


def _filter(x: np.ndarray, kernel: np.ndarray, mode: str = "reflect") -> np.ndarray:
    """Correlate every channel with a small odd-sized kernel; "reflect" is OpenCV's default border (101)."""
    r = kernel.shape[0] // 2
    padded = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode=mode)
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    for dy in range(kernel.shape[0]):
        for dx in range(kernel.shape[1]):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
    return out


def disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """A normalised disk on a 17x17 grid, smoothed by a 3x3 Gaussian (as OpenCV's GaussianBlur), trimmed."""
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_sigma**2))
    g /= g.sum()
    smooth = np.zeros((19, 19))
    for i in range(3):
        for j in range(3):
            smooth[i : i + 17, j : j + 17] += g[i] * g[j] * disk
    smooth = smooth[1:-1, 1:-1]  # back to 17x17: the disk's mass lies well inside
    keep = np.flatnonzero((smooth > 1e-12).any(0))  # drop taps that underflow to nothing
    r = max(8 - keep.min(), keep.max() - 8)
    return smooth[8 - r : 9 + r, 8 - r : 9 + r]


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _filter(x, disk_kernel(*DEFOCUS_BLUR[severity - 1]))


def motion_kernel(radius: int, sigma: float, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageMagick's motion blur: tap weights (a one-sided Gaussian) and per-angle pixel offsets dx, dy.

    Tap i of an image blurred at angle a (degrees) reads the pixel (x + dx[i], y + dy[i]), rounded as
    ImageMagick rounds; the kernel has 2 * ceil(radius) + 1 taps.
    """
    taps = np.arange(2 * int(np.ceil(radius)) + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    a = np.deg2rad(np.asarray(angles, dtype=np.float64))[..., None]
    dx = np.ceil(taps * np.cos(a) - 0.5).astype(int)
    dy = np.ceil(taps * np.sin(a) - 0.5).astype(int)
    return weights / weights.sum(), dx, dy


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random direction per image in [-45, 45] degrees; pixels beyond the border repeat the edge."""
    n, h, w, _ = x.shape
    weights, dx, dy = motion_kernel(*MOTION_BLUR[severity - 1], rng.uniform(-45, 45, size=n))
    batch = np.arange(n)[:, None, None]
    out = np.zeros_like(x)
    for k, weight in enumerate(weights):
        rows = np.clip(np.arange(h)[None, :] + dy[:, k : k + 1], 0, h - 1)[:, :, None]
        cols = np.clip(np.arange(w)[None, :] + dx[:, k : k + 1], 0, w - 1)[:, None, :]
        out += weight * x[batch, rows, cols]
    return out


def plasma_fractal(n: int, rng: np.random.Generator, mapsize: int = 32, decay: float = 3.0) -> np.ndarray:
    """n diamond-square height maps (n, mapsize, mapsize) in [0, 1], as the reference generator makes them."""
    maps = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares = squares + np.roll(squares, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(squares)
        centres, corners = maps[:, half::step, half::step], maps[:, ::step, ::step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, ::step, half::step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, ::step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = FOG[severity - 1]
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    haze = strength * plasma_fractal(len(x), rng, x.shape[1], decay)[..., None]
    return (x + haze) * peak / (peak + strength)


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add to HSV value (the channel maximum): hue and saturation kept, so RGB scales by new/old value."""
    value = x.max(axis=3, keepdims=True)
    brighter = np.clip(value + BRIGHTNESS[severity - 1], 0, 1)
    # A black pixel has no hue or saturation: it becomes grey at the new value, as in HSV -> RGB.
    return np.where(value > 0, x * brighter / np.maximum(value, 1e-12), brighter)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * CONTRAST[severity - 1] + mean


def _per_image(images: np.ndarray, fn: Callable[[Any], Any]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(fn(Image.fromarray(img))) for img in images])


def pixelate(images: np.ndarray, severity: int) -> np.ndarray:
    """Box-filter down to a fraction of the size and back up (uint8 in, uint8 out)."""
    from PIL import Image

    h, w = images.shape[1:3]
    c = PIXELATE[severity - 1]
    return _per_image(
        images,
        lambda im: im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX),
    )


def jpeg_compression(images: np.ndarray, severity: int) -> np.ndarray:
    """Encode as JPEG at the severity's quality and decode again (uint8 in, uint8 out)."""
    from PIL import Image

    def roundtrip(im: Any) -> Any:
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=JPEG_QUALITY[severity - 1])
        return Image.open(buffer).convert("RGB")

    return _per_image(images, roundtrip)


FLOAT_CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
}
UINT8_CORRUPTIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """The images (N, H, W, 3) uint8 under one corruption at severity 1-5, as uint8; the same for the same seed."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if name in UINT8_CORRUPTIONS:
        return UINT8_CORRUPTIONS[name](images, severity)
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name), severity])
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        x = images[start : start + CHUNK].astype(np.float64) / 255
        y = FLOAT_CORRUPTIONS[name](x, severity, rng)
        y = np.clip(y, 0, 1) * 255
        # The reference truncates its float images to uint8, except motion blur, which ImageMagick renders
        # to 8 bits itself (rounding).
        out[start : start + CHUNK] = (np.rint(y) if name == "motion_blur" else y).astype(np.uint8)
    return out
