"""Untrusted image files -> the one preprocessing of every path (predict, serve, the exported model's users).

1. decode the first frame with Pillow (refusing files over MAX_PIXELS); large JPEGs are decoded at a reduced
   DCT scale (1/2..1/8) that still leaves at least DRAFT_SIZE pixels on each side;
2. apply the EXIF orientation;
3. centre-crop to a square (the short side);
4. convert to 8-bit RGB: 16-bit and float samples are scaled to 8 bits, palettes expanded, and any
   transparency is composited onto white;
5. resize to 32x32 (or the model's input size: `size`) with Pillow's antialiased bicubic filter.

The result is a uint8 (32, 32, 3) RGB array, exactly what CIFAR-10 holds; a 32x32 RGB image passes unchanged.
Samples of more than 8 bits are resized before they are scaled (steps 4 and 5 swap), in their own mode, so a
16-bit image costs no more memory than its decoded pixels. Nothing here changes Pillow's global settings; the
memory of the decodes in flight is bounded by a DecodeBudget.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .constants import IMAGE_SIZE
from .errors import UserError, first_line
from .files import FileTooLarge, NotRegularFile, read_regular

MAX_PIXELS = 60_000_000  # above a 50-megapixel photo; a decoded RGBA image this size is 240 MB
MAX_FILE_BYTES = 256 * 2**20  # no image we accept is this large on disk
# JPEG draft decoding keeps at least 4x the output side (of 32 here; open_image takes 4x a larger one)
DRAFT_SIZE = 128
RESAMPLE = Image.Resampling.BICUBIC
DECODE_BUDGET = 512 * 2**20  # bytes of decoded pixels in flight, all decodes together
# Raster formats Pillow decodes by itself. Left out on purpose: EPS (runs Ghostscript on the file), and the
# scientific, font, video and thumbnail formats that no photo comes in.
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "JPEG2000")
FORMATS += ("AVIF", "QOI", "PCX", "SGI")
HIGH_BIT_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")

# Image.open warns (DecompressionBombWarning) about large images before we can check their size; the warning
# is silenced around it, one thread at a time, because the warnings filters are process-wide state.
_OPEN_LOCK = threading.Lock()


class ImageError(UserError):
    """One image cannot be used; status is the HTTP status the web service answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class DecodeBudget:
    """Bytes of decoded pixels in flight, shared by threads: a decode waits until its estimate fits.

    Small decodes (up to 1/16 of the budget) have a lane of their own, a quarter of the budget, so that they
    never queue behind large ones. A large decode over the whole budget still runs, alone among the large
    ones, so that every image under MAX_PIXELS can be decoded. At most max_bytes * 1.25 are in flight, or one
    oversized decode and the small lane.
    """

    def __init__(self, max_bytes: int = DECODE_BUDGET):
        self.max_bytes = max_bytes
        self.small = max_bytes // 16
        self.in_flight = {"small": 0, "large": 0}
        self._cond = threading.Condition()

    def _fits(self, lane: str, nbytes: int) -> bool:
        used = self.in_flight[lane]
        limit = self.max_bytes // 4 if lane == "small" else self.max_bytes
        return used == 0 or used + nbytes <= limit

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Wait until nbytes fit, hold them for the body of the with statement."""
        lane = "small" if nbytes <= self.small else "large"
        with self._cond:
            self._cond.wait_for(lambda: self._fits(lane, nbytes))
            self.in_flight[lane] += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.in_flight[lane] -= nbytes
                self._cond.notify_all()


_DEFAULT_BUDGET = DecodeBudget()


def formats() -> list[str]:
    """The supported formats that this Pillow can open."""
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


def decode_cost(img: Image.Image) -> int:
    """Bytes a decode of this (opened, not yet loaded) image can hold at once: its pixels, twice."""
    per_pixel = {"1": 1, "L": 1, "P": 1}.get(img.mode, 2 if img.mode.startswith("I;16") else 4)
    return 2 * per_pixel * img.size[0] * img.size[1]


def open_image(data: bytes, max_pixels: int = MAX_PIXELS, size: int = IMAGE_SIZE) -> Image.Image:
    """Open untrusted image bytes (header only: the first frame), refusing empty and oversized images; a JPEG
    is then decoded at a reduced scale that keeps 4x the output side `size` (at least DRAFT_SIZE)."""
    if not data:
        raise ImageError("the file is empty", 400)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats())
    except Image.DecompressionBombError:
        raise ImageError(
            f"the image has more than {max_pixels:,} pixels (a decompression bomb?)", 413
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image in a supported format ({', '.join(formats())})", 415) from None
    except Exception as e:  # untrusted input: any decoder failure is the file's fault, not the server's
        raise ImageError(f"the image is truncated or corrupt ({first_line(e)})", 422) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels", 413
        )
    draft = max(DRAFT_SIZE, 4 * size)
    img.draft(None, (draft, draft))  # JPEG only; a no-op for other formats
    return img


def to_rgb(img: Image.Image, scale: float | None = None) -> Image.Image:
    """8-bit RGB: 16-bit and float samples scaled (by scale, default eight_bit_scale), palettes expanded,
    transparency composited on white."""
    if img.mode in HIGH_BIT_MODES:
        a = np.asarray(img, dtype=np.float64)  # preprocess calls this on resized (size x size) images only
        scale = eight_bit_scale(img) if scale is None else scale
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA", "P") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some transparency: composite onto white
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            rgba = canvas
        return rgba.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def eight_bit_scale(img: Image.Image) -> float:
    """The factor to 0..255 of 16-bit, 32-bit or float samples: 16-bit and float 0..1 scaled, the rest kept."""
    peak = img.getextrema()[1]  # computed by Pillow, without a copy of the pixels
    if img.mode == "F":
        return 255.0 if peak <= 1.0 else 1.0  # float images are either 0..1 or 0..255
    return 255 / 65535 if img.mode.startswith("I;16") or peak > 255 else 1.0


def preprocess(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A decoded image -> uint8 (size, size, 3) RGB: EXIF orientation, centre square crop, RGB, resize."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even when it need not
        img = ImageOps.exif_transpose(img)
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    # Crop first: resizing with a box would let pixels outside the square bleed in through the filter.
    square = img.crop((left, top, left + s, top + s)) if (w, h) != (s, s) else img
    scale = None
    if (
        square.mode in HIGH_BIT_MODES
    ):  # resized in its own mode first: the conversion then copies size x size pixels
        scale = eight_bit_scale(square)
        square = square.resize((size, size), RESAMPLE)
    return np.asarray(to_rgb(square, scale).resize((size, size), RESAMPLE), dtype=np.uint8).copy()


def load_image(
    data: bytes, max_pixels: int = MAX_PIXELS, budget: DecodeBudget | None = None, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Image file bytes -> uint8 (size, size, 3), or ImageError saying what is wrong with the file.

    The decode waits for its share of the budget (default: one shared by the whole process).
    """
    return decode(open_image(data, max_pixels, size), budget, size)


def decode(img: Image.Image, budget: DecodeBudget | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """An opened image (open_image) -> uint8 (size, size, 3), its pixels decoded within the budget."""
    with (budget or _DEFAULT_BUDGET).reserve(decode_cost(img)):
        try:
            img.load()
        except Exception as e:  # untrusted input: any decoder failure is the file's fault
            raise ImageError(f"the image is truncated or corrupt ({first_line(e)})", 422) from None
        try:
            return preprocess(img, size)
        except Exception as e:  # e.g. a damaged EXIF block or an exotic mode
            raise ImageError(f"the image cannot be converted to RGB ({first_line(e)})", 422) from None
        finally:
            img.close()


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most max_bytes; ImageError for anything else (FIFOs, devices, ...)."""
    try:
        return read_regular(path, max_bytes)
    except FileNotFoundError:
        raise ImageError("no such file", 404) from None
    except NotRegularFile as e:
        if e.kind == "a folder":
            raise ImageError("is a directory", 400) from None
        raise ImageError("not a regular file (a FIFO, device or socket); skipped", 400) from None
    except FileTooLarge:
        raise ImageError(f"the file is over {max_bytes // 2**20} MB; too large for an image", 413) from None
    except OSError as e:
        raise ImageError(f"cannot read the file ({e.strerror or first_line(e)})", 400) from None


def read_image_file(
    path: str | os.PathLike, budget: DecodeBudget | None = None, size: int = IMAGE_SIZE
) -> np.ndarray:
    """An image file on disk -> uint8 (size, size, 3); ImageError for a missing, unreadable, special or bad file."""
    return load_image(read_file(path), budget=budget, size=size)


def image_extensions() -> set[str]:
    """File extensions of the supported formats (lower case, with the dot)."""
    allowed = set(formats())
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in allowed}


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly, and the image files under folders (recursively, sorted, hidden ones skipped).

    Special files under a folder (FIFOs, devices) are listed too, so that each is reported as skipped.
    """
    exts = image_extensions()
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out.extend(
                    Path(root) / f
                    for f in sorted(files)
                    if not f.startswith(".") and Path(f).suffix.lower() in exts
                )
        else:
            out.append(p)  # a missing or unreadable file is reported as that file's error
    return out
