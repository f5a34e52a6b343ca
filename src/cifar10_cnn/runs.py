"""The run directory: its files, written atomically, and the rules for creating one."""

from __future__ import annotations

import csv
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import UserError

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
RUN_FILES = ("config.json", "metrics.csv", "results.json", "model.safetensors", "report.md", "report.html")
RUN_DIRS = ("checkpoints", "plots", "tb", "eval")


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_FIELDS})
    os.replace(tmp, path)


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [
            {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.recipe}"


def prepare_run_dir(run_dir: Path, *, force: bool) -> None:
    """Create the run directory; refuse one that holds another run unless force, then clear that run."""
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        if not force:
            raise UserError(
                f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                "--force to replace it, or choose another --out"
            )
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
