"""Hyperparameter search and cross-validation: real Optuna studies in real SQLite files, real runs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest

from cifar10_cnn import data as D
from cifar10_cnn import tune
from cifar10_cnn.config import TrainConfig, recipe_config
from cifar10_cnn.errors import UserError

from .conftest import error_line, in_process, on, one_thread_env, run_cli, snapshot

TINY = ["--subset", "600", "--epochs", "1", "--no-prune"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cifar10_cnn", *args]


def trials_of(db, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{db}").get_trials()


def test_two_processes_share_one_study_without_lost_or_duplicated_trials(tmp_path, small_data, monkeypatch):
    """Two processes on one SQLite study, each trial a whole run (trained on a real 600-image subset and
    evaluated on the 1,000 test images of the smaller copy of the data: the search scores validation only).
    The report and the refused search then run the command line's main() in this process, from tmp_path."""
    db, out = tmp_path / "tune.db", tmp_path / "trials"
    args = ["tune", "--sampler", "random", "--trials", "4", "--storage", f"sqlite:///{db}", "--study", "s"]
    args += ["--out", str(out), "--space", "lr=log:0.003:0.1", *on(small_data), *TINY]
    procs = [
        subprocess.Popen(
            cli(*args),
            env=one_thread_env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs

    trials = trials_of(db, "s")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(complete) <= 5 and len(complete) == len(
        trials
    )  # the cap may overshoot by one racing trial
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    run_dirs = [t.user_attrs["run_dir"] for t in complete]
    assert len(set(run_dirs)) == len(run_dirs)
    for t in complete:  # every trial is a whole run whose validation accuracy is the trial's value
        results = json.loads((tmp_path / t.user_attrs["run_dir"] / "results.json").read_text())
        assert results["final_val_accuracy"] == pytest.approx(t.value)
        assert results["val_size"] == 60 and set(t.params) == {"lr", "momentum", "weight_decay", "batch_size",
                                                               "label_smoothing", "crop_padding", "cutout"}  # fmt: skip
    both = outputs[0][0] + outputs[1][0]
    assert sum(both.count(f"trial {t.number}:") for t in complete) == len(complete)  # each ran exactly once

    # The report: a table, the best config as a file `train --config` accepts, and three PNG plots.
    monkeypatch.chdir(tmp_path)  # where the processes ran: the trials' run_dir are relative to it
    report = in_process("tune", "--study", "s", "--storage", f"sqlite:///{db}", "--out", str(out), "--report",
                        "--best-config", str(tmp_path / "best.json"))  # fmt: skip
    assert report.returncode == 0, report.stderr
    best = max(complete, key=lambda t: t.value)
    assert f"best: trial {best.number}, val_acc {best.value:.2%}" in report.stdout
    cfg = TrainConfig.load(tmp_path / "best.json")
    assert cfg.lr == pytest.approx(best.params["lr"]) and cfg.subset == 600 and cfg.epochs == 1
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "trials.csv").read_text().splitlines()) == len(trials) + 1

    # The same study with another space is refused, and left as it was.
    proc = in_process(*args[: -len(TINY)], "--space", "lr=log:0.001:0.1", *TINY)
    assert "was created with another search space (differs in space)" in error_line(proc)
    assert len(trials_of(db, "s")) == len(trials)


def test_interrupted_search_leaves_a_consistent_study_and_continues(tmp_path, small_data):
    db = tmp_path / "tune.db"
    args = cli("tune", "--grid", "lr=0.003,0.03", "--storage", f"sqlite:///{db}", "--study", "g", *TINY)
    args += [
        *on(small_data),
        "--epochs",
        "3",
    ]  # the second trial is still training after its first checkpoint
    proc = subprocess.Popen(
        args, env=one_thread_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("tune/g/trial-0001/checkpoints/*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the second trial (epoch 2 of 3)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; the study is intact" in err
    states = [t.state for t in trials_of(db, "g")]
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.COMPLETE in states

    again = subprocess.run(
        args, env=one_thread_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    complete = [t for t in trials_of(db, "g") if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == [0.003, 0.03]  # the grid, each point once


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "lr=0.1", "wings=2,4"], "--grid: unknown parameter 'wings'"),
        (["--space", "lr=0.1:0.01"], "--space 'lr=0.1:0.01': write NAME=LOW:HIGH"),
        (["--grid", "epochs=2,abc"], "--grid epochs=abc: epochs takes int"),
        (
            ["--storage", "sqlite:////no/such/folder/t.db"],
            "cannot open the study storage 'sqlite:////no/such/folder/t.db'",
        ),
        (["--storage", "nosuchdb://x"], "cannot open the study storage 'nosuchdb://x'"),
        (
            ["--recipe", "fast", "--val-size", "0"],
            "tuning scores validation accuracy: give --val-size > 0 (or --cv K)",
        ),
        (["--report", "--study", "nothing"], "no study 'nothing' in this storage"),
    ],
)
def test_tune_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    proc = in_process("tune", *args)
    assert message in error_line(proc)
    assert not (tmp_path / "tune").exists()
    assert (
        proc.returncode == 2 and list(tmp_path.iterdir()) == []
    )  # not even tune.db: --report creates nothing


def sqlite_file(path: Path, *sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        for statement in sql:
            db.execute(statement)
        db.commit()


def optuna_db(path: Path) -> None:
    """A real Optuna study 's' with two finished trials."""
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="s", direction="maximize")
    for value in (0.5, 0.6):
        trial = study.ask()
        trial.suggest_float("lr", 0.01, 0.1)
        study.tell(trial, value)


def test_a_database_of_another_application_is_one_line_and_left_as_it_was(tmp_path):
    # A SQLite file of an application that also uses Alembic: Optuna would add its tables and then fail.
    db = tmp_path / "app.db"
    sqlite_file(
        db,
        "CREATE TABLE alembic_version (version_num VARCHAR(32))",
        "INSERT INTO alembic_version VALUES ('ab12')",
    )
    before = snapshot(tmp_path)
    proc = run_cli(
        "tune", "--storage", f"sqlite:///{db}", "--study", "x", "--val-size", "10", check=False, cwd=tmp_path
    )
    assert "app.db is a database of another application (tables alembic_version)" in error_line(proc)
    assert proc.returncode == 2 and snapshot(tmp_path) == before


def _not_sqlite(p: Path) -> None:
    p.write_bytes(b"name,score\nada,3\n" * 50)


def _corrupt_sqlite(p: Path) -> None:
    p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)


def _old_optuna_schema(p: Path) -> None:
    optuna_db(p)
    sqlite_file(p, "UPDATE alembic_version SET version_num = 'v1.3.0.a'")


STORAGE_FAMILY = {
    "another application": (
        lambda p: sqlite_file(p, "CREATE TABLE users (id INTEGER)"),
        "is a database of another application (tables users); nothing was changed",
    ),
    "not SQLite": (_not_sqlite, "is not a SQLite database; nothing was changed"),
    "corrupt SQLite": (_corrupt_sqlite, "cannot read the study storage"),
    "a folder": (lambda p: p.mkdir(), "is not a regular file"),
    "a FIFO": (lambda p: os.mkfifo(p), "is not a regular file"),  # opening it would wait forever
    "another Optuna schema": (_old_optuna_schema, "is no longer compatible with the table schema"),
}


@pytest.mark.parametrize("mode", ["search", "report"])
@pytest.mark.parametrize("kind", list(STORAGE_FAMILY))
def test_a_storage_that_is_not_ours_is_refused_and_left_as_it_was(tmp_path, monkeypatch, kind, mode):
    make, message = STORAGE_FAMILY[kind]
    db = tmp_path / "x.db"
    make(db)
    monkeypatch.chdir(tmp_path)  # the default --out, tune/<study>, must not appear either
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        search_or_report(mode, f"sqlite:///{db}")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert snapshot(tmp_path) == before


def search_or_report(mode: str, storage: str, study: str = "s") -> None:
    """What `cifar10 tune` runs, in this process: the CLI turns a UserError into one line and exit status 2."""
    if mode == "report":
        tune.report(storage, study, echo=lambda _: None)
    else:
        cfg = replace(recipe_config("seed"), val_size=10, subset=100, epochs=1)
        tune.tune(cfg, fixed={}, trials=1, storage=storage, study_name=study, echo=lambda _: None)


def test_report_names_a_missing_study_and_changes_nothing(tmp_path, monkeypatch):
    optuna_db(tmp_path / "t.db")
    (tmp_path / "empty.db").touch()
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for storage, study, message in (
        ("sqlite:///t.db", "nope", "no study 'nope' in this storage; studies there: s"),
        (
            "sqlite:///empty.db",
            "s",
            "no study 's' in this storage: empty.db holds no studies; nothing was created",
        ),
        ("sqlite:///t.db", "../up", "--study '../up' cannot name a folder; give --out for its trials"),
    ):
        with pytest.raises(UserError) as e:
            search_or_report("report", storage, study)
        assert str(e.value) == message
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only filesystem needs a tmpfs mount (root)")
def test_a_read_only_database_is_reported_but_never_written(tmp_path, monkeypatch):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        optuna_db(tmp_path / "t.db")  # made here and copied: this process keeps a connection open to it
        shutil.copy(tmp_path / "t.db", mnt / "t.db")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = snapshot(mnt)
        for storage, where in ((f"sqlite:///{mnt}/t.db", "t.db"), (f"sqlite:///{mnt}/new.db", "ro")):
            with pytest.raises(UserError, match=f"{where} is read-only; give --storage a writable file"):
                search_or_report("search", storage)
        monkeypatch.chdir(tmp_path)
        search_or_report("report", f"sqlite:///{mnt}/t.db")  # reading needs no write, not even a journal
        assert TrainConfig.load(tmp_path / "tune-best.json").lr == pytest.approx(
            trials_of(tmp_path / "t.db", "s")[1].params["lr"]
        )
        assert snapshot(mnt) == before
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)])  # lazy: Optuna's pool may still hold the file open


def test_stratified_folds_partition_the_images_and_keep_class_shares(cifar):
    labels = cifar.train_labels[:5000]
    vals = [D.stratified_fold(labels, 5, k, seed=0)[1] for k in range(5)]
    assert sorted(np.concatenate(vals).tolist()) == list(range(5000))  # a partition: no overlap, nothing left
    overall = np.bincount(labels, minlength=10) / len(labels)
    for k, val in enumerate(vals):
        train = D.stratified_fold(labels, 5, k, seed=0)[0]
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 5000
        assert np.abs(np.bincount(labels[val], minlength=10) / len(val) - overall).max() < 0.005
    assert not np.array_equal(vals[0], D.stratified_fold(labels, 5, 0, seed=1)[1])


def test_cross_validation_runs_every_fold_and_summarises(tmp_path, small_data):
    out = tmp_path / "cv"
    proc = in_process(
        "train", "--cv", "2", "--subset", "600", "--epochs", "1", "--out", str(out), "--no-progress",
        *on(small_data),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "cv.json").read_text())
    folds = [json.loads((out / f"fold{k}" / "results.json").read_text()) for k in range(2)]
    assert [f["val_size"] for f in folds] == [300, 300] and [f["train_size"] for f in folds] == [300, 300]
    assert summary["per_fold_val_accuracy"] == [f["final_val_accuracy"] for f in folds]
    assert summary["val_accuracy"]["mean"] == pytest.approx(np.mean(summary["per_fold_val_accuracy"]))
    assert "2-fold cross-validation accuracy" in proc.stdout
    configs = [TrainConfig.load(out / f"fold{k}" / "config.json") for k in range(2)]
    assert [(c.folds, c.fold) for c in configs] == [(2, 0), (2, 1)]  # each fold run is reproducible


def test_grid_and_space_know_every_config_field_but_the_recipe():
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe"}
    for flag, parse in (("--grid", tune.parse_grid), ("--space", tune.parse_space)):
        with pytest.raises(UserError, match=rf"^{flag}: unknown parameter 'recipe'; known: ") as err:
            parse(["recipe=seed"])
        assert set(str(err.value).split("known: ")[1].split(", ")) == known
    assert tune.parse_grid(["lr=0.01,0.1", "batch_size=64"]) == {"lr": [0.01, 0.1], "batch_size": [64]}
