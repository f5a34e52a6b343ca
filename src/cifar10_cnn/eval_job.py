"""The evaluation jobs: a model into a run directory (`evaluate_into_run`: evaluate.py computes, eval_files.py
writes), and `cifar10 evaluate` of a saved model (`evaluate_saved`), checked before anything is written.

    cifar10 evaluate runs/<run>                      # metrics, calibration, plots -> runs/<run>/eval/
    cifar10 evaluate runs/<run> --corruptions        # adds the robustness suite
    cifar10 evaluate model.safetensors               # a weights file: results go to model-eval/ beside it
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import data as D
from .config import TrainConfig
from .datasets import load_run_data
from .errors import CheckpointError, UserError
from .eval_files import summary_line, write_evaluation
from .evaluate import FIT, EvalOptions, evaluate_model
from .models import count_params
from .runs import Run, check_claimable, claim_dir
from .weights import ModelMeta, load_model, read_temperature, run_dir_of, weights_path


def evaluate_into_run(
    run_dir: str | os.PathLike,
    test: D.Split,
    options: EvalOptions | None = None,
    *,
    model: nn.Module | None = None,
    val: D.Split | None = None,
    weights: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on the test set once and write the results into run_dir; returns results.json.

    model: the model to evaluate (None: load weights, default the run's model.safetensors). The temperature is
    the one stored in weights; only when there is no weights file (a model not saved yet) is it fitted on val,
    as training fits it. val: the run's validation split (None or empty: none). classes: the model's class
    names (default: those of the weights loaded, else CIFAR-10's).
    """
    run_dir = Path(run_dir)
    weights = Path(weights) if weights is not None else Run(run_dir).file("weights")
    if model is None:
        model, meta = load_model(weights_path(weights))
        classes = classes or meta.classes
    ev = evaluate_model(
        model,
        test,
        options,
        val=val,
        temperature=read_temperature(weights) if weights.is_file() else FIT,
        echo=echo,
        classes=classes or D.CLASSES,
    )
    results = write_evaluation(run_dir, ev, weights=weights, info=info)
    echo(summary_line(results, run_dir))
    return results


def run_config(path: Path, metadata: ModelMeta) -> TrainConfig | None:
    """The training config of a run directory (config.json) or of a weights file (its metadata), if any."""
    if path.is_dir():
        config = Run(path).file("config")
        return TrainConfig.load(config) if config.exists() else None  # a FIFO there: one line
    saved = metadata.config
    if not saved:
        return None
    try:
        return TrainConfig.from_dict(saved)
    except UserError as e:  # the metadata is untrusted: say which file and field
        raise CheckpointError(f"{path}: metadata 'config' is not a valid training config ({e})") from None


def _check_request(
    path: Path,
    weights: Path,
    metadata: ModelMeta,
    out: str | os.PathLike | None,
) -> None:
    """Refuse, before anything is read or written, what cannot be evaluated as asked."""
    if path.is_dir() and out is not None:
        raise UserError("--out is for a weights file; a run directory is evaluated into itself")
    if path.is_dir():
        Run(path).read_results()  # refused now, not after the evaluation (a FIFO, a huge or broken file)
    if not path.is_dir():  # a new or empty folder, or one an evaluation of ours made: nothing else
        check_claimable(out if out is not None else default_eval_dir(weights))


def default_eval_dir(weights: Path) -> Path:
    """Where the evaluation of a weights file goes without --out: <name>-eval/ beside it."""
    return weights.with_name(f"{weights.stem}-eval")


def _validation_split(cfg: TrainConfig | None, data: D.CIFAR10) -> D.Split | None:
    """The run's validation split, rebuilt exactly as training built it (same size, seed and subset): the
    stored temperature was fitted on it. None without a config or a validation split."""
    if cfg is None or cfg.resolved_val_size <= 0:
        return None
    return D.make_splits(data, **cfg.split_args()).val


def _weights_file_info(
    weights: Path, model: nn.Module, metadata: ModelMeta, cfg: TrainConfig | None, val: D.Split | None
) -> dict[str, Any]:
    """What results.json says about a weights file evaluated on its own (a run directory already has it)."""
    return {
        "model": metadata.architecture,
        "params": count_params(model),
        "recipe": cfg.recipe if cfg else None,
        "val_size": len(val) if val is not None else 0,
        "weights": str(weights),
    }


def evaluate_saved(
    path: str | os.PathLike,
    options: EvalOptions | None = None,
    *,
    data: D.CIFAR10 | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Evaluate a saved model: a run directory (into itself) or a weights file (into out, default
    <name>-eval/ beside it: a new or empty folder, or one an earlier evaluation marked as ours). The CLI's
    `evaluate`.

    Everything that can be wrong (no finished model, unknown architecture, other classes, data failing
    verification) is checked before anything is written. Returns the directory written.
    """
    path = Path(path)
    weights = weights_path(path)
    model, metadata = load_model(weights)
    _check_request(path, weights, metadata, out)
    cfg = run_config(path, metadata)
    if data is None:
        data = load_run_data(
            run_dir_of(path),
            cfg.data_args() if cfg else {"image_size": metadata.image_size},
            data_dir,
            allow_unverified=allow_unverified,
            progress=progress,
        )
    _check_classes(weights, metadata, data)
    val = _validation_split(cfg, data)
    info: dict[str, Any] = {"data": data.provenance()}
    if path.is_dir():
        run_dir = path
    else:
        run_dir = claim_dir(out if out is not None else default_eval_dir(weights)).path
        info |= _weights_file_info(weights, model, metadata, cfg, val)
    evaluate_into_run(
        run_dir,
        D.to_split(data.test_images, data.test_labels),
        options,
        model=model,
        val=val,
        weights=weights,
        info=info,
        echo=echo,
        classes=metadata.classes,
    )
    return run_dir


def _check_classes(weights: Path, metadata: ModelMeta, data: D.Dataset) -> None:
    """The model's input size and classes must be the data's, in the same order (before anything is written)."""
    side = tuple(data.test_images.shape[1:3])
    if side != (metadata.image_size,) * 2:
        raise UserError(
            f"{weights} takes {metadata.image_size}x{metadata.image_size} images, and the test images of "
            f"{data.source} are {side[0]}x{side[1]}; pass --data-dir the data it was trained on"
        )
    classes, theirs = list(metadata.classes), list(data.classes)
    if classes != theirs:
        raise UserError(
            f"{weights} classifies {len(classes)} classes ({', '.join(map(str, classes[:4]))}, ...), not the "
            f"{len(theirs)} classes of {data.source} ({', '.join(map(str, theirs[:4]))}, ...); it cannot be "
            "evaluated on that test set (pass --data-dir the data it was trained on)"
        )
