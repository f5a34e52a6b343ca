"""The walkthrough notebook runs top to bottom, unattended, on a small subset (so that it never rots)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import DATA_DIR, ROOT

NOTEBOOK = ROOT / "notebooks" / "CIFAR10_CNN_Classifier.ipynb"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch, cache_dir):
    nbformat = pytest.importorskip(
        "nbformat", reason="pip install -e '.[test]' installs nbclient and nbformat"
    )
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The committed notebook carries the outputs of a real run; the code must not depend on them.
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    for key, value in {
        "CIFAR10_NOTEBOOK_SUBSET": "1000",
        "CIFAR10_NOTEBOOK_EPOCHS": "1",
        "CIFAR10_NOTEBOOK_OUT": str(tmp_path / "runs"),
        "CIFAR10_DATA": str(DATA_DIR),
        "MPLBACKEND": "Agg",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CIFAR10_NOTEBOOK_FULL", raising=False)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error

    text = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "mode: test" in text and "verified: True" in text
    assert "test accuracy" in text and "ECE" in text and "mean corruption accuracy" in text
    assert "identical logits after reload: True" in text
    images = sum(
        1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    )
    assert images >= 9, f"only {images} figures shown"
    assert "Grad-CAM on layer" in text and "Integrated Gradients for 6 images" in text
    runs = Path(tmp_path / "runs")
    assert (runs / "seed" / "report.html").is_file() and (runs / "fast" / "model.safetensors").is_file()
    assert (runs / "comparison.html").is_file() and (runs / "explanations.png").stat().st_size > 10_000
