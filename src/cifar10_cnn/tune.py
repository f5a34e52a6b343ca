"""Hyperparameter search on Optuna: TPE, random or grid sampling, pruning, and studies shared by processes.

    cifar10 tune --recipe seed --trials 40 --epochs 8                   # TPE; the study lives in tune.db
    cifar10 tune --sampler grid --grid lr=0.01,0.03,0.1 batch_size=64,128
    cifar10 tune --storage sqlite:///tune.db --study s1 --trials 10     # run it in 2 terminals: one study
    cifar10 tune --study s1 --report                                    # table, best config, plots

Every trial is a normal training run in <out>/trial-NNNN (so its report works) scored by validation accuracy,
never test accuracy; per-epoch validation accuracy feeds the median pruner. --trials is the size the study
should reach: a second process, or a rerun after Ctrl-C or a kill, shares or continues the same count.
A trial killed outright is marked failed once its heartbeat goes stale and is retried once.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from . import data as D
from .config import TrainConfig
from .errors import UserError
from .runs import write_json

BEST_CONFIG = Path("tune-best.json")


@dataclass(frozen=True)
class Param:
    """One searched option: a float or int range (optionally log-scaled), or a list of choices."""

    kind: str  # float, int or choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            return ",".join(str(c) for c in self.choices)
        return f"{'log:' if self.log else ''}{'int:' if self.kind == 'int' else ''}{self.low:g}:{self.high:g}"


def default_space(cfg: TrainConfig) -> dict[str, Param]:
    """The search space of a recipe, centred on its own values: the one place where spaces are declared."""
    space = {
        "lr": Param("float", cfg.lr / 10, cfg.lr * 10, log=True),
        "momentum": Param("float", 0.8, 0.98),
        "weight_decay": (
            Param("float", cfg.weight_decay / 10, cfg.weight_decay * 10, log=True)
            if cfg.weight_decay > 0
            else Param("float", 1e-6, 1e-2, log=True)
        ),
        "batch_size": Param("choice", choices=(cfg.batch_size // 2, cfg.batch_size, cfg.batch_size * 2)),
        "label_smoothing": Param("float", 0.0, 0.3),
        "epochs": Param("int", max(1, cfg.epochs // 2), max(2, cfg.epochs * 3 // 2)),
        "crop_padding": Param("int", 0, 4),  # augmentation strength
        "cutout": Param("int", 0, 12),
    }
    if cfg.model in ("airbench", "airbench_small"):  # the width of the fast net: two sizes
        space["model"] = Param("choice", choices=("airbench_small", "airbench"))
    return space


def _typed(name: str, text: str, flag: str) -> Any:
    """A command-line value as the type of the TrainConfig field it sets ('none' for optional fields)."""
    default = getattr(TrainConfig(), name)
    text = text.strip()
    try:
        if default is None or name in ("micro_batch", "val_size", "subset", "patience"):
            return None if text.lower() == "none" else int(text)
        if isinstance(default, bool):
            return {"true": True, "false": False, "on": True, "off": False}[text.lower()]
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except (ValueError, KeyError):
        kind = "true or false" if isinstance(default, bool) else type(default or 0).__name__
        raise UserError(f"{flag} {name}={text}: {name} takes {kind}") from None


def _field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)} - {"recipe", "extra"}


def _split(item: str, flag: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not value:
        raise UserError(f"{flag} takes NAME=VALUES items, e.g. lr=0.01,0.1; got {item!r}")
    if name not in _field_names():
        raise UserError(f"{flag}: unknown parameter {name!r}; known: {', '.join(sorted(_field_names()))}")
    return name, value


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`lr=0.01,0.03 batch_size=64,128` -> {"lr": [0.01, 0.03], "batch_size": [64, 128]}."""
    grid = {}
    for item in items:
        name, values = _split(item, "--grid")
        grid[name] = [_typed(name, v, "--grid") for v in values.split(",")]
    return grid


def parse_space(items: list[str]) -> dict[str, Param]:
    """`lr=log:0.001:0.1 epochs=int:4:12 momentum=0.8:0.99 batch_size=64,128` -> Params."""
    space = {}
    for item in items:
        name, value = _split(item, "--space")
        parts = value.split(":")
        log = parts[0] == "log"
        parts = parts[1:] if log else parts
        default = getattr(TrainConfig(), name)
        integral = default is None or (isinstance(default, int) and not isinstance(default, bool))
        kind = "int" if integral else "float"
        if parts[0] == "int":
            kind, parts = "int", parts[1:]
        try:
            if len(parts) == 2:
                low, high = float(parts[0]), float(parts[1])
                if not low < high or (log and low <= 0):
                    raise ValueError
                space[name] = Param(kind, low, high, log=log)
            elif len(parts) == 1 and not log:
                space[name] = Param(
                    "choice", choices=tuple(_typed(name, v, "--space") for v in parts[0].split(","))
                )
            else:
                raise ValueError
        except ValueError:
            raise UserError(
                f"--space {item!r}: write NAME=LOW:HIGH, NAME=log:LOW:HIGH, NAME=int:LOW:HIGH or NAME=A,B,C"
            ) from None
    return space


def require_optuna() -> None:
    """Optuna, or one clear error; its notices about experimental features (heartbeats, plots) are muted."""
    try:
        import optuna
    except ImportError:
        raise UserError("cifar10 tune needs Optuna: python -m pip install -e '.[tune]'") from None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats (so a killed trial is failed and retried), or one clear error."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=10,
                grace_period=30,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        except (IntegrityError, OperationalError) as e:  # e.g. two processes creating one database at once
            if attempt == 3:
                raise UserError(f"cannot open the study storage {url!r}: {_first_line(e)}") from None
            time.sleep(0.5 * (attempt + 1))
        except (SQLAlchemyError, ValueError, ImportError) as e:
            raise UserError(f"cannot open the study storage {url!r}: {_first_line(e)}") from None
    raise AssertionError("unreachable")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _load_study(storage: Any, name: str, *, create: bool, sampler: Any = None, pruner: Any = None) -> Any:
    import optuna

    if create:
        return optuna.create_study(
            storage=storage,
            study_name=name,
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserError(
            f"no study {name!r} in this storage; studies there: {', '.join(known) or 'none'}"
        ) from None


def _check_space(study: Any, description: dict[str, Any]) -> None:
    """A study keeps the space it was created with; another space would mix incomparable trials."""
    saved = study.user_attrs.get("space")
    if saved is None:
        study.set_user_attr("space", description)
    elif saved != json.loads(json.dumps(description)):
        changed = sorted(k for k in set(saved) | set(description) if saved.get(k) != description.get(k))
        raise UserError(
            f"study {study.study_name!r} was created with another search space (differs in {', '.join(changed)}); "
            "use a new --study name, or the same options as before"
        )


def tune(
    base: TrainConfig,
    *,
    fixed: dict[str, Any],
    trials: int | None,
    sampler: str = "tpe",
    grid: dict[str, list[Any]] | None = None,
    space: dict[str, Param] | None = None,
    storage: str = "sqlite:///tune.db",
    study_name: str | None = None,
    out: Path | None = None,
    cv: int | None = None,
    prune: bool = True,
    data_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    echo: Callable[[str], None] = print,
) -> Any:
    """Run trials until the study holds `trials` finished ones; returns the study.

    fixed: options set on the command line; they are not searched.
    """
    require_optuna()
    import optuna
    import torch

    from .experiments import run_val_accuracy, train_cv
    from .train import train

    study_name = study_name or base.recipe
    out = Path(out) if out is not None else Path("tune") / study_name
    if grid:
        searched: dict[str, Param] = {k: Param("choice", choices=tuple(v)) for k, v in grid.items()}
    else:
        searched = {**default_space(base), **(space or {})}
    for name in fixed:
        if name in searched and not (grid and name in grid) and not (space and name in space):
            del searched[name]  # given on the command line: fixed
    clash = sorted(set(searched) & set(fixed))
    if clash:
        raise UserError(f"{', '.join(clash)} cannot be both fixed and searched")
    if not searched:
        raise UserError("nothing to search: every parameter of the space is fixed")
    if sampler == "grid" and not grid:
        raise UserError("--sampler grid needs --grid NAME=A,B ...")
    base = replace(base, **fixed)
    if base.resolved_val_size == 0 and not cv:
        raise UserError("tuning scores validation accuracy: give --val-size > 0 (or --cv K)")
    description = {
        "sampler": sampler,
        "space": {k: p.describe() for k, p in sorted(searched.items())},
        "fixed": {k: v for k, v in sorted(base.to_dict().items()) if k not in searched and k != "extra"},
        "cv": cv,
    }
    samplers = {
        # Unseeded, so that processes sharing a study do not draw the same points; TPE's "constant liar"
        # counts running trials as poor so that parallel workers spread out.
        "tpe": lambda: optuna.samplers.TPESampler(constant_liar=True),
        "random": lambda: optuna.samplers.RandomSampler(),
        "grid": lambda: _grid_sampler(grid or {}),
    }
    if sampler not in samplers:
        raise UserError(f"unknown sampler {sampler!r}; choose tpe, random or grid")
    if trials is None:
        trials = math.prod(len(v) for v in grid.values()) if grid else 20
    if trials < 1:
        raise UserError("--trials must be at least 1")
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=30)  # never before 30% of a run
        if prune
        else optuna.pruners.NopPruner()
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _load_study(
        open_storage(storage), study_name, create=True, sampler=samplers[sampler](), pruner=pruner
    )
    _check_space(study, description)

    _requeue_interrupted(study)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining <= 0:
        echo(
            f"study {study_name!r} already has {trials} finished trials; see: cifar10 tune --study {study_name} --report"
        )
        return study
    data = D.load_cifar10(data_dir, allow_unverified=allow_unverified, progress=False)

    def objective(trial: Any) -> float:
        params = {name: p.suggest(trial, name) for name, p in searched.items()}
        try:
            cfg = replace(base, **params)
        except UserError as e:  # a combination the trainer refuses counts as a failed trial, with the reason
            trial.set_user_attr("error", str(e))
            echo(f"trial {trial.number}: failed: {e}  {_fmt_params(params)}")
            raise
        run_dir = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        quiet = lambda *_: None  # noqa: E731

        def prune_epoch(epoch: int, _model: Any, row: dict[str, Any]) -> None:
            # Steps are percent of the schedule, so that trials of different lengths compare at the same point.
            if row.get("val_acc") is not None:
                trial.report(row["val_acc"], round(100 * epoch / cfg.epochs))
                if trial.should_prune():
                    raise optuna.TrialPruned(f"val_acc {row['val_acc']:.2%} at epoch {epoch}")

        scores: list[float] = []

        def prune_fold(k: int, results: dict[str, Any]) -> None:
            scores.append(run_val_accuracy(results))
            trial.report(sum(scores) / len(scores), k)
            if trial.should_prune():
                raise optuna.TrialPruned(f"mean val_acc {sum(scores) / len(scores):.2%} after fold {k}")

        common = dict(out=run_dir, data=data, force=True, progress=False, echo=quiet)
        try:
            if cv:
                train_cv(cfg, cv, on_fold_end=prune_fold, **common)
            else:
                train(cfg, on_epoch_end=prune_epoch, **common)
                scores.append(run_val_accuracy(json.loads((run_dir / "results.json").read_text())))
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # Optuna marks it failed; the next start queues it again
            raise
        except (
            UserError,
            torch.OutOfMemoryError,
        ) as e:  # e.g. diverged: this trial fails, the search goes on
            trial.set_user_attr("error", str(e))
            echo(f"trial {trial.number}: failed: {e}  {_fmt_params(params)}")
            raise
        value = sum(scores) / len(scores)
        echo(f"trial {trial.number}: val_acc {value:.2%}  {_fmt_params(params)}")
        return value

    echo(
        f"study {study_name!r} in {storage}: {sampler} over {', '.join(searched)}; "
        f"{remaining} more trials to reach {trials}; runs in {out}/"
    )
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported above, in one line
    study.optimize(
        objective,
        n_trials=2 * remaining,  # the callback stops at `trials` finished; failed ones get as many more tries
        callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished)],
        catch=(UserError, torch.OutOfMemoryError),
    )
    best = study.best_trial if _completed(study) else None
    if best is not None:
        echo(f"best: trial {best.number}, val_acc {best.value:.2%}  {_fmt_params(best.params)}")
    return study


def _grid_sampler(grid: dict[str, list[Any]]) -> Any:
    """Optuna's GridSampler, also running the queued retries of interrupted grid points (they carry no grid id).

    Unseeded: processes sharing a study pick among the open grid points at random, so they rarely collide.
    """
    import optuna

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            if "grid_id" in trial.system_attrs:
                super().after_trial(study, trial, state, values)

    return Grid(grid)


def _requeue_interrupted(study: Any) -> None:
    """Queue again, once, the parameters of trials stopped by Ctrl-C (kills are retried by the heartbeat)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def _completed(study: Any) -> list[Any]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def report(
    storage: str,
    study_name: str,
    *,
    out: Path | None = None,
    best_config: Path = BEST_CONFIG,
    echo: Callable[[str], None] = print,
) -> Path:
    """The trials as a table (printed and trials.csv), the best config as a file, and three PNG plots."""
    require_optuna()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _load_study(open_storage(storage), study_name, create=False)
    out = Path(out) if out is not None else Path("tune") / study_name
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    header = ["trial", "state", "val_acc", "seconds", *names, "run_dir"]
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            [
                t.number,
                t.state.name.lower(),
                "" if t.value is None else f"{t.value:.4f}",
                "" if seconds is None else f"{seconds:.0f}",
                *[_fmt_value(t.params.get(k)) for k in names],
                t.user_attrs.get("run_dir", ""),
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    import csv

    with open(out / "trials.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])

    done = _completed(study)
    if not done:
        echo(f"no completed trials yet in study {study_name!r}; nothing more to report")
        return out
    best = study.best_trial
    space = study.user_attrs.get("space", {})
    cfg = TrainConfig.from_dict({**space.get("fixed", {}), **best.params})
    best_config = Path(best_config)
    best_config.parent.mkdir(parents=True, exist_ok=True)
    write_json(best_config, cfg.to_dict())
    echo(
        f"best: trial {best.number}, val_acc {best.value:.2%}  {_fmt_params(best.params)}\n"
        f"best config -> {best_config} (train it: cifar10 train --config {best_config})"
    )

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    drawn = []
    for name, draw in (
        ("optimization_history", vis.plot_optimization_history),
        ("param_importances", vis.plot_param_importances),
        ("parallel_coordinate", vis.plot_parallel_coordinate),
    ):
        try:
            ax = draw(study)
        except (RuntimeError, ValueError, ZeroDivisionError) as e:  # e.g. importance from < 2 trials
            echo(f"plot {name} skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        fig.savefig(plots / f"{name}.png", dpi=110)
        plt.close(fig)
        drawn.append(name)
    if len(done) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
            echo("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass
    echo(f"plots -> {plots}/ ({', '.join(drawn) or 'none'}); table -> {out / 'trials.csv'}")
    return out


def _fmt_value(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
