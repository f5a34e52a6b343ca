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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sqlite3
import stat
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .config import TrainConfig
from .datasets import load_data
from .errors import UserError, first_line
from .runs import Run, write_atomic

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


# --- the study storage ------------------------------------------------------------------------------------------

SQLITE_HEADER = b"SQLite format 3\x00"
OPTUNA_TABLES = {"studies", "trials", "version_info"}  # created together, in one transaction, by Optuna


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite storage URL; None for an in-memory database or another kind of storage."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise UserError(f"cannot open the study storage {url!r}: {first_line(e)}") from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):  # SQLite's own URI form: it names its file and mode itself
        return None
    return Path(parsed.database)


def _sqlite_kind(path: Path, url: str) -> str:
    """'new' (no file, an empty file or no tables) or 'optuna'; anything else is one line, and left as it is."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "new"
    except OSError as e:
        raise UserError(f"cannot open the study storage {url!r}: {first_line(e)}") from None
    if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO (opening it would hang) or a device
        raise UserError(f"the study storage {url!r}: {path} is not a regular file")
    if info.st_size == 0:
        return "new"
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise UserError(
                f"the study storage {url!r}: {path} is not a SQLite database; nothing was changed"
            )
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except (OSError, sqlite3.Error) as e:
        raise UserError(f"cannot read the study storage {url!r}: {first_line(e)}") from None
    if not tables:
        return "new"
    if not tables >= OPTUNA_TABLES:
        raise UserError(
            f"the study storage {url!r}: {path} is a database of another application "
            f"(tables {', '.join(sorted(tables)[:4])}); nothing was changed: give --storage a new file"
        )
    return "optuna"


class NoDatabase(UserError):
    """A report's SQLite database does not exist (or is empty): there is nothing to report."""


def _check_writable(path: Path, url: str) -> None:
    """A search writes trials: the file, or the folder that will hold it (and SQLite's journal), must be writable."""
    folder = path.parent if str(path.parent) else Path(".")
    for target in (path, folder) if path.exists() else (folder,):
        if target.exists() and not os.access(target, os.W_OK):
            raise UserError(
                f"the study storage {url!r}: {target} is read-only; give --storage a writable file"
            )


def open_storage(url: str, *, read_only: bool = False) -> Any:
    """An Optuna RDB storage with heartbeats (so a killed trial is failed and retried), or one clear error.

    read_only (for a report): the database must exist and is opened read-only, so that nothing is created or
    written. Otherwise a new SQLite file gets Optuna's tables, and an existing one must already hold them.
    """
    path = _sqlite_file(url)
    kind = _sqlite_kind(path, url) if path is not None else None
    if read_only and kind == "new":
        state = "does not exist" if not path.exists() else "holds no studies"
        raise NoDatabase(f"{path} {state}; nothing was created")
    if path is not None and not read_only:
        _check_writable(path, url)
    target = url
    if read_only and path is not None:
        target = f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true"
    return _open_rdb(url, target, existing=kind == "optuna")


def _open_rdb(url: str, target: str, *, existing: bool) -> Any:
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

    engine_kwargs = {"connect_args": {"timeout": 60}} if target.startswith("sqlite") else {}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(
                target,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=10,
                grace_period=30,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                skip_table_creation=existing,  # its tables are there: Optuna's version check alone decides
            )
        except (IntegrityError, OperationalError) as e:  # e.g. two processes creating one database at once
            if attempt == 3:
                raise UserError(f"cannot open the study storage {url!r}: {first_line(e)}") from None
            time.sleep(0.5 * (attempt + 1))
        except (SQLAlchemyError, ValueError, ImportError, RuntimeError) as e:  # RuntimeError: another schema
            raise UserError(f"cannot open the study storage {url!r}: {first_line(e)}") from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """A database that fails later (read-only, locked, corrupt) is one line; SQLite rolls back what failed."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as e:
        raise UserError(f"the study storage {url!r} failed: {first_line(e)}") from None


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
            f"no study {name!r} in this storage; studies there: {', '.join(known[:20]) or 'none'}"
        ) from None


def _check_space(study: Any, description: dict[str, Any]) -> None:
    """A study keeps the space it was created with; another space would mix incomparable trials."""
    saved = study.user_attrs.get("space")
    if saved is None:
        study.set_user_attr("space", description)
        return
    saved = saved if isinstance(saved, dict) else {}
    if saved != json.loads(json.dumps(description)):
        changed = sorted(k for k in set(saved) | set(description) if saved.get(k) != description.get(k))
        raise UserError(
            f"study {study.study_name!r} was created with another search space (differs in {', '.join(changed)}); "
            "use a new --study name, or the same options as before"
        )


def _default_out(study_name: str) -> Path:
    """tune/<study>: the study name must then be a plain folder name, so that it cannot point elsewhere."""
    if study_name in (".", "..") or "/" in study_name or "\\" in study_name or "\0" in study_name:
        raise UserError(f"--study {study_name!r} cannot name a folder; give --out for its trials")
    return Path("tune") / study_name


# --- the search ---------------------------------------------------------------------------------------------------


def _searched_space(
    base: TrainConfig,
    fixed: dict[str, Any],
    grid: dict[str, list[Any]] | None,
    space: dict[str, Param] | None,
    sampler: str,
) -> dict[str, Param]:
    """The parameters a study searches: the grid, or the recipe's space with --space, less the fixed ones."""
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
    if sampler not in ("tpe", "random", "grid"):
        raise UserError(f"unknown sampler {sampler!r}; choose tpe, random or grid")
    return searched


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


def _finished_states() -> tuple[Any, ...]:
    import optuna

    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


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
            cfg = replace(self.base, **params)  # a combination the trainer refuses is a failed trial
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
            self.echo(f"trial {trial.number}: failed: {e}  {_fmt_params(params)}")
            raise
        value = sum(scores) / len(scores)
        self.echo(f"trial {trial.number}: val_acc {value:.2%}  {_fmt_params(params)}")
        return value

    def _run(self, trial: Any, cfg: TrainConfig, run_dir: Path) -> list[float]:
        """The validation accuracy of the run (one per fold with cv), reported to the pruner as it goes."""
        from .experiments import run_val_accuracy, train_cv
        from .train import train

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
    out = Path(out) if out is not None else _default_out(study_name)
    searched = _searched_space(base, fixed, grid, space, sampler)
    base = replace(base, **fixed)
    if base.resolved_val_size == 0 and not cv:
        raise UserError("tuning scores validation accuracy: give --val-size > 0 (or --cv K)")
    if trials is None:
        trials = math.prod(len(v) for v in grid.values()) if grid else 20
    if trials < 1:
        raise UserError("--trials must be at least 1")
    description = _description(sampler, searched, base, cv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _storage_errors(storage):
        study = _load_study(
            open_storage(storage),
            study_name,
            create=True,
            sampler=_make_sampler(sampler, grid),
            pruner=_make_pruner(prune),
        )
        _check_space(study, description)
        _requeue_interrupted(study)
        remaining = trials - len(study.get_trials(deepcopy=False, states=_finished_states()))
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


def _description(
    sampler: str, searched: dict[str, Param], base: TrainConfig, cv: int | None
) -> dict[str, Any]:
    """What makes trials comparable; a study keeps it (see _check_space)."""
    return {
        "sampler": sampler,
        "space": {k: p.describe() for k, p in sorted(searched.items())},
        "fixed": {k: v for k, v in sorted(base.to_dict().items()) if k not in searched and k != "extra"},
        "cv": cv,
    }


def _optimize(study: Any, objective: Objective, remaining: int, trials: int) -> None:
    """Trials until the study holds `trials` finished ones (others may be adding to it too)."""
    import optuna
    import torch

    optuna.logging.set_verbosity(
        optuna.logging.ERROR
    )  # failed trials are reported by the objective, in one line
    study.optimize(
        objective,
        n_trials=2 * remaining,  # the callback stops at `trials` finished; failed ones get as many more tries
        callbacks=[optuna.study.MaxTrialsCallback(trials, states=_finished_states())],
        catch=(UserError, torch.OutOfMemoryError),
    )
    if _completed(study):
        best = study.best_trial
        objective.echo(f"best: trial {best.number}, val_acc {best.value:.2%}  {_fmt_params(best.params)}")


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


# --- the report ---------------------------------------------------------------------------------------------------

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")


def report(
    storage: str,
    study_name: str,
    *,
    out: Path | None = None,
    best_config: Path = BEST_CONFIG,
    echo: Callable[[str], None] = print,
) -> Path:
    """The trials as a table (printed and trials.csv), the best config as a file, and three PNG plots.

    The database is opened read-only: a report never creates or changes it.
    """
    require_optuna()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out) if out is not None else _default_out(study_name)
    with _storage_errors(storage):
        try:
            db = open_storage(storage, read_only=True)
        except NoDatabase as e:
            raise UserError(f"no study {study_name!r} in this storage: {e}") from None
        study = _load_study(db, study_name, create=False)
        header, rows = _trial_table(study)
        for line in _aligned([header, *rows]):
            echo(line)
        table = io.StringIO()
        csv.writer(table).writerows([header, *rows])
        _write(out / "trials.csv", table.getvalue())
        if not _completed(study):
            echo(f"no completed trials yet in study {study_name!r}; nothing more to report")
            return out
        _write_best_config(study, Path(best_config), echo)
        drawn = _draw_plots(study, out / "plots", echo)
        _echo_importances(study, echo)
    echo(f"plots -> {out / 'plots'}/ ({', '.join(drawn) or 'none'}); table -> {out / 'trials.csv'}")
    return out


def _write(path: Path, payload: str | bytes) -> None:
    """A report file, written whole; a folder that cannot hold it is one line (a full disk is the CLI's)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, payload)
    except OSError as e:
        if e.errno in (28, 122):  # ENOSPC, EDQUOT: the CLI words these
            raise
        raise UserError(f"cannot write {path} ({first_line(e)}); choose another --out") from None


def _trial_table(study: Any) -> tuple[list[str], list[list[Any]]]:
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
    return header, rows


def _aligned(rows: list[list[Any]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(*rows, strict=True)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _write_best_config(study: Any, path: Path, echo: Callable[[str], None]) -> None:
    """The best trial's parameters over the study's fixed options: a config `cifar10 train --config` takes."""
    best = study.best_trial
    space = study.user_attrs.get("space")
    fixed = space.get("fixed") if isinstance(space, dict) else None
    try:
        cfg = TrainConfig.from_dict({**(fixed if isinstance(fixed, dict) else {}), **best.params})
    except (TypeError, ValueError) as e:
        raise UserError(
            f"study {study.study_name!r} holds no valid configuration ({first_line(e)})"
        ) from None
    _write(path, json.dumps(cfg.to_dict(), indent=2) + "\n")
    echo(
        f"best: trial {best.number}, val_acc {best.value:.2%}  {_fmt_params(best.params)}\n"
        f"best config -> {path} (train it: cifar10 train --config {path})"
    )


def _draw_plots(study: Any, folder: Path, echo: Callable[[str], None]) -> list[str]:
    """Optuna's history, importance and parallel-coordinate plots as PNG files; returns the names drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    drawn = []
    for name in PLOTS:
        try:
            ax = getattr(vis, f"plot_{name}")(study)
        except (RuntimeError, ValueError, ZeroDivisionError) as e:  # e.g. importance from < 2 trials
            echo(f"plot {name} skipped: {first_line(e)}")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
        _write(folder / f"{name}.png", png.getvalue())
        drawn.append(name)
    return drawn


def _echo_importances(study: Any, echo: Callable[[str], None]) -> None:
    import optuna

    if len(_completed(study)) < 2:
        return
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return
    echo("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))


def _fmt_value(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
