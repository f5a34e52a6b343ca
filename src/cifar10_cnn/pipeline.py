"""Jobs: each runs the stages once, in order: data -> run directory -> fit -> weights -> evaluation -> report.

    cifar10 train --recipe quick               # train(): one run
    cifar10 train --recipe quick --seeds 5     # train_seeds(): runs seed0..seed4 and summary.json
    cifar10 train --recipe seed --cv 5         # train_cv(): runs fold0..fold4 and cv.json (validation mean ± std)
    cifar10 evaluate runs/<run>                # evaluate(): a saved model -> evaluation -> report

The stages do not call each other: train.fit returns the fitted model, weights.save_weights writes it,
evaluate measures it, eval_files writes eval/, report renders the run directory. Only this module chains them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import distributed
from .config import TrainConfig
from .constants import IMAGE_SIZE
from .data import CIFAR10, Split, Splits, make_splits
from .datasets import load_run_data, notes, record_test_files
from .device import precision_name, select_device
from .errors import UserError
from .eval_files import augmentation_preview
from .eval_job import evaluate_into_run, evaluate_saved
from .evaluate import EvalOptions, fit_served_temperature
from .metrics import summarize
from .models import check_image_size, count_params
from .report import write_report
from .runs import CV_SUMMARY, SEEDS_SUMMARY, Run, create_run, default_run_dir, open_run, write_json
from .train import EpochHook, FitResult, Trainer, fit, setup
from .weights import save_weights

# Options that may differ on --resume: how the test is evaluated, and where and how the steps run. The last two
# can change the arithmetic a little (float rounding; a recipe's micro-batch applies on a CPU and MPS only, so
# a fast run moved to CUDA continues in whole batches: TrainConfig.micro_batch_on), not what is trained.
RESUME_FREE = ("device", "tta", "tta_margin", "compile")


def _silent(*_: Any) -> None:
    pass


@dataclass(frozen=True)
class Job:
    """How a job runs, not what it computes (TrainConfig says that): its data, what it may replace, its output.

    Every job function takes these as keywords: train(cfg, data=..., progress=False).
    """

    data: CIFAR10 | None = None  # the data in memory; None: loaded from data_dir and verified
    data_dir: str | os.PathLike | None = None  # default $CIFAR10_DATA, else ./data
    allow_unverified: bool = False  # use data that fails the sha256 check
    force: bool = False  # replace a run of ours already in out
    progress: bool = True  # progress bars (else plain lines)
    echo: Callable[[str], None] = print

    def load_data(self, cfg: TrainConfig, resume: str | os.PathLike | None = None) -> CIFAR10:
        """The job's data (CIFAR-10, CIFAR-100 or a folder, as cfg says): rank 0 downloads and verifies, the
        other ranks then read its cache. A resumed run on a folder keeps the test files it recorded."""
        if self.data is not None:
            return self.data
        world = distributed.current()
        with world.main_first():
            return load_run_data(
                Path(resume) if resume is not None else None,
                cfg.data_args(),
                self.data_dir,
                allow_unverified=self.allow_unverified,
                progress=self.progress and world.main,
            )


# --- one run ------------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    on_epoch_end: EpochHook | None = None,
    **job: Any,
) -> Path:
    """One run: load data, fit, write final weights, evaluate on the test set once, write the report.

    job: the keywords of Job (data, data_dir, allow_unverified, force, progress, echo). With resume (a run
    directory), cfg may be left out; a cfg that differs from the run's own is refused. Returns the run directory.
    """
    return run_job(cfg, Job(**job), out=out, resume=resume, on_epoch_end=on_epoch_end)


def run_job(
    cfg: TrainConfig | None,
    job: Job,
    *,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    on_epoch_end: EpochHook | None = None,
) -> Path:
    """train() with its Job built: the stages in order, each once."""
    started = time.perf_counter()
    world = distributed.current()
    cfg = resumed_config(resume, cfg) if resume is not None else cfg or TrainConfig()
    check_world(cfg, world)
    check_image_size(cfg.model, cfg.image_size)  # before anything is written: a failed start leaves nothing
    if not world.main:
        job = replace(job, echo=_silent, progress=False)
    data = job.load_data(cfg, resume)
    check_data_size(cfg, data)
    cfg = sized(cfg, data, job.echo) if resume is None else cfg  # a resumed run keeps its own
    device = distributed.local_device(select_device(cfg.device))
    splits = make_splits(data, **cfg.split_args(), device=device)
    # The run directory is made only now, once the data loaded: a failed start leaves nothing to block a rerun.
    run = Run(Path(world.from_main(lambda: start_run(cfg, out, resume, job.force))))
    if world.main:
        if resume is None:
            augmentation_preview(
                splits.train, run.mkdir("plots") / "augmentations.png", cfg, classes=data.classes
            )
        record_test_files(run, data)
    t = setup(cfg, splits.train, device, num_classes=len(data.classes))
    job.echo(run_header(cfg, t, data, splits))
    for line in notes(data):
        job.echo(line)
    result = fit(cfg, splits, run.path, resume=resume is not None, progress=job.progress, echo=job.echo,
                 on_epoch_end=on_epoch_end, trainer=t)  # fmt: skip
    if world.main:
        save_final_weights(run, cfg, result, splits.val, data.classes)
        run.update_results(training_results(cfg, t, data, splits, result))
        evaluating = time.perf_counter()
        test_seconds = evaluate_test_set(run, cfg, result, splits, job.echo, data.classes)
        run.update_results({"headline_seconds": evaluating - started + test_seconds})
        write_report(run.path)
        # headline_seconds: from the job's start to the test accuracy; total_seconds: data, report and all.
        r = run.update_results({"total_seconds": time.perf_counter() - started})
        job.echo(
            f"{r['total_seconds']:.0f} s in all: training {r['train_seconds']:.0f} s, test accuracy known after "
            f"{r['headline_seconds']:.0f} s, then calibration, plots and report"
        )
    return run.path


def check_data_size(cfg: TrainConfig, data: CIFAR10) -> None:
    """The images must be cfg.image_size square (data given in memory may hold any size)."""
    shape = tuple(data.train_images.shape[1:])
    if shape != (cfg.image_size, cfg.image_size, 3):
        raise UserError(
            f"the training images are {'x'.join(map(str, shape))}, not {cfg.image_size}x{cfg.image_size}x3 as "
            f"--image-size {cfg.image_size} says"
        )


def sized(cfg: TrainConfig, data: CIFAR10, echo: Callable[[str], None]) -> TrainConfig:
    """cfg.sized_for the data; a recipe's validation split made smaller is said in one line."""
    new = cfg.sized_for(len(data.train_labels), len(data.classes))
    if cfg.val_size_by_recipe and new.val_size != cfg.val_size:
        n = min(cfg.subset or len(data.train_labels), len(data.train_labels))
        echo(
            f"recipe {cfg.recipe} holds out {cfg.val_size:,} images for validation, more than a tenth of the "
            f"{n:,} training images here: holding out {new.val_size:,} instead (--val-size N to choose)"
        )
    return new


def resumed_config(resume: str | os.PathLike, cfg: TrainConfig | None) -> TrainConfig:
    """The resumed run's config; cfg (if given) may differ from it only in RESUME_FREE options."""
    saved = open_run(resume).read_config()
    if cfg is None:
        return saved
    conflicts = [
        f"--{k.replace('_', '-')} {v} (run has {getattr(saved, k)})"
        for k, v in cfg.to_dict().items()
        # *_by_recipe: whose a value was, not what it is (a library caller's cfg need not match the run's)
        if k not in RESUME_FREE and not k.endswith("_by_recipe") and v != getattr(saved, k)
    ]
    if conflicts:
        raise UserError(f"--resume {resume} conflicts with {', '.join(conflicts)}; drop those options")
    return cfg


def check_world(cfg: TrainConfig, world: distributed.World) -> None:
    world.check_same("config", cfg.to_dict())
    if cfg.batch_size % world.size:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of the {world.size} processes")
    if cfg.sync_bn and world.size > 1 and select_device(cfg.device).type != "cuda":
        raise UserError(
            "--sync-bn needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only); leave it out on CPU"
        )


def start_run(
    cfg: TrainConfig, out: str | os.PathLike | None, resume: str | os.PathLike | None, force: bool
) -> str:
    if resume is not None:
        run = open_run(resume)
        run.read_results()  # refused now, not after the training (a FIFO, a huge or broken file)
        return str(run.path)
    return str(create_run(Path(out) if out else default_run_dir(cfg), cfg, force=force).path)


def run_header(cfg: TrainConfig, t: Trainer, data: CIFAR10, splits: Splits) -> str:
    """The line (two under torchrun) that says what this run computes, and where."""
    size = f" at {cfg.image_size}x{cfg.image_size}" if cfg.image_size != IMAGE_SIZE else ""
    line = (
        f"model {cfg.model} ({count_params(t.model):,} params) | device {t.device}, {precision_name(t.amp_dtype)}"
        f"{', compiled' if cfg.compile else ''}{', deterministic' if cfg.deterministic else ''} "
        f"| data {data.source} ({data.check()}){size} | train {len(splits.train)} / "
        f"val {len(splits.val)} / test {len(splits.test)} | recipe {cfg.recipe}: {cfg.epochs} epochs, "
        f"batch {cfg.batch_size}{f' in micro-batches of {t.micro_batch}' if t.micro_batch else ''}, lr {cfg.lr}"
    )
    if sizes := cfg.sizes_of_epochs:
        first = "epoch 1" if len(sizes) == 1 else f"epochs 1-{len(sizes)}"
        line += f", {first} at {'/'.join(f'{s}x{s}' for s in sizes)} pixels (progressive resizing)"
    w = t.world
    if w.size > 1:
        line += (
            f"\ndistributed: {w.size} processes ({w.backend}); global batch {cfg.batch_size} = "
            f"{cfg.batch_size // w.size} per process x {w.size}; lr {cfg.lr} applies to the global batch; "
            f"batch-norm statistics {'over the global batch (SyncBatchNorm)' if cfg.sync_bn else 'per process'}"
        )
    return line


def save_final_weights(
    run: Run, cfg: TrainConfig, result: FitResult, val: Split, classes: Sequence[str]
) -> None:
    """model.safetensors, with the softmax temperature fitted on the validation split (none without one) and
    the data's class names, in the order of the model's outputs."""
    save_weights(
        result.model,
        run.file("weights"),
        architecture=cfg.model,
        config=cfg.to_dict(),
        temperature=fit_served_temperature(result.model, val),
        classes=classes,
        image_size=cfg.image_size,
    )


def evaluate_test_set(
    run: Run,
    cfg: TrainConfig,
    result: FitResult,
    splits: Splits,
    echo: Callable[[str], None],
    classes: Sequence[str],
) -> float:
    """The one measurement of the test set, written into the run; returns the seconds to the test accuracy."""
    results = evaluate_into_run(
        run.path,
        splits.test,
        EvalOptions.of(cfg),
        model=result.model,
        val=splits.val,
        echo=echo,
        classes=classes,
    )
    return results["test_seconds"]


def training_results(
    cfg: TrainConfig, t: Trainer, data: CIFAR10, splits: Splits, result: FitResult
) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "params": count_params(result.model),
        "recipe": cfg.recipe,
        "device": str(t.device),
        "precision": precision_name(t.amp_dtype),
        "processes": t.world.size,
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "epochs_run": len(result.history),
        "train_seconds": result.train_seconds,
        "best_val_accuracy": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "weights": "best" if result.stopped_early and result.best_epoch else "final",
        "final_val_accuracy": result.history[-1]["val_acc"] if result.history else None,
        "data": data.provenance(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- a saved model: evaluation, then the report ------------------------------------------------------------


def evaluate(
    path: str | os.PathLike,
    options: EvalOptions | None = None,
    *,
    out: str | os.PathLike | None = None,
    **job: Any,
) -> Path:
    """`cifar10 evaluate`: a run directory (into itself) or a weights file (into out, default <name>-eval/
    beside it) evaluated by eval_job.evaluate_saved, then the report of the directory written; returns it.

    job: the keywords of Job but force (data, data_dir, allow_unverified, progress, echo)."""
    run_dir = evaluate_saved(path, options, out=out, **job)
    write_report(run_dir)
    return run_dir


def evaluate_and_report(
    run_dir: str | os.PathLike, test: Split, options: EvalOptions | None = None, **kw: Any
) -> dict[str, Any]:
    """eval_job.evaluate_into_run (a model on a test split, written into run_dir), then the run's report."""
    results = evaluate_into_run(run_dir, test, options, **kw)
    write_report(Path(run_dir))
    return results


# --- several runs: repeated seeds, K-fold cross-validation -------------------------------------------------


def _group_dir(cfg: TrainConfig, out: Path | None, suffix: str) -> Path:
    """The folder of a group of runs: out, or runs/<timestamp>-<recipe>-<suffix> (named once, on rank 0)."""
    if out is not None:
        return Path(out)
    base = default_run_dir(cfg)
    return base.with_name(f"{base.name}-{suffix}")


def _train_group(
    cfgs: dict[str, TrainConfig],
    out: Path,
    job: Job,
    on_run_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]] | None:
    """Each config trained into out/<name>; their results.json (None on ranks other than 0).

    on_run_end(k, results) runs on rank 0 after run k (the tuner prunes between folds with it)."""
    world = distributed.current()
    first = next(iter(cfgs.values()))  # the runs of a group differ in seed or fold, not in data
    job = replace(job, data=job.load_data(first))  # loaded once for all the runs
    runs = []
    for k, (name, cfg) in enumerate(cfgs.items()):
        job.echo(f"--- {name} ({k + 1}/{len(cfgs)})")
        run = run_job(cfg, job, out=out / name)
        if world.main:
            runs.append({"run": str(run), **Run(run).read_results()})
            if on_run_end is not None:
                on_run_end(k, runs[-1])
    return runs if world.main else None


def train_seeds(cfg: TrainConfig, seeds: int, *, out: Path | None = None, **job: Any) -> Path:
    """`seeds` runs of cfg with seeds cfg.seed, cfg.seed + 1, ...; writes summary.json beside their run dirs.

    job: the keywords of Job."""
    world = distributed.current()
    out = world.from_main(lambda: _group_dir(cfg, out, f"{seeds}seeds"))
    cfgs = {f"seed{cfg.seed + k}": replace(cfg, seed=cfg.seed + k) for k in range(seeds)}
    j = Job(**job)
    results = _train_group(cfgs, out, j)
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
    j.echo(
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
    on_fold_end: Callable[[int, dict[str, Any]], None] | None = None,
    **job: Any,
) -> Path:
    """K-fold cross-validation: one run per stratified fold; cv.json holds the validation accuracy mean ± std.

    job: the keywords of Job."""
    if folds < 2:
        raise UserError("--cv needs at least 2 folds")
    world = distributed.current()
    out = world.from_main(lambda: _group_dir(cfg, out, f"cv{folds}"))
    cfgs = {f"fold{k}": replace(cfg, folds=folds, fold=k, val_size=None) for k in range(folds)}
    j = Job(**job)
    results = _train_group(cfgs, out, j, on_run_end=on_fold_end)
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
    j.echo(
        f"{cfg.recipe}: {folds}-fold cross-validation accuracy {val['mean']:.2%} ± {val['std']:.2%} "
        f"(min {val['min']:.2%}, max {val['max']:.2%}) -> {out / 'cv.json'}"
    )
    return out
