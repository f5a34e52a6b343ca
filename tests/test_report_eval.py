"""The report page of evaluated runs: content, several runs compared, errors, and a real headless browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from cifar10_cnn.report import write_report

from .conftest import copy_run, error_line, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
ACCENT = np.array([0x09, 0x69, 0xDA]) / 255  # the headline number's colour (report CSS --accent)


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.fixture(scope="module")
def seeds_dir(cifar, tmp_path_factory) -> Path:
    """Two runs of one recipe (seeds 0 and 1) as `cifar10 train --seeds 2` writes them, with a summary."""
    from cifar10_cnn.config import recipe_config
    from cifar10_cnn.pipeline import train_seeds

    cfg = recipe_config("seed", epochs=1, subset=1000, val_size=200)
    out = tmp_path_factory.mktemp("seeds") / "seed-2seeds"
    return train_seeds(cfg, 2, out=out, data=cifar, progress=False, echo=lambda *_: None)


# --- one run -------------------------------------------------------------------------------------------------


def test_report_of_an_evaluated_run(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    md_path, html_path = write_report(run)
    md, page = md_path.read_text(), html_path.read_text()
    results = json.loads((run / "results.json").read_text())
    cal = json.loads((run / "eval" / "metrics.json").read_text())["calibration"]

    headline = f"{results['test_accuracy'] * 100:.2f}%"
    lo, hi = results["test_accuracy_ci95"]
    assert f'class="value">{headline}<' in page
    assert f"95% CI {lo * 100:.2f}% to {hi * 100:.2f}%" in page
    assert (
        f"{cal['uncalibrated']['ece'] * 100:.2f}%" in page and f"temperature {cal['temperature']:.3f}" in page
    )
    for label in ("Model", "Parameters", "Recipe", "Data", "Train time"):
        assert f"<dt>{label}</dt>" in page, label
    assert "sha256 verified" in page

    for heading in (
        "Calibration",
        "Per-class results",
        "Errors",
        "Where the model looks",
        "Robustness to common corruptions",
        "Training",
    ):
        assert f"\n## {heading}\n" in md, heading
    assert f"| expected calibration error (ECE) | {cal['uncalibrated']['ece'] * 100:.2f}% |" in md
    assert f"after temperature scaling (T = {cal['temperature']:.3f})" in md
    assert "cifar10 evaluate RUN --corruptions" in md  # robustness not measured for this run: say how
    per_class = results["per_class"]["cat"]
    assert f"| cat | {per_class['recall'] * 100:.2f}% | {per_class['precision'] * 100:.2f}% |" in md
    cm_row = " | ".join(f"{v:,}" for v in results["confusion_matrix"][3])
    assert f"| true cat | {cm_row} |" in md, "confusion counts table"

    # Every figure of the run is embedded, byte for byte, and nothing is fetched from anywhere.
    expected = {
        (run / p).read_bytes()
        for p in ("eval/reliability.png", "eval/confident_errors.png", "eval/explanations.png",
                  "plots/confusion.png", "plots/per_class.png",
                  "plots/predictions.png", "plots/curves.png", "plots/augmentations.png")
    }  # fmt: skip
    assert set(embedded_images(page)) == expected
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()


# --- several runs --------------------------------------------------------------------------------------------


def test_report_compares_the_runs_of_one_recipe(seeds_dir):
    proc = run_cli("report", str(seeds_dir))
    html_path = seeds_dir / "report.html"
    assert proc.stdout.strip() == str(html_path)
    md = (seeds_dir / "report.md").read_text()
    accs = [
        json.loads((seeds_dir / s / "results.json").read_text())["test_accuracy"] for s in ("seed0", "seed1")
    ]
    assert accs[0] != accs[1]
    mean, std = statistics.fmean(accs), statistics.stdev(accs)
    assert f"| test accuracy | {mean * 100:.2f}% ± {std * 100:.2f} points | {min(accs) * 100:.2f}% |" in md
    assert "recipe seed, model seed_cnn: 2 runs (seed0, seed1)" in md
    for name in ("seed0", "seed1"):
        assert f"| {name} | seed_cnn | seed |" in md
    page = html_path.read_text()
    figures = {p.name for p in (seeds_dir / "report_plots").glob("*.png")}
    assert figures == {"accuracy.png", "curves.png"}
    assert set(embedded_images(page)) == {(seeds_dir / "report_plots" / f).read_bytes() for f in figures}
    assert f'class="value">{mean * 100:.2f}%<' in page

    # The same from the run directories themselves, to a chosen file.
    out = seeds_dir / "elsewhere" / "both.html"
    run_cli("report", str(seeds_dir / "seed0"), str(seeds_dir / "seed1"), "--out", str(out))
    assert out.is_file() and (out.parent / "both_plots" / "curves.png").is_file()


def test_report_errors_are_one_line_and_write_nothing(seeds_dir, tmp_path):
    a = copy_run(seeds_dir / "seed0", tmp_path / "a")
    b = copy_run(seeds_dir / "seed1", tmp_path / "b")
    results = json.loads((b / "results.json").read_text())
    results["class_names"] = ["cat", "dog"]
    (b / "results.json").write_text(json.dumps(results))
    line = error_line(run_cli("report", str(a), str(b), check=False))
    assert "different class lists" in line
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "report_plots").exists()

    line = error_line(run_cli("report", str(a), str(tmp_path / "missing"), check=False))
    assert "does not exist" in line
    not_run = tmp_path / "not-a-run"
    not_run.mkdir()
    assert "not a run directory" in error_line(run_cli("report", str(not_run), check=False))

    unevaluated = tmp_path / "unevaluated"
    unevaluated.mkdir()
    shutil.copy(a / "config.json", unevaluated / "config.json")
    line = error_line(run_cli("report", str(a), str(unevaluated), check=False))
    assert "no test results yet" in line and "cifar10 evaluate" in line
    assert not (tmp_path / "report.html").exists()
    line = error_line(run_cli("report", str(a), "--out", str(tmp_path / "x.html"), check=False))
    assert "--out" in line and not (tmp_path / "x.html").exists()


# --- in a real browser ---------------------------------------------------------------------------------------


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with no network features and a throw-away profile."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is needed for the report page test: apt-get install -y chromium")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


PROBE = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    widths: images.map(i => i.naturalWidth),
    // Distinct colours of each decoded image, sampled on a 64x64 grid: a blank image has one or two.
    colours: Object.fromEntries(images.map(i => {
      const c = document.createElement("canvas");
      c.width = c.height = 64;
      const g = c.getContext("2d");
      g.drawImage(i, 0, 0, 64, 64);
      const d = g.getImageData(0, 0, 64, 64).data, seen = new Set();
      for (let k = 0; k < d.length; k += 4) seen.add((d[k] << 16) | (d[k + 1] << 8) | d[k + 2]);
      return [i.alt.split(":")[0], seen.size];
    })),
    complete: images.every(i => i.complete),
    headline: document.querySelector(".headline .value").textContent,
  });
  document.body.appendChild(out);
});</script>"""


def rendered(page: Path, profile: Path) -> dict:
    """What the browser made of the page: each image's decoded width and the headline text."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    proc = chromium(profile, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the page did not load in Chromium: {proc.stderr[-2000:]}"
    return json.loads(found.group(1))


def test_report_pages_render_in_headless_chromium(trained_run, seeds_dir, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    _, html_path = write_report(run)
    results = json.loads((run / "results.json").read_text())
    headline = f"{results['test_accuracy'] * 100:.2f}%"

    seen = rendered(html_path, tmp_path / "profile")
    assert seen["headline"] == headline
    assert seen["complete"] and len(seen["widths"]) == 8 and all(w > 0 for w in seen["widths"]), seen
    # The Grad-CAM figure is drawn: photos under coloured heatmaps, hundreds of colours, not a blank box.
    assert seen["colours"]["Grad-CAM heatmaps of test images"] > 300, seen["colours"]

    shot = tmp_path / "report.png"
    chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1800", html_path.as_uri())
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1800, 1280)
    assert pixels.std() > 0.1, "the screenshot is blank"
    accent = (np.abs(pixels - ACCENT).max(-1) < 0.08).sum()
    assert accent > 800, f"headline number not drawn ({accent} accent pixels)"
    # Below the summary card the reliability diagram is drawn: many distinct colours, not an empty box.
    lower = (pixels[900:1700] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(lower, axis=0)) > 200

    comparison = seeds_dir / "report.html"
    if not comparison.exists():
        run_cli("report", str(seeds_dir))
    seen = rendered(comparison, tmp_path / "profile")
    assert len(seen["widths"]) == 2 and all(w > 0 for w in seen["widths"]) and seen["headline"].endswith("%")


def test_the_report_training_writes_comes_last_and_knows_every_time(trained_run):
    # The pipeline renders the report after the evaluation's timings are recorded, not in the middle of it.
    results = json.loads((trained_run / "results.json").read_text())
    md = (trained_run / "report.md").read_text()
    row = next(line for line in md.splitlines() if "Test accuracy known after" in line)
    assert results["headline_seconds"] > 0 and "n/a" not in row, row
