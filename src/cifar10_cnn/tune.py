"""Hyperparameter search on Optuna: TPE, random or grid sampling, pruning, and studies shared by processes.

    cifar10 tune --recipe seed --trials 40 --epochs 8                   # TPE; the study lives in tune.db
    cifar10 tune --sampler grid --grid lr=0.01,0.03,0.1 batch_size=64,128
    cifar10 tune --storage sqlite:///tune.db --study s1 --trials 10     # run it in 2 terminals: one study
    cifar10 tune --study s1 --report                                    # table, best config, plots

Every trial is a normal training run in <out>/trial-NNNN (so its report works) scored by validation accuracy,
never test accuracy; per-epoch validation accuracy feeds the median pruner. --trials is the size the study
should reach: a second process, or a rerun after Ctrl-C or a kill, shares or continues the same count.
A trial killed outright is marked failed once its heartbeat goes stale and is retried once.

A SQLite storage is looked at read-only before Optuna opens it: a file that is not SQLite, or a database of
another application, is refused without a change; --report opens the database read-only and creates nothing.

This module is the search (samplers, the pruner, the objective, `tune`); beside it, arrows down:
tune_space (what is searched, --grid/--space), tune_storage (is this storage ours?), tune_study (a study in
it), tune_report (`report`: the table, the best config, the plots). Their public names are re-exported here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig, with_options
from .datasets import load_data
from .errors import UserError
from .runs import Run
from .tune_report import BEST_CONFIG, report
from .tune_space import Param, default_space, parse_grid, parse_space, searched_space
from .tune_storage import NoDatabase, open_storage, storage_errors
from .tune_study import (
    check_space,
    completed,
    default_out,
    finished_states,
    fmt_params,
    load_study,
    require_optuna,
)

__all__ = [
    "BEST_CONFIG", "NoDatabase", "Objective", "Param", "default_space", "open_storage", "parse_grid",
    "parse_space", "report", "tune",
]  # fmt: skip


def _make_sampler(name: str, grid: dict[str, list[Any]] | None) -> Any:
    import optuna

    if name == "tpe":
        # Unseeded, so that processes sharing a study do not draw the same points; TPE's "constant liar"
        # counts running trials as poor so that parallel workers spread out.
        return optuna.samplers.TPESampler(constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler()
    return _grid_sampler(grid or {})


def _make_pruner(prune: bool) -> Any:
    import optuna

    if not prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=30)  # never before 30% of a run


@dataclass
class Objective:
    """One trial: a normal training run in out/trial-NNNN, scored by its validation accuracy."""

    searched: dict[str, Param]
    base: TrainConfig
    out: Path
    data: Any
    cv: int | None
    echo: Callable[[str], None]

    def __call__(self, trial: Any) -> float:
        import torch

        params = {name: p.suggest(trial, name) for name, p in self.searched.items()}
        try:
            cfg = with_options(self.base.to_dict(), params)  # one the trainer refuses: a failed trial
            run_dir = self.out / f"trial-{trial.number:04d}"
            trial.set_user_attr("run_dir", str(run_dir))
            scores = self._run(trial, cfg, run_dir)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # Optuna marks it failed; the next start queues it again
            raise
        except (
            UserError,
            torch.OutOfMemoryError,
        ) as e:  # e.g. diverged: this trial fails, the search goes on
            trial.set_user_attr("error", str(e))
            self.echo(f"trial {trial.number}: failed: {e}  {fmt_params(params)}")
            raise
        value = sum(scores) / len(scores)
        self.echo(f"trial {trial.number}: val_acc {value:.2%}  {fmt_params(params)}")
        return value

    def _run(self, trial: Any, cfg: TrainConfig, run_dir: Path) -> list[float]:
        """The validation accuracy of the run (one per fold with cv), reported to the pruner as it goes."""
        from .pipeline import run_val_accuracy, train, train_cv

        common = dict(out=run_dir, data=self.data, force=True, progress=False, echo=lambda *_: None)
        if not self.cv:
            train(cfg, on_epoch_end=_epoch_pruner(trial, cfg), **common)
            return [run_val_accuracy(Run(run_dir).read_results())]
        scores: list[float] = []
        train_cv(cfg, self.cv, on_fold_end=_fold_pruner(trial, scores, run_val_accuracy), **common)
        return scores


def _epoch_pruner(trial: Any, cfg: TrainConfig) -> Callable[[int, Any, dict[str, Any]], None]:
    import optuna

    def prune(epoch: int, _model: Any, row: dict[str, Any]) -> None:
        # Steps are percent of the schedule, so that trials of different lengths compare at the same point.
        if row.get("val_acc") is not None:
            trial.report(row["val_acc"], round(100 * epoch / cfg.epochs))
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_acc {row['val_acc']:.2%} at epoch {epoch}")

    return prune


def _fold_pruner(
    trial: Any, scores: list[float], score: Callable[[dict[str, Any]], float]
) -> Callable[[int, dict[str, Any]], None]:
    import optuna

    def prune(k: int, results: dict[str, Any]) -> None:
        scores.append(score(results))
        trial.report(sum(scores) / len(scores), k)
        if trial.should_prune():
            raise optuna.TrialPruned(f"mean val_acc {sum(scores) / len(scores):.2%} after fold {k}")

    return prune


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

    study_name = study_name or base.recipe
    out = Path(out) if out is not None else default_out(study_name)
    searched = searched_space(base, fixed, grid, space, sampler)
    base = with_options(base.to_dict(), fixed)
    if base.resolved_val_size == 0 and not cv:
        raise UserError("tuning scores validation accuracy: give --val-size > 0 (or --cv K)")
    trials = _trial_count(trials, grid)
    description = _description(sampler, searched, base, cv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with storage_errors(storage):
        study = load_study(
            open_storage(storage),
            study_name,
            create=True,
            sampler=_make_sampler(sampler, grid),
            pruner=_make_pruner(prune),
        )
        check_space(study, description)
        _requeue_interrupted(study)
        remaining = trials - len(study.get_trials(deepcopy=False, states=finished_states()))
        if remaining <= 0:
            echo(
                f"study {study_name!r} already has {trials} finished trials; "
                f"see: cifar10 tune --study {study_name} --report"
            )
            return study
        data = load_data(data_dir, **base.data_args(), allow_unverified=allow_unverified, progress=False)
        echo(
            f"study {study_name!r} in {storage}: {sampler} over {', '.join(searched)}; "
            f"{remaining} more trials to reach {trials}; runs in {out}/"
        )
        _optimize(study, Objective(searched, base, out, data, cv, echo), remaining, trials)
    return study


def _trial_count(trials: int | None, grid: dict[str, list[Any]] | None) -> int:
    """--trials, or by default the size of the grid (20 without one)."""
    if trials is None:
        trials = math.prod(len(v) for v in grid.values()) if grid else 20
    if trials < 1:
        raise UserError("--trials must be at least 1")
    return trials


def _description(
    sampler: str, searched: dict[str, Param], base: TrainConfig, cv: int | None
) -> dict[str, Any]:
    """What makes trials comparable; a study keeps it (see check_space)."""
    return {
        "sampler": sampler,
        "space": {k: p.describe() for k, p in sorted(searched.items())},
        "fixed": {k: v for k, v in sorted(base.to_dict().items()) if k not in searched},
        "cv": cv,
    }


def _optimize(study: Any, objective: Objective, remaining: int, trials: int) -> None:
    """Trials until the study holds `trials` finished ones (others may be adding to it too)."""
    import optuna
    import torch

    # Failed trials are reported by the objective, in one line.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.optimize(
        objective,
        n_trials=2 * remaining,  # the callback stops at `trials` finished; failed ones get as many more tries
        callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished_states())],
        catch=(UserError, torch.OutOfMemoryError),
    )
    if completed(study):
        best = study.best_trial
        objective.echo(f"best: trial {best.number}, val_acc {best.value:.2%}  {fmt_params(best.params)}")


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
