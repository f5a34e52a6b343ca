"""A few steps of the quick recipe, under torchrun or as one plain process (tests/test_distributed.py runs it).

    python tests/ddp_worker.py OUT_DIR [--micro-batch N]
    torchrun --nproc-per-node 2 tests/ddp_worker.py OUT_DIR

Each epoch is one step (subset = batch). After every step, rank 0 gathers every rank's parameters and records
the largest difference between ranks; it then writes the final weights and that record to OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from cifar10_cnn import data as D
from cifar10_cnn import distributed
from cifar10_cnn.config import recipe_config
from cifar10_cnn.train import fit

BATCH = 256


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--micro-batch", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = recipe_config(
        "quick", subset=BATCH, batch_size=BATCH, micro_batch=args.micro_batch, epochs=3, amp="off", val_size=0
    )
    with distributed.launched(torch.device("cpu")) as world:
        data = D.load_cifar10(os.environ["CIFAR10_DATA"], progress=False)
        splits = D.make_splits(data, **cfg.split_args())
        spread: list[float] = []

        def compare(epoch: int, model: torch.nn.Module, row: dict) -> None:
            mine = flat_params(model)
            gathered = [torch.empty_like(mine) for _ in range(world.size)]
            if world.size > 1:
                dist.all_gather(gathered, mine)
            else:
                gathered = [mine]
            spread.append(max((g - gathered[0]).abs().max().item() for g in gathered))

        result = fit(
            cfg,
            splits,
            args.out / f"run-{world.size}",
            progress=False,
            echo=lambda *_: None,
            on_epoch_end=compare,
        )
        if world.main:
            state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
            save_file(state, str(args.out / f"weights-{world.size}.safetensors"))
            (args.out / f"record-{world.size}.json").write_text(
                json.dumps({"world": world.size, "spread": spread, "history": result.history})
            )


if __name__ == "__main__":
    main()
