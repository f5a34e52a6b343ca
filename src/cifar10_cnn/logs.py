"""What a run tells as it trains: metrics.csv, TensorBoard events, the console, and a live bar on a TTY."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .runs import Run


class EpochLog:
    """Per-epoch metrics to the run's metrics.csv, TensorBoard and the console; a live bar per epoch."""

    def __init__(self, run: Run, *, progress: bool, start_epoch: int, echo: Callable[[str], None] = print):
        from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

        self.run = run
        self.bar = progress and sys.stderr.isatty()
        self.echo = echo
        self.tb = SummaryWriter(str(run.dir("tb")), purge_step=start_epoch + 1)

    def epoch_bar(self, epoch: int, epochs: int, steps: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not self.bar,
            dynamic_ncols=True, unit="step",
        )  # fmt: skip

    def log_epoch(self, row: dict[str, Any], history: list[dict[str, Any]], epochs: int) -> None:
        self.run.write_metrics(history)
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
            f"epoch {row['epoch']:>3}/{epochs}  train_loss {row['train_loss']:.4f}  "
            f"train_acc {row['train_acc']:.2%}{val}  lr {row['lr']:.4g}  {row['seconds']:.1f}s"
        )

    def close(self) -> None:
        self.tb.close()


class SilentLog(EpochLog):
    """The log of ranks other than 0 (and of benchmarks): no files, no console."""

    bar = False

    def __init__(self) -> None:
        pass

    def epoch_bar(self, epoch: int, epochs: int, steps: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=steps, disable=True)

    def log_epoch(self, row: dict[str, Any], history: list[dict[str, Any]], epochs: int) -> None:
        pass

    def close(self) -> None:
        pass
