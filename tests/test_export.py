"""Export: every format round-trips (the exported model reproduces PyTorch on real test images), or fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar10_cnn import export as E
from cifar10_cnn.models import create_model
from cifar10_cnn.weights import load_model, read_metadata, save_weights
from tests.conftest import error_line, in_process, run_cli, snapshot


@pytest.fixture(scope="module")
def held_out(cifar) -> np.ndarray:
    """Test images other than the ones the export verifies on."""
    return cifar.test_images[5000:5100]


@pytest.fixture(scope="module")
def fast_net(cifar, tmp_path_factory) -> Path:
    """The fast net (whitening conv, frozen-scale batch norm, GELU) with data-set whitening and non-trivial
    batch-norm statistics, saved as a weights file: the hardest of the registry to export exactly."""
    torch.manual_seed(0)
    model = create_model("airbench_small")
    from cifar10_cnn.augment import normalize

    x = normalize(torch.from_numpy(cifar.train_images[:500]).permute(0, 3, 1, 2))
    model.init_whitening(x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("fast") / "airbench_small.safetensors"
    save_weights(model.eval(), path, architecture="airbench_small", extra={"temperature": 1.3})
    return path


def torch_reference(source: Path, images: np.ndarray) -> np.ndarray:
    model, _ = load_model(source)
    return E.torch_logits(model, images)


def onnx_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_export_round_trips_with_a_dynamic_batch(trained_run, tmp_path, held_out):
    out = tmp_path / "model.onnx"
    proc = in_process("export", str(trained_run), "--format", "onnx", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "verified on 256 CIFAR-10 test images" in proc.stdout and out.is_file()
    session = onnx_session(out)
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [32, 32, 3]
    assert isinstance(inp.shape[0], str)  # the batch dimension is symbolic
    want = torch_reference(trained_run, held_out)
    for n in (1, 3, 100):
        got = session.run(None, {"images": held_out[:n]})[0]
        assert got.shape == (n, 10)
        assert np.abs(got - want[:n]).max() < E.ATOL
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    source = read_metadata(trained_run / "model.safetensors")
    assert meta["architecture"] == "seed_cnn" and meta["classes"][3] == "cat"
    assert meta["temperature"] == pytest.approx(source.get("temperature", 1.0))
    assert meta["mean"] == source["mean"] and meta["std"] == source["std"]
    assert meta["name"] == "seed-small" and meta["params"] == 1_147_466 and 0 <= meta["test_accuracy"] <= 1


def test_safetensors_export_keeps_weights_and_adds_metadata(trained_run, tmp_path, held_out):
    out = tmp_path / "model.safetensors"
    done = in_process("export", str(trained_run), "--out", str(out))  # safetensors is the default format
    assert done.returncode == 0, done.stderr
    meta = read_metadata(out)
    assert {"architecture", "classes", "mean", "std", "temperature", "name", "version", "params"} <= set(meta)
    assert np.array_equal(torch_reference(out, held_out), torch_reference(trained_run, held_out))


@pytest.mark.filterwarnings("ignore:.*is deprecated:DeprecationWarning")  # TorchScript is, in torch 2.13
def test_torchscript_export_round_trips(trained_run, tmp_path, held_out):
    out = tmp_path / "model.pt"
    done = in_process("export", str(trained_run), "--format", "torchscript", "--out", str(out))
    assert done.returncode == 0, done.stderr
    extra = {"cifar10_cnn.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)  # our own file, just written
    assert json.loads(extra["cifar10_cnn.json"])["architecture"] == "seed_cnn"
    with torch.inference_mode():
        got = scripted(torch.from_numpy(held_out[:7])).numpy()
    assert np.abs(got - torch_reference(trained_run, held_out[:7])).max() < E.ATOL


@pytest.mark.parametrize("fmt", ["onnx", "safetensors", "torchscript"])
def test_the_fast_net_exports_exactly(fast_net, tmp_path, held_out, cifar, fmt):
    out = tmp_path / f"fast{E.FORMATS[fmt]}"
    report = E.export_model(fast_net, out, fmt, images=cifar.test_images[:128])
    assert report["max_abs_diff"] < E.ATOL and out.is_file()
    if fmt == "onnx":
        got = onnx_session(out).run(None, {"images": held_out})[0]
        assert np.abs(got - torch_reference(fast_net, held_out)).max() < E.ATOL


def test_a_failed_verification_keeps_nothing(trained_run, tmp_path, monkeypatch, cifar):
    real = E.onnx_bytes

    def perturbed(model, meta):
        model = create_model(meta.architecture)  # different weights: the export cannot match
        return real(model, meta)

    monkeypatch.setattr(E, "onnx_bytes", perturbed)
    out = tmp_path / "bad.onnx"
    with pytest.raises(E.ExportError, match="does not reproduce the PyTorch model"):
        E.export_model(trained_run, out, "onnx", images=cifar.test_images[:32])
    assert list(tmp_path.iterdir()) == []


def test_verify_onnx_checks_batch_one_too(trained_run, cifar):
    model, meta = load_model(trained_run)
    data = E.onnx_bytes(model, meta)
    assert E.verify_onnx(data, model, cifar.test_images[:16]) < E.ATOL
    with torch.no_grad():
        model.classifier[-1].bias += 1e-3  # now the reference differs by 1e-3
    with pytest.raises(E.ExportError, match=r"max \|logit difference\| 0\.001"):
        E.verify_onnx(data, model, cifar.test_images[:16])


def test_export_cli_errors_are_one_line(trained_run, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("already here")
    assert "--force" in error_line(
        run_cli("export", str(trained_run), "--format", "onnx", "--out", str(out), check=False)
    )
    assert "does not exist" in error_line(in_process("export", str(tmp_path / "nope")))
    assert "already exported" in error_line(in_process("export", str(out)))
    empty = tmp_path / "no-data"
    empty.mkdir()
    proc = in_process("export", str(trained_run), "--out", str(tmp_path / "x.onnx"), "--format", "onnx",
                      "--data-dir", str(empty))  # fmt: skip
    assert "real CIFAR-10 test images" in error_line(proc)
    assert not (tmp_path / "x.onnx").exists()
    proc = in_process("export", str(trained_run), "--out", str(trained_run / "model.safetensors"), "--force")
    assert "is the model being exported" in error_line(proc)


def renamed_model(trained_run: Path, path: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    raw = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in read_metadata(trained_run / "model.safetensors").items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        load_file(str(trained_run / "model.safetensors")),
        str(path),
        metadata={**raw, "name": json.dumps(name)},
    )
    return path


def test_the_default_output_is_named_after_the_input_path_never_the_metadata(
    trained_run, tmp_path, cifar, monkeypatch
):
    source = renamed_model(trained_run, tmp_path / "src" / "weights.safetensors", "../../escape")
    here = tmp_path / "work" / "deep"
    here.mkdir(parents=True)
    before = snapshot(tmp_path)
    proc = run_cli("export", str(source), cwd=here)
    assert "to weights.safetensors" in proc.stdout
    after = snapshot(tmp_path)
    assert set(after) - set(before) == {"work/deep/weights.safetensors"} and all(
        after[k] == v for k, v in before.items()
    )
    escape = tmp_path / f"abs-escape-{os.getpid()}"
    absolute = renamed_model(trained_run, tmp_path / "src" / "abs.safetensors", str(escape))
    monkeypatch.chdir(here)
    report = E.export_model(absolute, None, "onnx", images=cifar.test_images[:16])
    assert (
        report["path"] == "abs.onnx"
        and (here / "abs.onnx").is_file()
        and not escape.with_suffix(".onnx").exists()
    )
    report = E.export_model(trained_run, None, "onnx", images=cifar.test_images[:16])
    assert report["path"] == f"{trained_run.name}.onnx"  # a run directory: the run's name


def test_tampered_metadata_is_one_line_in_export(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    raw = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in read_metadata(trained_run / "model.safetensors").items()
    }
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(trained_run / "model.safetensors")), str(bad), metadata={**raw, "mean": "abc"})
    before = snapshot(tmp_path)
    proc = run_cli("export", str(bad), "--out", str(tmp_path / "out.onnx"), "--format", "onnx", check=False)
    assert "metadata 'mean'" in error_line(proc) and proc.returncode == 2 and snapshot(tmp_path) == before


def test_export_out_under_a_file_or_onto_a_device_says_what_it_is(trained_run, tmp_path, capsys):
    from cifar10_cnn import cli

    afile, fifo = tmp_path / "afile", tmp_path / "pipe.onnx"
    afile.write_text("keep me")
    os.mkfifo(fifo)  # stands for /dev/null: --force must not replace a device node with our file
    cases = {
        str(afile / "x.onnx"): f"--out {afile / 'x.onnx'}: {afile} is a file, not a folder",
        str(
            afile / "deeper" / "x.onnx"
        ): f"--out {afile / 'deeper' / 'x.onnx'}: {afile} is a file, not a folder",
        str(fifo): f"--out {fifo} is not a regular file (a device, FIFO or socket)",
    }
    for out, words in cases.items():
        assert cli.main(["export", str(trained_run), "--format", "onnx", "--out", out, "--force"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {words}") and err.count("\n") == 1, err
    assert afile.read_text() == "keep me" and fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "pipe.onnx"]
