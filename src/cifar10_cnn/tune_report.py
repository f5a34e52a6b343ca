"""The report of a study: its trials as a table, the best config as a file, Optuna's plots; read-only."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TrainConfig, users
from .errors import UserError, first_line
from .runs import write_atomic
from .tune_storage import NoDatabase, open_storage, storage_errors
from .tune_study import completed, default_out, fmt_params, load_study, require_optuna

BEST_CONFIG = Path("tune-best.json")
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
    out = Path(out) if out is not None else default_out(study_name)
    with storage_errors(storage):
        try:
            db = open_storage(storage, read_only=True)
        except NoDatabase as e:
            raise UserError(f"no study {study_name!r} in this storage: {e}") from None
        study = load_study(db, study_name, create=False)
        header, rows = _trial_table(study)
        for line in _aligned([header, *rows]):
            echo(line)
        table = io.StringIO()
        csv.writer(table).writerows([header, *rows])
        _write(out / "trials.csv", table.getvalue())
        if not completed(study):
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
        cfg = TrainConfig.from_dict(
            {**(fixed if isinstance(fixed, dict) else {}), **best.params, **users(best.params)}
        )
    except (TypeError, ValueError) as e:
        raise UserError(
            f"study {study.study_name!r} holds no valid configuration ({first_line(e)})"
        ) from None
    _write(path, json.dumps(cfg.to_dict(), indent=2) + "\n")
    echo(
        f"best: trial {best.number}, val_acc {best.value:.2%}  {fmt_params(best.params)}\n"
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

    if len(completed(study)) < 2:
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
