"""What training may delete, and what a kill, a failed start or a broken file leaves (real processes and files)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifar10_cnn import data as D
from cifar10_cnn.checkpoint import load_checkpoint
from cifar10_cnn.config import recipe_config
from cifar10_cnn.errors import CheckpointError
from cifar10_cnn.train import fit

from .conftest import DATA_DIR, copy_run, error_line, in_process, loaded_by, on, run_cli, snapshot

TINY = ["--subset", "100", "--val-size", "10", "--epochs", "1", "--no-progress"]


def quiet(*_):
    pass


# --- --force removes only what a run of ours wrote ---------------------------------------------------------


def test_force_refuses_a_folder_that_is_not_a_run_of_ours(tmp_path):
    p = tmp_path / "p"
    (p / "plots").mkdir(parents=True)
    (p / "config.json").write_text("{}")
    (p / "plots" / "fig.png").write_text("x")
    before = snapshot(tmp_path)
    line = error_line(in_process("train", *TINY, "--out", str(p), "--force"))
    assert "no run of ours wrote" in line and "nothing was changed" in line
    assert snapshot(tmp_path) == before


def test_force_replaces_our_run_and_keeps_the_users_files(tmp_path, trained_run, small_data):
    run = copy_run(trained_run, tmp_path / "run", checkpoints=True)
    (run / "tb").mkdir()
    (run / "plots" / "mine.png").write_text("a user's figure")
    (run / "notes.txt").write_text("a user's notes")
    (run / "tb" / "my-events.txt").write_text("not an event file of ours")
    forced = in_process("train", *TINY, "--lr", "0.02", "--out", str(run), "--force", *on(small_data))
    assert forced.returncode == 0, forced.stderr
    assert json.loads((run / "config.json").read_text())["lr"] == 0.02
    assert (run / "plots" / "mine.png").read_text() == "a user's figure"
    assert (run / "notes.txt").read_text() == "a user's notes"
    assert (run / "tb" / "my-events.txt").exists()
    assert (run / "model.safetensors").is_file() and (run / "plots" / "curves.png").is_file()


# --- a kill at any instant leaves a run that --resume completes, bit-identical ---------------------------------


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "CIFAR10_DATA": str(DATA_DIR), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cifar10_cnn", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """SIGKILL proc as soon as ready() holds (polled every millisecond); False if it finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.wait()
    return False


def _temporary(ckpt: Path, name: str):
    def ready() -> bool:
        return ckpt.is_dir() and any(n.startswith(f".{name}.tmp-") for n in os.listdir(ckpt))

    return ready


def _after(seconds: float):
    started: list[float] = []

    def ready() -> bool:
        started.append(time.monotonic())
        return started[-1] - started[0] >= seconds

    return ready


def test_sigkill_during_checkpoint_writes_then_resume_is_exact(tmp_path, small_data):
    """Killed while writing best.pt, then last.pt, then at a random instant; each time --resume goes on."""
    args = ["train", "--subset", "600", "--val-size", "100", "--epochs", "4", "--lr", "1e-9", "--patience", "1",
            "--no-progress", "--seed", "2", *on(small_data)]  # fmt: skip
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    ckpt = killed / "checkpoints"
    triggers = [
        _temporary(ckpt, "best.pt"),
        _temporary(ckpt, "last.pt"),
        _after(random.Random().uniform(3, 9)),
    ]
    kills = 0
    for k, ready in enumerate(triggers):
        command = (
            [*args, "--out", str(killed)]
            if k == 0
            else ["train", "--resume", str(killed), "--no-progress", *on(small_data)]
        )
        kills += _kill_when(_start(command), ready)
    assert kills >= 2, "the run finished before the kills it was meant to get"
    run_cli("train", "--resume", str(killed), "--no-progress", *on(small_data))
    run_cli(*args, "--out", str(straight))
    a, b = load_file(killed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n in os.listdir(ckpt) if ".tmp-" in n] == []  # stale temporaries were cleaned up
    results = json.loads((killed / "results.json").read_text())
    assert results["stopped_early"] and results["weights"] == "best"


# --- a failed start leaves nothing that blocks the rerun ---------------------------------------------------


def test_a_failed_start_does_not_block_the_same_command(tmp_path, small_data):
    """The data is missing (and no network), then it is there: the same command now trains. The data folder
    is given by --data-dir both times (the second time a copy of a real subset, so --allow-unverified too).
    Both commands call the command line's main() in this process: the claim is about the files they leave."""
    run, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    args = ["train", *TINY, *on(data), "--out", str(run)]
    proc = in_process(*args, env={"CIFAR10_DATA": "", "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert "cannot download" in error_line(proc)
    assert not run.exists()
    for name in ("train.npz", "test.npz"):
        shutil.copy(small_data / name, data / name)
    assert in_process(*args).returncode == 0
    assert (run / "model.safetensors").is_file()


# --- broken checkpoints and configs are one line --------------------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch(cifar, tmp_path_factory):
    """A 1-epoch fit (the library call, no subprocess) and its splits."""
    cfg = recipe_config("seed", epochs=2, subset=300, val_size=50)
    splits = D.make_splits(cifar, val_size=50, split_seed=0, subset=300)
    run = tmp_path_factory.mktemp("fit")
    fit(recipe_config("seed", epochs=1, subset=300, val_size=50), splits, run, progress=False, echo=quiet)
    return cfg, splits, run


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda s: s.pop("optimizer"), "lacks optimizer"),
        (lambda s: s.update(model={}), "does not fit"),
        (lambda s: s["model"].update({k: torch.zeros(3) for k in list(s["model"])[:1]}), "does not fit"),
        (lambda s: s.update(history="x"), "does not fit"),
    ],
    ids=["no-optimizer", "empty-model", "wrong-shape", "bad-history"],
)
def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line(one_epoch, tmp_path, damage, words):
    cfg, splits, source = one_epoch
    (tmp_path / "checkpoints").mkdir()
    state = load_checkpoint(source / "checkpoints" / "last.pt")
    damage(state)
    torch.save(state, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=words) as info:
        fit(cfg, splits, tmp_path, resume=True, progress=False, echo=quiet)
    assert "\n" not in str(info.value)


def test_bad_config_values_are_one_line(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run", checkpoints=True)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": "abc"}))
    before = snapshot(run)
    line = error_line(run_cli("train", "--resume", str(run), check=False))
    assert "epochs='abc' must be int" in line
    line = error_line(in_process("train", "--config", str(run / "config.json"), "--out", str(tmp_path / "b")))
    assert "epochs='abc'" in line
    assert snapshot(run) == before and not (tmp_path / "b").exists()


def test_library_resume_checks_the_config_too(tmp_path, trained_run, cifar):
    from cifar10_cnn.errors import UserError
    from cifar10_cnn.pipeline import train

    run = copy_run(trained_run, tmp_path / "run", checkpoints=True)
    before = snapshot(run)
    with pytest.raises(UserError, match=r"conflicts with --lr 0\.5"):
        train(
            recipe_config("seed", epochs=1, subset=1000, val_size=200, lr=0.5),
            resume=run,
            data=cifar,
            echo=quiet,
        )
    assert snapshot(run) == before


def test_bad_out_is_one_line_and_writes_nothing(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    before = snapshot(tmp_path)
    for out in (afile, afile / "run"):
        line = error_line(in_process("train", *TINY, "--out", str(out)))
        assert "is a file, not a folder" in line
    if os.geteuid() != 0:  # root writes anywhere, so a read-only folder is only read-only to others
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert "read-only" in error_line(in_process("train", *TINY, "--out", str(ro / "run")))
        ro.chmod(0o755)
    assert snapshot(tmp_path) == {**before, **({"ro": "dir"} if os.geteuid() != 0 else {})}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only filesystem needs root")
def test_out_on_a_read_only_filesystem_is_one_line(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        line = error_line(in_process("train", *TINY, "--out", str(mnt / "run")))
        assert "read-only" in line or "cannot create the run directory" in line
    finally:
        subprocess.run(["umount", str(mnt)])


# --- what the command line imports --------------------------------------------------------------------------


def test_help_and_the_package_load_no_training_code():
    code = (
        "import contextlib, io\n"
        "import cifar10_cnn\n"
        "from cifar10_cnn.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
    )
    assert loaded_by(code, ("torch", "matplotlib", "cifar10_cnn.train")) == []


def test_the_training_loop_loads_no_evaluation_plots_or_report():
    # train.py is the loop alone: the job around it (evaluation, plots, report) is pipeline.py's.
    downstream = ("matplotlib", "PIL", "cifar10_cnn.evaluate", "cifar10_cnn.plots", "cifar10_cnn.report",
                  "cifar10_cnn.explain", "cifar10_cnn.pipeline")  # fmt: skip
    assert loaded_by("import cifar10_cnn.train", downstream) == []


# --- train --out: a folder is ours only if we made it (or it was empty) ------------------------------------


def test_train_refuses_a_non_empty_folder_that_is_not_ours_and_a_link_to_one(tmp_path):
    from cifar10_cnn.runs import MARKER, create_run

    system = tmp_path / "system"  # stands for a system folder: files whose names no run of ours writes
    (system / "lib").mkdir(parents=True)
    (system / "passwd").write_text("root:x:0:0\n")
    (system / "lib" / "libc.so").write_bytes(b"\x7fELF")
    (tmp_path / "link").symlink_to(system, target_is_directory=True)
    before = snapshot(tmp_path)
    for out, force in ((system, ()), (tmp_path / "link", ("--force",))):
        line = error_line(in_process("train", *TINY, "--out", str(out), *force))
        assert f"--out {out} is a folder that is not empty (lib, passwd)" in line, line
        assert "holds no run of ours" in line and "nothing was changed" in line
        assert snapshot(tmp_path) == before
    # An empty folder held nothing of anyone's: it becomes a run of ours, marker first.
    empty = tmp_path / "empty"
    empty.mkdir()
    run = create_run(empty, recipe_config("seed", epochs=1, subset=100, val_size=10), force=False)
    assert run.is_ours and sorted(p.name for p in empty.iterdir()) == [MARKER, "config.json"]


@pytest.mark.parametrize("name", ["results.json", "config.json"])
def test_a_fifo_or_device_as_a_run_file_is_one_line_for_every_verb(tmp_path, trained_run, name):
    """A FIFO blocked a reader forever (the size check passed: 0 bytes), a link to /dev/zero read without end."""
    run = copy_run(trained_run, tmp_path / "run", checkpoints=True)
    (run / name).unlink()
    os.mkfifo(run / name)
    before = snapshot(run)
    verbs = (["report", str(run)], ["evaluate", str(run), "--no-progress"], ["train", "--resume", str(run)])
    for verb in verbs:
        line = error_line(run_cli(*verb, check=False, timeout=60))  # the timeout: a hang fails the test
        assert line == f"error: {run / name} is not a regular file", (verb, line)
    (run / name).unlink()
    (run / name).symlink_to("/dev/zero")
    line = error_line(run_cli("evaluate", str(run), "--no-progress", check=False, timeout=60))
    assert line == f"error: {run / name} is not a regular file"
    assert snapshot(run).keys() == before.keys()


def test_deeply_nested_run_files_are_one_line(tmp_path, trained_run):
    """100 levels parse, and then overflowed the stack of what read them; 100,000 overflow the parser's."""
    run = copy_run(trained_run, tmp_path / "run", checkpoints=True)
    config = json.loads((run / "config.json").read_text())
    verbs = (["evaluate", str(run), "--no-progress"], ["train", "--resume", str(run), "--no-progress"])
    for depth, words in ((100, "nests deeper than 32 levels"), (100_000, "is not readable JSON")):
        (run / "results.json").write_text('{"x": ' + "[" * depth + "]" * depth + "}")
        for verb in verbs:
            line = error_line(in_process(*verb))
            assert line.startswith(f"error: {run / 'results.json'} ") and words in line, (verb, line)
    (run / "results.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({**config, "x": json.loads("[" * 100 + "]" * 100)}))
    given = ["train", "--config", str(run / "config.json"), "--out", str(tmp_path / "b")]
    for verb in (*verbs, given):
        line = error_line(in_process(*verb))
        assert line == f"error: {run / 'config.json'} nests deeper than 32 levels; it is not a file of ours"
    assert not (tmp_path / "b").exists()


def test_the_bounded_reader_refuses_what_is_not_a_regular_file_without_waiting(tmp_path):
    import socket

    from cifar10_cnn.errors import FileError
    from cifar10_cnn.files import read_bounded, read_json_object

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "zero").symlink_to("/dev/zero")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "socket"))
        for name in ("fifo", "folder", "zero", "socket"):
            with pytest.raises(FileError, match=f"^{tmp_path / name} is not a regular file$"):
                read_bounded(tmp_path / name, 10)
    (tmp_path / "big.json").write_text('{"x": "' + "a" * 2**21 + '"}')
    with pytest.raises(FileError, match="is larger than 2 MB; it is not a file of ours"):
        read_json_object(tmp_path / "big.json")
    assert read_bounded(tmp_path / "missing", 10) is None and read_json_object(tmp_path / "missing") == {}
    with pytest.raises(FileError, match="missing does not exist"):
        read_json_object(tmp_path / "missing", required=True)
