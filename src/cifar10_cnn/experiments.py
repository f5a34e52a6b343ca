"""Experiments made of several runs: repeated seeds (mean ± std) and stratified K-fold cross-validation.

cifar10 train --recipe quick --seeds 5     # runs seed0..seed4 and summary.json
cifar10 train --recipe seed --cv 5         # runs fold0..fold4 and cv.json (validation accuracy mean ± std)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import distributed
from .config import TrainConfig
from .data import CIFAR10
from .datasets import load_data
from .errors import UserError
from .metrics import summarize
from .runs import CV_SUMMARY, SEEDS_SUMMARY, Run, default_run_dir, write_json
from .train import train


def _group_dir(cfg: TrainConfig, out: Path | None, suffix: str) -> Path:
    """The folder of a group of runs: out, or runs/<timestamp>-<recipe>-<suffix> (named once, on rank 0)."""
    if out is not None:
        return Path(out)
    base = default_run_dir(cfg)
    return base.with_name(f"{base.name}-{suffix}")


def _train_group(
    cfgs: dict[str, TrainConfig],
    out: Path,
    *,
    data: CIFAR10 | None,
    data_dir: str | os.PathLike | None,
    allow_unverified: bool,
    force: bool,
    progress: bool,
    echo: Callable[[str], None],
    on_run_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]] | None:
    """Each config trained into out/<name>; their results.json (None on ranks other than 0).

    on_run_end(k, results) runs on rank 0 after run k (the tuner prunes between folds with it)."""
    world = distributed.current()
    if data is None:
        with world.main_first():
            first = next(iter(cfgs.values()))  # the runs of a group differ in seed or fold, not in data
            data = load_data(
                data_dir,
                **first.data_args(),
                allow_unverified=allow_unverified,
                progress=progress and world.main,
            )
    runs = []
    for k, (name, cfg) in enumerate(cfgs.items()):
        echo(f"--- {name} ({k + 1}/{len(cfgs)})")
        run = train(cfg, out=out / name, data=data, force=force, progress=progress, echo=echo)
        if world.main:
            runs.append({"run": str(run), **Run(run).read_results()})
            if on_run_end is not None:
                on_run_end(k, runs[-1])
    return runs if world.main else None


def train_seeds(
    cfg: TrainConfig,
    seeds: int,
    *,
    out: Path | None = None,
    data: CIFAR10 | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """`seeds` runs of cfg with seeds cfg.seed, cfg.seed + 1, ...; writes summary.json beside their run dirs."""
    world = distributed.current()
    out = world.from_main(lambda: _group_dir(cfg, out, f"{seeds}seeds"))
    cfgs = {f"seed{cfg.seed + k}": replace(cfg, seed=cfg.seed + k) for k in range(seeds)}
    results = _train_group(
        cfgs, out, data=data, data_dir=data_dir, allow_unverified=allow_unverified, force=force,
        progress=progress, echo=echo,
    )  # fmt: skip
    if results is None:
        return out
    summary = {
        "recipe": cfg.recipe,
        "model": cfg.model,
        "runs": [r["run"] for r in results],
        "seeds": [c.seed for c in cfgs.values()],
        **{
            key: summarize([r[key] for r in results])
            for key in ("test_accuracy", "train_seconds", "total_seconds")
        },
    }
    write_json(out / SEEDS_SUMMARY, summary)
    acc, secs = summary["test_accuracy"], summary["total_seconds"]
    echo(
        f"{cfg.recipe}: test accuracy {acc['mean']:.2%} ± {acc['std']:.2%} (min {acc['min']:.2%}, max "
        f"{acc['max']:.2%}) over {seeds} seeds; {secs['mean']:.0f} ± {secs['std']:.0f} s per run -> {out}"
    )
    return out


def run_val_accuracy(results: dict[str, Any]) -> float:
    """Validation accuracy of the weights a run kept (the best epoch's after early stopping, else the last)."""
    return results["best_val_accuracy"] if results["weights"] == "best" else results["final_val_accuracy"]


def train_cv(
    cfg: TrainConfig,
    folds: int,
    *,
    out: Path | None = None,
    data: CIFAR10 | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    on_fold_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """K-fold cross-validation: one run per stratified fold; cv.json holds the validation accuracy mean ± std."""
    if folds < 2:
        raise UserError("--cv needs at least 2 folds")
    world = distributed.current()
    out = world.from_main(lambda: _group_dir(cfg, out, f"cv{folds}"))
    cfgs = {f"fold{k}": replace(cfg, folds=folds, fold=k, val_size=None) for k in range(folds)}
    results = _train_group(
        cfgs, out, data=data, data_dir=data_dir, allow_unverified=allow_unverified, force=force,
        progress=progress, echo=echo, on_run_end=on_fold_end,
    )  # fmt: skip
    if results is None:
        return out
    val = summarize([run_val_accuracy(r) for r in results])
    summary = {
        "recipe": cfg.recipe,
        "model": cfg.model,
        "folds": folds,
        "runs": [r["run"] for r in results],
        "val_accuracy": val,
        "per_fold_val_accuracy": [run_val_accuracy(r) for r in results],
        "test_accuracy": summarize([r["test_accuracy"] for r in results]),  # reported, never used to choose
        "total_seconds": summarize([r["total_seconds"] for r in results]),
    }
    write_json(out / CV_SUMMARY, summary)
    echo(
        f"{cfg.recipe}: {folds}-fold cross-validation accuracy {val['mean']:.2%} ± {val['std']:.2%} "
        f"(min {val['min']:.2%}, max {val['max']:.2%}) -> {out / 'cv.json'}"
    )
    return out
