"""The README stays the truth: CI runs exactly the test command the README gives."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in ln]
    assert len(ci_lines) == 1
    assert ci_lines[0].replace(" -q", "") in readme.replace(" -q", "")
