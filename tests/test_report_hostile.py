"""`cifar10 report` on hostile run files: one error line, or a report that says what it could not read.

Never a traceback, never memory without a bound; the same rule for one run's report and a comparison.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import DATA_DIR, copy_run, error_line, run_cli


def edit_json(path: Path, **fields) -> None:
    """Set fields in a JSON file, writing NaN and infinities the way a hostile file spells them."""
    obj = {**json.loads(path.read_text()), **fields}
    path.write_text(json.dumps(obj).replace("-Infinity", "-1e999").replace("Infinity", "1e999"))


def report_md(run: Path) -> str:
    proc = run_cli("report", str(run))
    assert proc.stdout.strip() == str(run / "report.html") and "Traceback" not in proc.stderr
    return (run / "report.md").read_text()


def test_nan_and_1e999_results_one_rule_for_a_run_and_a_comparison(trained_run, tmp_path):
    h1, other = copy_run(trained_run, tmp_path / "h1"), copy_run(trained_run, tmp_path / "other")
    results = json.loads((h1 / "results.json").read_text())
    numbers = [k for k, v in results.items() if isinstance(v, float)]
    assert "test_loss" in numbers and len(numbers) > 10
    edit_json(h1 / "results.json", **{**dict.fromkeys(numbers, math.nan), "test_accuracy": math.inf})

    md = report_md(h1)  # one run: built, and it says what it could not read
    assert "**Test accuracy: n/a**" in md
    assert "Could not read (shown as n/a): results.json: test_accuracy is infinite, not a number" in md
    assert "results.json: test_loss is NaN, not a number" in md
    assert "Could not read (shown as n/a): results.json: test_accuracy" in (h1 / "report.html").read_text()

    # A comparison needs each run's test accuracy: the same unreadable field, as one line.
    line = error_line(run_cli("report", str(h1), str(other), check=False))
    assert "no readable test accuracy (results.json: test_accuracy is infinite, not a number)" in line
    assert f"cifar10 evaluate {h1}" in line
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "report_plots").exists()


def test_values_of_the_wrong_kind_are_named_and_the_rest_is_shown(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    edit_json(
        run / "results.json",
        test_accuracy="0.9",  # a string where a number goes
        params=10**400,  # an integer no float holds
        train_seconds=1e308,
        per_class=[1, 2],  # a list where an object goes
        data="npz",
        confusion_matrix={"a": 1},
        class_names=[{"x": 1}],
        stopped_early=[],
    )
    fingerprint = json.loads((run / "eval" / "metrics.json").read_text())["model_fingerprint"]
    edit_json(
        run / "eval" / "metrics.json", calibration=[1, 2, 3], explanations={"images": "x", "seconds": "y"}
    )
    (run / "eval" / "robustness.json").write_text(
        json.dumps({"model_fingerprint": fingerprint, "accuracy": {"fog": "abc"}, "mean_by_severity": [0.5]})
    )
    md = report_md(run)
    for named in (
        "results.json: test_accuracy is a string, not a number",
        "results.json: params is out of range, not a number",
        "results.json: train_seconds is out of range, not a number",
        "results.json: per_class is a list, not an object",
        "results.json: data is a string, not an object",
        "results.json: confusion_matrix is an object, not a list",
        "results.json: class_names is a list, not a list of at most 1000 class names",
        "results.json: stopped_early is a list, not true or false",
        "eval/metrics.json: calibration is a list, not an object",
        "eval/metrics.json: explanations.images is a string, not a list",
        "eval/metrics.json: explanations.seconds is a string, not a number",
        "eval/robustness.json: not a table of accuracies by corruption and severity (not shown)",
    ):
        assert named in md, named
    # What could be read is still there: the per-class accuracies, the training table, the config.
    cat = results["per_class_accuracy"]["cat"]
    assert f"| cat | {cat * 100:.2f}% | n/a | n/a | n/a | n/a |" in md
    assert "| Parameters | n/a |" in md and "| Train time | n/a |" in md
    assert "| 1 (best) |" in md.replace("**", "") and "| recipe | seed |" in md
    assert "Not measured: `cifar10 evaluate RUN --corruptions` adds it." in md


def test_hostile_metrics_csv(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    rows = "".join(f"{e},nan,1e999,abc,-1e999,{'9' * 40},5.0\n" for e in range(1, 10_006))
    (run / "metrics.csv").write_text("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds,extra\n" + rows)
    md = report_md(run)
    assert "| 10,000 | n/a | n/a | n/a | n/a | n/a | 5.0 |" in md and "| 10,001 |" not in md
    assert "metrics.csv: rows after the first 10,000 (not shown)" in md

    (run / "metrics.csv").write_bytes(b"epoch,train_loss\n1,\xff\xfe\n")
    assert "metrics.csv is not a readable metrics file" in error_line(
        run_cli("report", str(run), check=False)
    )


def cli_peak_memory(*args: str, timeout: float = 300) -> tuple[int, str, int]:
    """(exit code, stderr, peak resident memory in KB) of `python -m cifar10_cnn ARGS`: its own rusage."""
    env = {**os.environ, "CIFAR10_DATA": str(DATA_DIR), "OMP_NUM_THREADS": "1"}
    with (
        open(os.devnull, "w") as devnull,
        subprocess.Popen(
            [sys.executable, "-m", "cifar10_cnn", *args], stdout=devnull, stderr=subprocess.PIPE, env=env
        ) as proc,
    ):
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        stderr = proc.stderr.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)  # before Popen reaps it, so its rusage is ours to read
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, usage.ru_maxrss


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="peak memory of one child needs os.wait4 (POSIX)")
def test_50_mb_files_are_one_line_in_bounded_memory(trained_run, tmp_path):
    good = copy_run(trained_run, tmp_path / "good")
    rc, _, baseline = cli_peak_memory("report", str(good))
    assert rc == 0

    big_results = copy_run(trained_run, tmp_path / "big-results")
    padding = "[" + "0.1," * (50 * 2**20 // 4) + "0.1]"  # 50 MB; parsed whole it would take ~400 MB
    (big_results / "results.json").write_text(f'{{"test_accuracy": 0.5, "pad": {padding}}}')
    big_metrics = copy_run(trained_run, tmp_path / "big-metrics")
    with (big_metrics / "metrics.csv").open("a") as f:
        f.write("2,2.3,0.1,2.2,0.1,0.01,1.0\n" * (50 * 2**20 // 27))
    for run, name in ((big_results, "results.json"), (big_metrics, "metrics.csv")):
        for args in ((str(run),), (str(run), str(good))):  # one run, and a comparison
            rc, stderr, peak = cli_peak_memory("report", *args)
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            assert rc == 2 and len(lines) == 1, stderr
            assert lines[0] == f"error: {run / name} is larger than 2 MB; it is not a file of ours"
            assert peak < baseline + 40 * 1024, f"{name}: peak {peak} KB against {baseline} KB for a good run"


def test_unreadable_structures_are_one_line(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "results.json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")  # past the stack
    assert "results.json is not readable JSON" in error_line(run_cli("report", str(run), check=False))
    (run / "results.json").write_text('{"x": ' + "[" * 40 + "]" * 40 + "}")  # parses, but no file of ours
    assert "nests deeper than 32 levels" in error_line(run_cli("report", str(run), check=False))
    (run / "results.json").write_text("[1, 2]")
    assert "results.json must hold a JSON object" in error_line(run_cli("report", str(run), check=False))

    (run / "results.json").unlink()
    os.mkfifo(run / "results.json")  # would block a reader forever
    line = error_line(run_cli("report", str(run), check=False, timeout=60))
    assert line == f"error: {run / 'results.json'} is not a regular file"


def test_a_comparison_ignores_a_stored_interval_that_is_not_its_accuracys(trained_run, tmp_path):
    a, b = copy_run(trained_run, tmp_path / "a"), copy_run(trained_run, tmp_path / "b")
    results = json.loads((a / "results.json").read_text())
    edit_json(a / "results.json", test_accuracy_ci95=[0.5, 0.4])  # reversed, and not around the accuracy
    run_cli("report", str(a), str(b))  # drew its figures (an interval below its dot could not be drawn)
    lo, hi = results["test_accuracy_ci95"]  # the Wilson interval, computed again from accuracy and size
    assert f"({lo * 100:.2f}% to {hi * 100:.2f}%)" in (tmp_path / "report.md").read_text().split("| a |")[1]


def test_too_large_and_too_many_figures_are_named_not_embedded(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    small = (run / "plots" / "per_class.png").read_bytes()
    (run / "plots" / "curves.png").write_bytes(small + bytes(17 * 2**20))  # a 17 MB "figure"
    for i in range(30):
        (run / "plots" / f"extra_{i:02d}.png").write_bytes(small)
    md = report_md(run)
    assert "plots/curves.png: larger than 16 MB (not shown)" in md and "](plots/curves.png)" not in md
    assert "plots/: the 6 PNGs after the first 24 (not shown)" in md
    assert md.count("](plots/extra_") == 24 and "](plots/extra_23.png)" in md
    assert (run / "report.html").stat().st_size < 30 * 2**20


def test_class_names_that_would_break_the_error_line(trained_run, tmp_path):
    a, b = copy_run(trained_run, tmp_path / "a"), copy_run(trained_run, tmp_path / "b")
    edit_json(b / "results.json", class_names=["cat\nerror: forged", *(f"c{i}" for i in range(999))])
    line = error_line(run_cli("report", str(a), str(b), check=False))  # one line: no newline got through
    assert "different class lists" in line and "cat error: forged, c0," in line and "(1000 in all)" in line
