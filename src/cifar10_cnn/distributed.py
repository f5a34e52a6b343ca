"""Data-parallel training over torch.distributed: one process per device, launched by torchrun.

    torchrun --nproc-per-node 2 -m cifar10_cnn train --recipe fast          # 2 processes on one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m cifar10_cnn train --recipe fast   # on each of 2 machines

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `launched()` joins the process group (NCCL on CUDA, Gloo on
CPU). `--batch-size` stays the global batch: each rank trains on its own contiguous share of every batch,
gradients are averaged by DistributedDataParallel, and every rank draws the same shuffle and augmentation
from the same seed, so N processes compute what one process computes with micro-batches of batch / N.
Rank 0 alone writes logs, checkpoints and the report; every rank can resume from the checkpoint, whatever
the number of processes that wrote it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return dist.get_backend() if self.size > 1 else "none"

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() run on rank 0 only, its result (or its UserError) delivered to every rank."""
        result: list[Any] = [None]
        if self.main:
            try:
                result[0] = ("ok", fn())
            except UserError as e:
                result[0] = ("error", str(e))
        if self.size > 1:
            dist.broadcast_object_list(result, src=0)
        kind, value = result[0]
        if kind == "error":
            raise UserError(value)
        return value

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (a download, a cache), the others after it; its error reaches every rank."""
        if self.size == 1:
            yield
            return
        message: list[Any] = [None]
        if self.main:
            try:
                yield
            except BaseException as e:
                message[0] = str(e) if isinstance(e, UserError) else f"rank 0 failed: {type(e).__name__}: {e}"
                raise
            finally:
                dist.broadcast_object_list(message, src=0)
        else:
            dist.broadcast_object_list(message, src=0)
            if message[0] is not None:
                raise UserError(message[0])
            yield

    def check_same(self, what: str, value: dict[str, Any]) -> None:
        """Every rank must hold the same value (e.g. the config); else one clear error on every rank."""
        if self.size == 1:
            return
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        for rank, other in enumerate(values):
            if other != values[0]:
                diff = sorted(k for k in set(other) | set(values[0]) if other.get(k) != values[0].get(k))
                shown = ", ".join(f"{k}={values[0].get(k)!r} vs {other.get(k)!r}" for k in diff[:3])
                raise UserError(f"the ranks disagree on the {what}: rank 0 and rank {rank} differ in {shown}")

    def broadcast(self, value: T) -> T:
        """Rank 0's value on every rank (a picklable object)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank, so that all evaluate alike."""
        if self.size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Scalars summed over the ranks, as float64 CPU tensors (one all-reduce; NCCL needs them on the GPU)."""
        device = values[0].device if self.size > 1 and self.backend == "nccl" else torch.device("cpu")
        flat = torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in values])
        if self.size > 1:
            dist.all_reduce(flat)
        return list(flat.cpu().unbind())


def current() -> World:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, each process takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def launched(device: torch.device) -> Iterator[World]:
    """Join the process group torchrun set up (if any) for the duration; leave it cleanly."""
    if env_world_size() <= 1 or dist.is_initialized():
        yield current()
        return
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1, but this PyTorch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()
