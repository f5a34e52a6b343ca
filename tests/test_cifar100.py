"""CIFAR-100: download from a real local HTTP server, a local copy, fine/coarse labels, and a hostile archive.

The archives are built here in the real format (cifar-100-python/{train,test,meta}, Python 2 protocol-2 pickles
of dicts with bytes keys) from real CIFAR-10 images, with labels spread over 100 fine and 20 coarse classes.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from cifar10_cnn import cifar100 as C
from cifar10_cnn.errors import DataError

FINE = tuple(f"fine_{i:02d}" for i in range(100))
COARSE = tuple(f"coarse_{i:02d}" for i in range(20))


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it (the original files): bytes as raw BINSTRING, not latin-1 text."""

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch: ClassVar[dict] = {**pickle._Pickler.dispatch, bytes: save_bytes}


def py2_pickle(obj) -> bytes:
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def split_bytes(images: np.ndarray, fine: np.ndarray, name: str) -> bytes:
    return py2_pickle(
        {
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
            b"batch_label": name.encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072).copy(),
        }
    )


def add_bytes(
    tar: tarfile.TarFile, name: str, payload: bytes, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.type, info.linkname = len(payload), 0, kind, link
    tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


def fine_labels(cifar10_labels: np.ndarray) -> np.ndarray:
    """100 fine classes from the real labels: class c's images spread over fine classes 10c..10c+9."""
    return cifar10_labels * 10 + np.arange(len(cifar10_labels)) % 10


def write_archive(path: Path, cifar, n_train: int = 600, n_test: int = 200, extra=()) -> Path:
    x, y = cifar.train_images[:n_train], fine_labels(cifar.train_labels[:n_train])
    tx, ty = cifar.test_images[:n_test], fine_labels(cifar.test_labels[:n_test])
    meta = {
        b"fine_label_names": [n.encode() for n in FINE],
        b"coarse_label_names": [n.encode() for n in COARSE],
    }
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        add_bytes(tar, "cifar-100-python", b"", tarfile.DIRTYPE)
        add_bytes(tar, "cifar-100-python/file.txt~", b"notes\n")
        add_bytes(tar, "cifar-100-python/train", split_bytes(x, y, "training batch 1 of 1"))
        add_bytes(tar, "cifar-100-python/test", split_bytes(tx, ty, "testing batch 1 of 1"))
        add_bytes(tar, "cifar-100-python/meta", py2_pickle(meta))
        for args in extra:
            add_bytes(tar, *args)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def archive(cifar, tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("c100") / C.ARCHIVE, cifar)


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_from_a_local_server_gives_the_archive_arrays_and_classes(server, archive, cifar, tmp_path):
    www, url = server
    (www / C.ARCHIVE).write_bytes(archive.read_bytes())
    root = tmp_path / "data"
    data = C.load_cifar100(root, url=f"{url}/{C.ARCHIVE}", md5=md5(archive), progress=False)
    assert data.verified and data.classes == FINE and len(data.classes) == 100
    assert np.array_equal(data.train_images, cifar.train_images[:600])
    assert np.array_equal(data.test_labels, fine_labels(cifar.test_labels[:200]))
    assert sorted(p.name for p in root.iterdir()) == [C.ARCHIVE]  # the archive, kept; nothing else written
    # The second load reads that local copy (no server needed), and coarse labels give the 20 superclasses.
    coarse = C.load_cifar100(root, labels="coarse", url="http://127.0.0.1:9/gone", md5=md5(archive))
    assert coarse.classes == COARSE and coarse.train_labels.max() <= 19
    assert np.array_equal(coarse.train_labels, data.train_labels // 5)
    assert coarse.provenance()["labels"] == "coarse"


def test_a_download_failing_its_md5_keeps_nothing(server, archive, tmp_path):
    www, url = server
    (www / C.ARCHIVE).write_bytes(archive.read_bytes())
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"the download of the CIFAR-100 archive .* failed its md5 check"):
        C.load_cifar100(root, url=f"{url}/{C.ARCHIVE}", progress=False)  # the official md5: this is not it
    assert not root.exists() or list(root.iterdir()) == []


def test_a_failed_download_names_cifar100_in_one_line_and_keeps_nothing(endless_server, tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        C.load_cifar100(root, url=f"{endless_server}/x.tar.gz", size=2**20, cache_dir="off", progress=False)
    assert str(err.value) == (
        f"{endless_server}/x.tar.gz sent more than 1,048,576 bytes, more than the CIFAR-100 python archive is; "
        "cut off, nothing was kept"
    )
    assert not root.exists() or list(root.iterdir()) == []
    with pytest.raises(DataError) as err:
        C.load_cifar100(root, url="http://127.0.0.1:9/none.tar.gz", cache_dir="off", progress=False)
    line = str(err.value)
    assert line.startswith("cannot download the CIFAR-100 archive http://127.0.0.1:9/none.tar.gz (")
    assert f"put {C.ARCHIVE} in {root}" in line and "\n" not in line and "CIFAR-10 " not in line


def test_a_local_copy_that_is_not_the_official_archive_needs_allow_unverified(archive, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / C.ARCHIVE).write_bytes(archive.read_bytes())
    with pytest.raises(DataError, match="allow-unverified"):
        C.load_cifar100(root, download=False)
    data = C.load_cifar100(root, download=False, allow_unverified=True)
    assert not data.verified and len(data.train_images) == 600


def test_an_extracted_folder_is_a_local_copy(archive, tmp_path):
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")  # our own archive: trusted here
    data = C.load_cifar100(tmp_path, download=False, allow_unverified=True)
    assert data.classes == FINE and data.source.startswith("folder:")


def test_pickles_cannot_run_code(cifar, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    root = tmp_path / "data"
    root.mkdir()
    write_archive(root / C.ARCHIVE, cifar, 10, 10, extra=[])
    # replace meta by a pickle that would run a command when loaded
    folder = tmp_path / "x" / C.FOLDER
    folder.mkdir(parents=True)
    with tarfile.open(root / C.ARCHIVE) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        C.load_cifar100(tmp_path / "x", download=False, allow_unverified=True)
    assert not (tmp_path / "pwned").exists()


HOSTILE = {
    "path outside": (("cifar-100-python/../../evil", b"x"), "outside its folder"),
    "absolute path": (("/tmp/evil", b"x"), "outside its folder"),
    "unknown member": (("cifar-100-python/extra", b"x"), "not part of the CIFAR-100 archive"),
    "symlink": (("cifar-100-python/file.txt~", b"", tarfile.SYMTYPE, "/etc/passwd"), "a symbolic link"),
    "hard link": (
        ("cifar-100-python/file.txt~", b"", tarfile.LNKTYPE, "cifar-100-python/meta"),
        "a hard link",
    ),
    "device": (("cifar-100-python/file.txt~", b"", tarfile.CHRTYPE), "a device"),
    "duplicate": (("cifar-100-python/meta", b"x"), "appears twice"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_archive_is_refused_and_writes_nothing(cifar, tmp_path, case):
    member, message = HOSTILE[case]
    root = tmp_path / "data"
    root.mkdir()
    write_archive(root / C.ARCHIVE, cifar, 10, 10, extra=[member])
    with pytest.raises(DataError, match=f"{message}.*refusing it"):
        C.load_cifar100(root, download=False, allow_unverified=True)
    assert sorted(p.name for p in root.iterdir()) == [C.ARCHIVE]
    assert not (tmp_path / "evil").exists()


def test_a_member_larger_than_its_cap_is_refused_before_it_is_read(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    info = tarfile.TarInfo("cifar-100-python/meta")
    info.size = C.MEMBER_LIMITS["meta"] + 1
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    import gzip

    (root / C.ARCHIVE).write_bytes(gzip.compress(header + b"\0" * 1024))
    with pytest.raises(DataError, match="more than"):
        C.load_cifar100(root, download=False, allow_unverified=True)


def test_labels_outside_the_classes_are_one_clear_error(cifar, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    x = cifar.train_images[:10]
    bad = py2_pickle({b"data": x.transpose(0, 3, 1, 2).reshape(10, 3072).copy(), b"fine_labels": [100] * 10,
                      b"coarse_labels": [0] * 10})  # fmt: skip
    meta = {
        b"fine_label_names": [n.encode() for n in FINE],
        b"coarse_label_names": [n.encode() for n in COARSE],
    }
    with tarfile.open(root / C.ARCHIVE, "w:gz") as tar:
        add_bytes(tar, "cifar-100-python/train", bad)
        add_bytes(tar, "cifar-100-python/test", bad)
        add_bytes(tar, "cifar-100-python/meta", py2_pickle(meta))
    with pytest.raises(DataError, match=r"integers in 0\.\.99"):
        C.load_cifar100(root, download=False, allow_unverified=True)


def test_train_and_evaluate_cifar100_through_the_cli(archive, cache_dir, tmp_path):
    """100 classes from the data to the weights, the report (most frequent confusions) and predict. The first
    train is a real `python -m cifar10_cnn`; evaluate and the coarse run call its main() in this process."""
    from cifar10_cnn.weights import load_model

    from .conftest import in_process, run_cli

    root = tmp_path / "data"
    root.mkdir()
    (root / C.ARCHIVE).write_bytes(archive.read_bytes())
    run = tmp_path / "run"
    args = ("--dataset", "cifar100", "--data-dir", str(root), "--allow-unverified", "--epochs", "1")
    proc = run_cli("train", *args, "--model", "airbench_small", "--out", str(run), "--no-progress")
    assert "train 540 / val 60 / test 200" in proc.stdout
    _, meta = load_model(run / "model.safetensors")
    assert meta.classes == FINE
    report = (run / "report.md").read_text()
    assert "The 20 most frequent confusions" in report and "| fine_99 |" in report
    results = json.loads((run / "results.json").read_text())
    assert len(results["confusion_matrix"]) == 100 and results["data"]["labels"] == "fine"
    done = in_process("evaluate", str(run), "--allow-unverified", "--no-progress")  # the data the run found
    assert done.returncode == 0, done.stderr
    coarse = in_process("train", *args, "--labels", "coarse", "--subset", "100", "--out", str(tmp_path / "c"))
    assert coarse.returncode == 0, coarse.stderr
    _, meta = load_model(tmp_path / "c" / "model.safetensors")
    assert meta.classes == COARSE
    assert "Confusion matrix, counts" in (tmp_path / "c" / "report.md").read_text()  # 20 classes: the matrix


def test_the_second_load_comes_from_the_verified_cache_and_a_changed_archive_is_read_again(
    archive, cifar, tmp_path
):
    root = tmp_path / "data"
    root.mkdir()
    (root / C.ARCHIVE).write_bytes(archive.read_bytes())
    cache = tmp_path / "cache"
    first = C.load_cifar100(root, download=False, allow_unverified=True, cache_dir=cache)
    second = C.load_cifar100(root, download=False, allow_unverified=True, cache_dir=cache)
    assert not first.cached and second.cached and second.classes == FINE
    assert second.sha256 == first.sha256 and np.array_equal(second.train_images, first.train_images)
    coarse = C.load_cifar100(root, labels="coarse", download=False, allow_unverified=True, cache_dir=cache)
    assert not coarse.cached and coarse.classes == COARSE  # the other labels are another entry
    (npy,) = [
        p for p in cache.glob("cifar100/*/train_labels.npy") if C._read_cache(p.parent).labels == "fine"
    ]
    raw = bytearray(npy.read_bytes())
    raw[-8] ^= 1  # a label changed in the cache: not used, the archive is read again
    npy.write_bytes(bytes(raw))
    again = C.load_cifar100(root, download=False, allow_unverified=True, cache_dir=cache)
    assert not again.cached and np.array_equal(again.train_labels, first.train_labels)
    write_archive(root / C.ARCHIVE, cifar, 300, 100)  # the archive replaced: read again
    changed = C.load_cifar100(root, download=False, allow_unverified=True, cache_dir=cache)
    assert not changed.cached and len(changed.train_images) == 300


@pytest.mark.parametrize("name", ["seed_cnn", "airbench_small", "resnet18"])
def test_logits_of_no_images_have_the_models_number_of_classes(name):
    import torch

    from cifar10_cnn.inference import predict_logits
    from cifar10_cnn.models import create_model

    model = create_model(name, num_classes=100)
    assert predict_logits(model, torch.zeros(0, 3, 32, 32, dtype=torch.uint8)).shape == (0, 100)
    assert predict_logits(model, torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 100)
