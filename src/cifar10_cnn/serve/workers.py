"""The threads behind the handlers: the model's batcher, the explanation worker and the decoder pool.

The event loop never runs the model, an explanation or a large decode: each has threads of its own, bounded, so
that /health answers while they work.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..images import IMAGE_SIZE, DecodeBudget, ImageError, decode, decode_cost, open_image
from ..predict import Predictor, TorchPredictor
from ..weights import probe_images
from .errors import ApiError, clip
from .observe import Metrics

DECODE_MEMORY = 256 * 2**20  # bytes of decoded pixels in flight (about one 60-megapixel 16-bit image)
DECODE_THREADS = 16  # threads decoding or waiting for the budget; a lone small decode never waits for one
HEAVY_DECODE_THREADS = 2  # low-priority threads for the large decodes
MAX_EXPLAIN_IMAGES = (
    4  # images explained per request: a Grad-CAM map costs about a forward and a backward pass
)
EXPLAIN_BACKLOG = 8  # requests with explanations queued or running; beyond that a 503
EXPLAIN_OVERLAY = (
    128  # pixels of the overlay's side: the model's input (32x32 for CIFAR) enlarged, the map on top
)
# An ImageError's status says why an image was refused: the `reason` label of the refusal counter.
IMAGE_REFUSALS = {400: "empty", 413: "too_many_pixels", 415: "not_an_image", 422: "corrupt"}


def png_data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Batcher:
    """One inference thread that runs every request queued at that moment as one batch (up to max_batch)."""

    def __init__(
        self, predictor: Predictor, max_batch: int = 64, on_batch: Callable[[int], None] = lambda n: None
    ):
        self.predictor = predictor
        self.max_batch = max_batch
        self.on_batch = on_batch  # called with the size of each model call
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.batches = 0
        self.images = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Answer every request queued before, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of uint8 images (N, S, S, 3), computed in the inference thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.put((images, loop, future))
        return await future

    def _next_batch(self) -> tuple[list[Any], bool]:
        """The requests waiting now (at least one, up to max_batch images), and whether stop() was called."""
        job = self._queue.get()
        if job is None:
            return [], True
        jobs, n = [job], len(job[0])
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            n += len(job[0])
        return jobs, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            jobs, stopping = self._next_batch()
            if not jobs:
                return
            n = sum(len(j[0]) for j in jobs)
            try:
                probs = self.predictor.probabilities(np.concatenate([j[0] for j in jobs]))
                results: list[Any] = np.split(probs, np.cumsum([len(j[0]) for j in jobs])[:-1])
            except Exception as e:  # delivered to each waiting request, never kills the thread
                results = [e] * len(jobs)
            self.batches += 1
            self.images += n
            self.on_batch(n)
            for (_, loop, future), result in zip(jobs, results, strict=True):
                loop.call_soon_threadsafe(_deliver, future, result)


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


class Explainer:
    """Grad-CAM overlays in one thread of its own, on a copy of the torch model: Captum puts hooks on the model it
    explains, which a prediction on the same object in the inference thread would trip."""

    method = "gradcam"

    def __init__(
        self,
        model: Any,
        classes: list[str],
        image_size: int = IMAGE_SIZE,
        max_images: int = MAX_EXPLAIN_IMAGES,
        backlog: int = EXPLAIN_BACKLOG,
        on_explained: Callable[[int, float], None] = lambda n, seconds: None,
    ):
        self.model = copy.deepcopy(model).eval()
        self.classes = classes
        self.image_size = image_size  # the side of the model's input
        self.max_images = max_images
        self.backlog = backlog
        self.on_explained = on_explained  # images explained and seconds taken, per request
        self._slots = threading.BoundedSemaphore(
            backlog
        )  # released when the work ends, even if the client left
        self._thread = ThreadPoolExecutor(1, "explain")

    def target(self, value: str | None, n_images: int) -> int | None:
        """explain_class as a class index (None: each image's predicted class); ApiError for a bad request."""
        from ..explain import resolve_class

        if n_images > self.max_images:
            raise ApiError(
                422,
                f"explain=true explains at most {self.max_images} images per request; {n_images} were sent",
            )
        if value is None:
            return None
        try:
            return resolve_class(value, self.classes)
        except UserError:  # the CLI's `explain --target` reads its value with the same function
            choices = f"{', '.join(self.classes)} (or 0..{len(self.classes) - 1})"
            raise ApiError(
                422, f"explain_class: unknown class {clip(value.strip())!r}; use one of: {choices}"
            ) from None

    async def overlays(self, images: np.ndarray, targets: np.ndarray) -> list[str]:
        """Each image's map for its target class, overlaid on the image, as PNG data URLs."""
        if not self._slots.acquire(blocking=False):
            raise ApiError(503, f"{self.backlog} explanations are already waiting; retry in a moment")
        try:
            future = self._thread.submit(self._overlays, images, targets)
        except RuntimeError:  # shut down
            self._slots.release()
            raise ApiError(503, "the service is shutting down") from None
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    def _overlays(self, images: np.ndarray, targets: np.ndarray, record: bool = True) -> list[str]:
        from ..explain import explain, overlay

        t0 = time.perf_counter()
        maps = explain(self.model, images, method=self.method, target=targets)
        urls = [png_data_url(overlay(i, m, size=EXPLAIN_OVERLAY)) for i, m in zip(images, maps, strict=True)]
        if record:
            self.on_explained(len(images), time.perf_counter() - t0)
        return urls

    def warm_up(self) -> None:
        """One explanation, uncounted: the first imports Captum's modules (about a second)."""
        probe = probe_images(self.image_size)[:1]
        self._thread.submit(self._overlays, probe, np.zeros(1, np.int64), False).result()

    def stop(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


def make_explainer(predictor: Predictor, metrics: Metrics) -> tuple[Explainer | None, str]:
    """The explainer of a torch model, or None and why explain=true is refused (the backend, or no Captum).

    The explain module (and matplotlib, its colours) is imported only here: an ONNX server loads neither."""
    if not isinstance(predictor, TorchPredictor):
        return None, (
            f"explanations need the torch backend; this server runs {predictor.backend} "
            "(serve the run directory or .safetensors with --backend torch)"
        )
    from ..explain import require_captum

    try:
        require_captum()
    except UserError as e:
        return None, str(e)

    def record(n: int, seconds: float) -> None:
        metrics.explained.inc(n)
        metrics.explain_latency.observe(seconds)

    meta = predictor.meta
    return Explainer(predictor.model, list(meta.classes), meta.image_size, on_explained=record), ""


def _lower_priority() -> None:
    """Run this thread at a lower CPU priority (Linux: nice is per thread), where the OS allows it."""
    with suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class Decoder:
    """Uploads -> uint8 (size, size, 3) arrays (size: the model's input side): large images in low-priority
    threads, so that a decode-heavy upload takes the CPU that normal requests leave, and the memory the budget
    allows."""

    def __init__(
        self,
        max_pixels: int,
        budget: DecodeBudget,
        heavy_threads: int = HEAVY_DECODE_THREADS,
        on_decoded: Callable[[], None] = lambda: None,
        size: int = IMAGE_SIZE,
    ):
        self.max_pixels = max_pixels
        self.size = size
        self.budget = budget
        self.heavy_threads = heavy_threads
        self.heavy = ThreadPoolExecutor(heavy_threads, "decode-heavy", initializer=_lower_priority)
        self.on_decoded = on_decoded

    def decode_all(self, uploads: list[tuple[str, bytes]]) -> list[np.ndarray]:
        """Called in a worker thread; waits for the low-priority threads where an image is large."""
        out = []
        for name, data in uploads:
            try:
                img = open_image(data, self.max_pixels, self.size)
                if decode_cost(img) > self.budget.small:
                    out.append(self.heavy.submit(decode, img, self.budget, self.size).result())
                else:
                    out.append(decode(img, self.budget, self.size))
            except ImageError as e:
                raise ApiError(
                    e.status, f"{clip(name)}: {e}", IMAGE_REFUSALS.get(e.status, "other")
                ) from None
            self.on_decoded()
        return out
