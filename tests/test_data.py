"""Data sources, verification, caching, splits and batch augmentation, on the real CIFAR-10."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from cifar10_cnn import augment
from cifar10_cnn import data as D
from cifar10_cnn.errors import DataError

from .conftest import error_line, loaded_by, run_cli, snapshot

# --- archives in the real format, built by the tests ---------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it (the original batches): bytes as raw BINSTRING, not latin-1 text."""

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


def batch_bytes(images: np.ndarray, labels, name: str) -> bytes:
    """One batch as the original files hold it: a Python 2 protocol-2 pickle of a dict with bytes keys."""
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072).copy(),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    return py2_pickle(batch)


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def write_archive(path: Path, train_images, train_labels, test_images, test_labels) -> Path:
    """A cifar-10-python.tar.gz with the original member names and layout."""
    chunks = np.array_split(np.arange(len(train_images)), 5)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for i, idx in enumerate(chunks, 1):
            add_bytes(
                tar,
                f"{D.BATCHES_DIR}/data_batch_{i}",
                batch_bytes(train_images[idx], train_labels[idx], f"b{i}"),
            )
        add_bytes(tar, f"{D.BATCHES_DIR}/test_batch", batch_bytes(test_images, test_labels, "test"))
        meta = {b"label_names": [c.encode() for c in D.CLASSES], b"num_cases_per_batch": len(chunks[0])}
        add_bytes(tar, f"{D.BATCHES_DIR}/batches.meta", py2_pickle(meta))
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def full_archive(cifar, tmp_path_factory) -> Path:
    """The whole real dataset repacked in the official archive format."""
    path = tmp_path_factory.mktemp("served") / D.ARCHIVE
    return write_archive(path, cifar.train_images, cifar.train_labels, cifar.test_images, cifar.test_labels)


@pytest.fixture(scope="session")
def small_archive(cifar, tmp_path_factory) -> Path:
    """A real-format archive of a real subset (1,000 train, 200 test): unverified by design."""
    path = tmp_path_factory.mktemp("small") / D.ARCHIVE
    return write_archive(
        path,
        cifar.train_images[:1000],
        cifar.train_labels[:1000],
        cifar.test_images[:200],
        cifar.test_labels[:200],
    )


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files, and /truncated/<name>: the right Content-Length but only half the bytes."""

    def do_GET(self):
        if self.path.startswith("/truncated/"):
            payload = (Path(self.directory) / self.path.split("/")[-1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- sources -----------------------------------------------------------------------------------------------


def test_shared_npz_is_verified_real_cifar10(cifar):
    assert cifar.verified and cifar.source.startswith("npz:")
    assert cifar.train_images.shape == (50000, 32, 32, 3) and cifar.train_images.dtype == np.uint8
    assert cifar.test_images.shape == (10000, 32, 32, 3) and cifar.test_labels.dtype == np.int64
    assert np.bincount(cifar.train_labels).tolist() == [5000] * 10
    # True statistics, not the widely copied wrong std.
    x = cifar.train_images[:10000].reshape(-1, 3) / 255.0
    assert np.allclose(x.std(0), D.STD, atol=0.01)
    assert not np.allclose(D.STD, (0.2023, 0.1994, 0.2010), atol=0.01)


def test_cache_makes_the_second_load_fast_and_identical(data_dir, tmp_path):
    t0 = time.perf_counter()
    first = D.load_cifar10(data_dir, cache_dir=tmp_path, progress=False)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = D.load_cifar10(data_dir, cache_dir=tmp_path, progress=False)
    warm = time.perf_counter() - t0
    assert len(list(tmp_path.glob("*/meta.json"))) == 1
    assert second.verified and second.sha256 == first.sha256
    assert np.array_equal(first.test_images, second.test_images)
    assert warm < cold
    # "verified" means verified: a cached array changed behind our back is found (re-hashed) and rebuilt.
    entry = cache_entry(tmp_path)
    np.save(entry / "train_labels.npy", (first.train_labels + 1) % 10)
    third = D.load_cifar10(data_dir, cache_dir=tmp_path, progress=False)
    assert third.verified and np.array_equal(third.train_labels, first.train_labels)
    assert np.array_equal(np.load(entry / "train_labels.npy"), first.train_labels)
    assert third.provenance() == {
        "source": f"npz:{data_dir / 'train.npz'}",
        "verified": True,
        "sha256": D.SHA256,
    }


def test_download_from_local_server_extracts_and_verifies(server, full_archive, tmp_path):
    www, url = server
    os.link(full_archive, www / D.ARCHIVE)
    root = tmp_path / "data"
    data = D.load_cifar10(
        root, url=f"{url}/{D.ARCHIVE}", md5=md5(full_archive), cache_dir="off", progress=False
    )
    assert data.verified and data.source.startswith("archive:")
    assert (root / D.ARCHIVE).is_file() and (root / D.BATCHES_DIR / "data_batch_5").is_file()
    assert not [n for n in leftovers(root) if n.startswith(".")]  # no temporary files left
    # The extracted folder is a source of its own now.
    again = D.load_cifar10(root, download=False, cache_dir="off", progress=False)
    assert again.source.startswith("batches:") and again.verified


def test_wrong_checksum_keeps_nothing(server, small_archive, tmp_path):
    www, url = server
    os.link(small_archive, www / D.ARCHIVE)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="md5"):
        D.load_cifar10(root, url=f"{url}/{D.ARCHIVE}", md5="0" * 32, cache_dir="off", progress=False)
    assert leftovers(root) == []


def test_truncated_download_keeps_nothing(server, small_archive, tmp_path):
    www, url = server
    os.link(small_archive, www / D.ARCHIVE)
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        D.load_cifar10(
            root, url=f"{url}/truncated/{D.ARCHIVE}", md5=md5(small_archive), cache_dir="off", progress=False
        )
    assert "\n" not in str(err.value)
    assert leftovers(root) == []


def test_no_network_and_no_data_is_one_clear_line(tmp_path):
    with pytest.raises(
        DataError, match=r"cannot download the CIFAR-10 archive http://127\.0\.0\.1:9/"
    ) as err:
        D.load_cifar10(
            tmp_path / "empty", url="http://127.0.0.1:9/none.tar.gz", cache_dir="off", progress=False
        )
    assert "--data-dir" in str(err.value) and "\n" not in str(err.value)


def test_local_archive_subset_loads_only_when_unverified_is_allowed(small_archive, tmp_path, cifar):
    root = tmp_path / "data"
    root.mkdir()
    os.link(small_archive, root / D.ARCHIVE)
    with pytest.raises(DataError, match="not the real CIFAR-10"):
        D.load_cifar10(root, cache_dir="off", progress=False)
    data = D.load_cifar10(root, allow_unverified=True, cache_dir="off", progress=False)
    assert not data.verified
    assert leftovers(root) == [D.ARCHIVE]  # an unverified extraction is not kept: it would shadow the archive
    assert np.array_equal(data.train_images, cifar.train_images[:1000])
    assert np.array_equal(data.test_labels, cifar.test_labels[:200])


def test_corrupt_archive_is_refused(tmp_path, small_archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / D.ARCHIVE).write_bytes(small_archive.read_bytes()[:5000])  # cut short
    with pytest.raises(DataError, match="not a readable CIFAR-10 archive"):
        D.load_cifar10(root, cache_dir="off", progress=False)
    (root / D.ARCHIVE).write_bytes(b"this is not gzip at all" * 100)
    with pytest.raises(DataError, match="not a readable CIFAR-10 archive"):
        D.load_cifar10(root, cache_dir="off", progress=False)
    assert leftovers(root) == [D.ARCHIVE]


def tiny_batch(n: int = 2) -> bytes:
    return batch_bytes(np.zeros((n, 32, 32, 3), np.uint8), [0] * n, "tiny")


def add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    tar.addfile(info)


HOSTILE_MEMBERS = {
    # name: (how the archive is built after a valid first batch, the expected message)
    "parent": (
        lambda t: add_bytes(t, "../escape.txt", b"evil"),
        "would be written outside the target folder",
    ),
    "absolute": (
        lambda t: add_bytes(t, "/tmp/abs-escape.txt", b"e"),
        "would be written outside the target folder",
    ),
    "dotdot": (lambda t: add_bytes(t, f"{D.BATCHES_DIR}/../../up.txt", b"e"), "would be written outside"),
    "symlink": (
        lambda t: add_special(t, f"{D.BATCHES_DIR}/data_batch_2", tarfile.SYMTYPE, "/etc/passwd"),
        r"is a symbolic link \(to '/etc/passwd'\); the CIFAR-10 archive holds only regular files",
    ),
    "hardlink": (
        lambda t: add_special(t, f"{D.BATCHES_DIR}/data_batch_2", tarfile.LNKTYPE, "/etc/passwd"),
        r"is a hard link \(to '/etc/passwd'\)",
    ),
    "device": (lambda t: add_special(t, f"{D.BATCHES_DIR}/test_batch", tarfile.CHRTYPE), "is a device"),
    "fifo": (lambda t: add_special(t, f"{D.BATCHES_DIR}/test_batch", tarfile.FIFOTYPE), "is a FIFO"),
    "folder": (lambda t: add_special(t, f"{D.BATCHES_DIR}/sub", tarfile.DIRTYPE), "is a folder"),
    "unknown": (
        lambda t: add_bytes(t, f"{D.BATCHES_DIR}/notes.txt", b"hi"),
        "'cifar-10-batches-py/notes.txt' of .* is not part of the CIFAR-10 archive",
    ),
    "elsewhere": (
        lambda t: add_bytes(t, "data_batch_2", tiny_batch()),
        "is not part of the CIFAR-10 archive",
    ),
    "duplicate": (lambda t: add_bytes(t, f"{D.BATCHES_DIR}/data_batch_1", tiny_batch()), "appears twice"),
    "incomplete": (
        lambda t: None,
        "lacks data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch",
    ),
    "bad label": (
        lambda t: add_bytes(
            t, f"{D.BATCHES_DIR}/test_batch", batch_bytes(np.zeros((1, 32, 32, 3), np.uint8), [2**70], "x")
        ),
        "test_batch: its labels must be 1 integers in 0..9",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_MEMBERS))
def test_archive_holds_only_the_known_members_as_regular_files(tmp_path, case):
    build, message = HOSTILE_MEMBERS[case]
    root = tmp_path / "deep" / "data"
    root.mkdir(parents=True)
    with tarfile.open(root / D.ARCHIVE, "w:gz") as tar:
        add_bytes(tar, f"{D.BATCHES_DIR}/data_batch_1", tiny_batch())
        build(tar)
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        D.load_cifar10(root, cache_dir="off", progress=False)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before  # nothing extracted, staged or left behind, here or above
    assert not Path("/tmp/abs-escape.txt").exists()


def test_archive_written_with_a_leading_dot_slash_loads(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / D.ARCHIVE, "w:gz") as tar:
        add_special(tar, ".", tarfile.DIRTYPE)
        add_special(tar, f"./{D.BATCHES_DIR}", tarfile.DIRTYPE)
        for name in (*D.TRAIN_BATCHES, D.TEST_BATCH):
            add_bytes(tar, f"./{D.BATCHES_DIR}/{name}", tiny_batch())
    data = D.load_cifar10(root, allow_unverified=True, cache_dir="off", progress=False)
    assert len(data.train_images) == 10 and len(data.test_images) == 2
    assert leftovers(root) == [D.ARCHIVE]


def raw_tar_gz(path: Path, *headers_and_data: bytes) -> Path:
    path.write_bytes(gzip.compress(b"".join(headers_and_data), compresslevel=1))
    return path


def test_member_larger_than_the_real_file_is_refused_before_its_data_is_read(tmp_path):
    # The header of a 2 GiB data_batch_1 followed by a few bytes only: refused from the header alone.
    root = tmp_path / "data"
    root.mkdir()
    info = tarfile.TarInfo(f"{D.BATCHES_DIR}/data_batch_1")
    info.size = 2**31
    raw_tar_gz(root / D.ARCHIVE, info.tobuf(format=tarfile.GNU_FORMAT), b"\0" * 4096)
    with pytest.raises(DataError, match="is 2,147,483,648 bytes, more than the 31,035,704 of the real file"):
        D.load_cifar10(root, cache_dir="off", progress=False)
    assert leftovers(root) == [D.ARCHIVE]


def test_archive_unpacking_beyond_the_real_size_is_refused(tmp_path):
    # A GNU long-name header of 200 MB (tarfile would hold it in memory): the unpacked-size cap stops it.
    root = tmp_path / "data"
    root.mkdir()
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 200 * 2**20
    with gzip.open(root / D.ARCHIVE, "wb", compresslevel=1) as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        for _ in range(200):
            f.write(bytes(2**20))
    with pytest.raises(DataError, match="unpacks to more than 187,262,690 bytes"):
        D.load_cifar10(root, cache_dir="off", progress=False)
    assert leftovers(root) == [D.ARCHIVE]


def test_batch_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    folder = tmp_path / D.BATCHES_DIR
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        D.read_batch(folder / "data_batch_1")
    assert not (tmp_path / "pwned").exists()


def test_modified_npz_fails_verification(tmp_path, cifar):
    root = tmp_path / "data"
    root.mkdir()
    train = cifar.train_images.copy()
    train[0, 0, 0, 0] ^= 1  # one bit
    np.savez(root / "train.npz", images=train, labels=cifar.train_labels)
    np.savez(root / "test.npz", images=cifar.test_images, labels=cifar.test_labels)
    with pytest.raises(DataError, match="train_images differ"):
        D.load_cifar10(root, cache_dir=tmp_path / "c", progress=False)
    # Cached as unverified, and still refused from the cache.
    with pytest.raises(DataError, match="train_images differ"):
        D.load_cifar10(root, cache_dir=tmp_path / "c", progress=False)
    assert not D.load_cifar10(root, cache_dir=tmp_path / "c", allow_unverified=True, progress=False).verified


def test_npz_of_wrong_shape_is_one_clear_error(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    np.savez(root / "train.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    np.savez(root / "test.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"is uint8 \(4, 28, 28\), expected uint8 \(N, 32, 32, 3\)"):
        D.load_cifar10(root, cache_dir="off", progress=False)


# --- every bad source is one line, found before memory is spent on it --------------------------------------


@pytest.fixture(scope="session")
def small_npz(cifar, tmp_path_factory) -> Path:
    """A real subset as a compressed npz pair (1,000 train, 200 test)."""
    root = tmp_path_factory.mktemp("small-npz")
    np.savez_compressed(
        root / "train.npz", images=cifar.train_images[:1000], labels=cifar.train_labels[:1000]
    )
    np.savez_compressed(root / "test.npz", images=cifar.test_images[:200], labels=cifar.test_labels[:200])
    return root


def npy_header(shape: tuple, dtype: str = "|u1") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue()


def zip_of(path: Path, **members: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, payload in members.items():
            z.writestr(f"{name}.npy", payload)


def npy_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


def flip_bit(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


LABELS = npy_bytes(np.zeros(4, np.int64))
BAD_NPZ = {
    # case: (what is done to root/train.npz, the expected message)
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        r"train.npz is not a readable .npz file \(File is not a zip file\); it should hold",
    ),
    "one bit flipped": (
        lambda p: flip_bit(p, p.stat().st_size // 2),
        "train.npz is not a readable .npz file",
    ),
    "one bit flipped, stored": (
        lambda p: (
            np.savez(p, images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4)) or flip_bit(p, 300)
        ),
        r"Bad CRC-32",
    ),
    "a renamed .npy": (
        lambda p: p.write_bytes(npy_bytes(np.zeros((4, 32, 32, 3), np.uint8))),
        "is a single .npy array, not an .npz archive",
    ),
    "a huge shape": (
        lambda p: zip_of(p, images=npy_header((10**12, 32, 32, 3)), labels=LABELS),
        "train.npz:images holds 1,000,000,000,000 rows; CIFAR-10 has at most 50,000",
    ),
    "data shorter than its header": (
        lambda p: zip_of(p, images=npy_header((50000, 32, 32, 3)) + bytes(100), labels=LABELS),
        r"train.npz:images is truncated \(100 of 153,600,000 data bytes\)",
    ),
    "floats": (
        lambda p: np.savez(p, images=np.zeros((4, 32, 32, 3), np.float32), labels=np.zeros(4, np.int64)),
        r"train.npz:images is float32 \(4, 32, 32, 3\), expected uint8 \(N, 32, 32, 3\)",
    ),
    "float labels": (
        lambda p: np.savez(p, images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4)),
        r"train.npz:labels is float64 \(4,\), expected integer \(N\)",
    ),
    "no labels": (
        lambda p: np.savez(p, images=np.zeros((4, 32, 32, 3), np.uint8)),
        "lacks an array 'images' or 'labels'",
    ),
    "labels out of range": (
        lambda p: np.savez(p, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([0, 2**40])),
        r"train labels outside 0..9",
    ),
    "empty": (
        lambda p: np.savez(p, images=np.zeros((0, 32, 32, 3), np.uint8), labels=np.zeros(0, np.int64)),
        "the train set holds 0 images; it needs 1 to 50,000",
    ),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_one_line_and_changes_nothing(small_npz, tmp_path, case):
    spoil, message = BAD_NPZ[case]
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(small_npz / "train.npz", root / "train.npz")
    os.link(small_npz / "test.npz", root / "test.npz")
    spoil(root / "train.npz")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        D.load_cifar10(root, allow_unverified=True, cache_dir=tmp_path / "cache", progress=False)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before  # not even a cache entry


def test_empty_test_set_is_refused_at_load(small_npz, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    os.link(small_npz / "train.npz", root / "train.npz")
    np.savez(root / "test.npz", images=np.zeros((0, 32, 32, 3), np.uint8), labels=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="the test set holds 0 images; it needs 1 to 10,000"):
        D.load_cifar10(root, allow_unverified=True, cache_dir="off", progress=False)


BAD_BATCHES = {
    "a FIFO": (lambda p: os.mkfifo(p), r"data_batch_3 is not a regular file \(a FIFO\)"),
    "too large": (
        lambda p: os.truncate(p.touch() or p, D.MAX_BATCH_FILE + 1),
        "data_batch_3 is larger than 67,108,864 bytes",
    ),
    "a label of 2**70": (
        lambda p: p.write_bytes(batch_bytes(np.zeros((2, 32, 32, 3), np.uint8), [1, 2**70], "x")),
        "data_batch_3: its labels must be 2 integers in 0..9",
    ),
    "float labels": (
        lambda p: p.write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 0.5]})),
        "its labels must be 2 integers",
    ),
    "more than a batch": (
        lambda p: p.write_bytes(
            py2_pickle({b"data": np.zeros((10001, 3072), np.uint8), b"labels": [0] * 10001})
        ),
        r"holds data of uint8 \(10001, 3072\), expected uint8 \(N, 3072\) with N at most 10,000",
    ),
    "not a dict": (lambda p: p.write_bytes(py2_pickle([1, 2])), "is not a CIFAR-10 batch file"),
    "huge bytes length": (
        lambda p: p.write_bytes(b"\x80\x02" + pickle.BINBYTES8 + struct.pack("<Q", 2**62) + b"x"),
        "is not a CIFAR-10 batch file",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batch_file_is_one_line(tmp_path, case):
    spoil, message = BAD_BATCHES[case]
    folder = tmp_path / "data" / D.BATCHES_DIR
    folder.mkdir(parents=True)
    for name in (*D.TRAIN_BATCHES, D.TEST_BATCH):
        (folder / name).write_bytes(tiny_batch())
    (folder / "data_batch_3").unlink()
    spoil(folder / "data_batch_3")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        D.load_cifar10(folder.parent, allow_unverified=True, cache_dir="off", progress=False)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["truncated", "empty"], ids=["truncated npz", "empty train set"])
def test_bad_data_through_the_cli_is_one_line_exit_2(small_npz, tmp_path, case):
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(small_npz / "train.npz", root / "train.npz")
    os.link(small_npz / "test.npz", root / "test.npz")
    spoil, message = BAD_NPZ[case]
    spoil(root / "train.npz")
    before = snapshot(root)
    proc = run_cli(
        "train", "--data-dir", str(root), "--allow-unverified", "--subset", "100", "--val-size", "10",
        "--epochs", "1", "--out", str(tmp_path / "run"), check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert re.search(message, error_line(proc))
    assert snapshot(root) == before


def cache_entry(cache: Path) -> Path:
    (meta,) = cache.glob("*/meta.json")
    return meta.parent


def npy_hashes(entry: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(entry.glob("*.npy"))}


def shifted_labels(p: Path) -> None:
    np.save(p.with_name("train_labels.npy"), (np.load(p.with_name("train_labels.npy")) + 1) % 10)


BAD_CACHE = {
    # case: what is done to the cache entry (given its meta.json)
    "labels shifted": shifted_labels,
    "labels of another shape": lambda p: np.save(p.with_name("test_labels.npy"), np.zeros(5, np.int64)),
    "images as floats": lambda p: np.save(
        p.with_name("test_images.npy"), np.zeros((200, 32, 32, 3), np.float32)
    ),
    "a huge header": lambda p: p.with_name("train_images.npy").write_bytes(npy_header((10**12, 32, 32, 3))),
    "truncated": lambda p: os.truncate(p.with_name("test_images.npy"), 1000),
    "a FIFO": lambda p: (p.with_name("test_labels.npy").unlink(), os.mkfifo(p.with_name("test_labels.npy"))),
    "meta a list": lambda p: p.write_text("[]"),
    "meta not JSON": lambda p: p.write_text("{"),
    "meta of another source": lambda p: p.write_text(p.read_text().replace("npz:", "batches:")),
    "meta sha256 a string": lambda p: p.write_text('{"source": "x", "sha256": "abc"}'),
    "meta huge": lambda p: p.write_bytes(b" " * (D.MAX_META_JSON + 1)),
}


@pytest.mark.parametrize("case", list(BAD_CACHE))
def test_a_changed_cache_is_rebuilt_from_the_source(small_npz, tmp_path, case):
    cache = tmp_path / "cache"
    first = D.load_cifar10(small_npz, allow_unverified=True, cache_dir=cache, progress=False)
    entry = cache_entry(cache)
    written = npy_hashes(entry)
    BAD_CACHE[case](entry / "meta.json")
    again = D.load_cifar10(small_npz, allow_unverified=True, cache_dir=cache, progress=False)
    for name in D.ARRAY_NAMES:
        assert np.array_equal(getattr(again, name), getattr(first, name)), name
    assert again.sha256 == first.sha256 and not again.verified
    assert npy_hashes(entry) == written  # rebuilt from the source, byte for byte
    assert leftovers(cache) == [entry.name] and not [n for n in leftovers(entry) if n.startswith(".")]


# --- read-only and full disks: real mounts, in a private mount namespace that vanishes with the process ----


def in_private_mounts(shell: str) -> subprocess.CompletedProcess:
    """Run shell as root in a new mount namespace, so its mounts need no cleanup (skip where not allowed)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount a read-only or tiny filesystem")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("mount namespaces are not allowed here")
    return subprocess.run(["unshare", "-m", "sh", "-ec", shell], capture_output=True, text=True, timeout=120)


LOAD = """
import os, sys
from cifar10_cnn import data as D
from cifar10_cnn.errors import DataError
for root, cache, url in zip(*[iter(sys.argv[1:])] * 3):
    try:
        data = D.load_cifar10(root, allow_unverified=True, cache_dir=cache, url=url, progress=False)
        print(root, "loaded", len(data.train_images), len(data.test_images), data.sha256["train_images"])
    except DataError as e:
        print(root, "error:", e)
    print(root, "left:", sorted(os.listdir(root)))
"""


def test_read_only_and_full_disks(server, small_archive, tmp_path):
    """One process (imports are slow), three real mounts: a read-only data folder holding the archive, a
    folder with room for the archive but not for its 3.7 MB unpacked, and one too small for the download."""
    www, url = server
    os.link(small_archive, www / D.ARCHIVE)
    ro, full, tiny = (tmp_path / name for name in ("ro", "full", "tiny"))
    for root in (ro, full, tiny):
        root.mkdir()
    shutil.copy(small_archive, ro / D.ARCHIVE)
    before = snapshot(ro)
    room = small_archive.stat().st_size + 256 * 1024
    proc = in_private_mounts(
        f"mount --bind {ro} {ro}; mount -o remount,bind,ro {ro}; ! touch {ro}/probe 2>/dev/null; "
        f"mount -t tmpfs -o size={room} tmpfs {full}; cp {small_archive} {full}/; "
        f"mount -t tmpfs -o size=1m tmpfs {tiny}; "
        f"{sys.executable} -c '{LOAD}' {ro} {tmp_path / 'cache'} none {full} off none "
        f"{tiny} off {url}/{D.ARCHIVE}"
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # Read-only: read in memory, nothing written there, the cache (elsewhere) written.
    sha = D.content_sha256(D.extract_archive(small_archive, tmp_path))["train_images"]
    assert f"{ro} loaded 1000 200 {sha}" in out, out
    assert snapshot(ro) == before and len(list((tmp_path / "cache").glob("*/meta.json"))) == 1
    # Full during extraction: loads all the same, nothing staged is left.
    assert f"{full} loaded 1000 200 {sha}" in out and f"{full} left: ['{D.ARCHIVE}']" in out, out
    # Full during the download: one line that says so (not the network), the partial download gone.
    assert re.search(
        rf"{tiny} error: cannot download the CIFAR-10 archive into {tiny} \(\[Errno 28\] No space left on device"
        r".*\); it needs 163 MB there: free some space or pass --data-dir",
        out,
    ), out
    assert f"{tiny} left: []" in out


# --- splits --------------------------------------------------------------------------------------------------


def test_stratified_split_is_balanced_disjoint_and_seeded(cifar):
    labels = cifar.train_labels
    train, val = D.stratified_split(labels, 5000, seed=0)
    assert len(val) == 5000 and len(train) == 45000
    assert np.intersect1d(train, val).size == 0
    assert np.bincount(labels[val]).tolist() == [500] * 10
    assert np.array_equal(val, D.stratified_split(labels, 5000, seed=0)[1])
    assert not np.array_equal(val, D.stratified_split(labels, 5000, seed=1)[1])
    # Uneven sizes still add up exactly, classes in proportion.
    _, odd = D.stratified_split(labels[:1003], 101, seed=3)
    assert len(odd) == 101 and np.abs(np.bincount(labels[odd], minlength=10) - 10.1).max() <= 2
    assert len(D.stratified_split(labels, 0, seed=0)[1]) == 0
    with pytest.raises(DataError):
        D.stratified_split(labels[:100], 100, seed=0)


def test_make_splits_keeps_test_set_apart(cifar):
    splits = D.make_splits(cifar, val_size=200, split_seed=0, subset=2000)
    assert len(splits.train) == 1800 and len(splits.val) == 200 and len(splits.test) == 10000
    assert splits.train.images.shape == (1800, 3, 32, 32)
    assert splits.train.images.is_contiguous(memory_format=torch.channels_last)
    # Images are the real ones, in channel-first view.
    assert torch.equal(splits.test.images[0], torch.from_numpy(cifar.test_images[0]).permute(2, 0, 1))


# --- augmentation ------------------------------------------------------------------------------------------------


def test_random_crop_takes_windows_of_the_padded_image(cifar):
    x = torch.from_numpy(cifar.train_images[:64]).permute(0, 3, 1, 2)
    out = augment.random_crop(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        windows = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(padded[i, :, dy : dy + 32, dx : dx + 32], out[i])
        ]
        assert windows, f"image {i} is not a crop"
    assert not torch.equal(out, x)  # some offsets differ from the centre


def test_flip_mirrors_about_half_and_is_seeded(cifar):
    x = torch.from_numpy(cifar.train_images[:1000]).permute(0, 3, 1, 2)
    out = augment.random_flip(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x, strict=True)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert bool((flipped | same).all()) and 400 < int(flipped.sum()) < 600
    assert torch.equal(out, augment.random_flip(x, torch.Generator().manual_seed(1)))


def test_cutout_zeroes_one_square(cifar):
    x = torch.from_numpy(cifar.train_images[:16]).permute(0, 3, 1, 2).clone()
    x[x == 0] = 1  # so that zeros can only come from cutout
    out = augment.cutout(x, 8, torch.Generator().manual_seed(2))
    zeros = (out == 0).all(1)  # (B, H, W)
    assert torch.equal(out == 0, zeros[:, None].expand_as(out))  # every channel of a pixel, or none
    whole = 0
    for mask in zeros:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        top, bottom, left, right = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
        height, width = bottom - top + 1, right - left + 1
        assert int(mask.sum()) == height * width  # one filled rectangle: a single region, no holes
        inside = top > 0 and bottom < 31 and left > 0 and right < 31
        assert (height, width) == (8, 8) if inside else (height <= 8 and width <= 8)  # a square, clipped
        whole += inside
    assert whole > 0  # some squares lie wholly inside the image


def test_normalize_uses_true_statistics(cifar):
    x = torch.from_numpy(cifar.train_images[:5000]).permute(0, 3, 1, 2)
    z = augment.normalize(x)
    assert z.dtype == torch.float32
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=0.05)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(3), atol=0.05)


# --- the seam for new sources, and the constants without torch ----------------------------------------------


def test_load_dataset_by_name_by_folder_and_through_a_registered_source(small_npz, tmp_path):
    options = {"allow_unverified": True, "cache_dir": "off", "progress": False}
    by_name = D.load_dataset("cifar10", data_dir=small_npz, **options)
    by_folder = D.load_dataset(small_npz, **options)
    assert by_name.source == by_folder.source == f"npz:{small_npz / 'train.npz'}"
    assert np.array_equal(by_name.train_images, by_folder.train_images) and by_name.classes == D.CLASSES
    # A folder that no source holds goes to CIFAR-10, which says what is missing (no download asked).
    with pytest.raises(DataError, match="no CIFAR-10 found in"):
        D.load_dataset(tmp_path / "empty", download=False, **options)
    # A new kind of dataset: registered once, found by its folder and by its name.
    own = tmp_path / "own"
    own.mkdir()
    (own / "two.npy").write_bytes(npy_bytes(np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)))

    def load_two(data_dir, **_) -> D.Dataset:
        images = np.load(Path(data_dir) / "two.npy", allow_pickle=False)
        labels = np.array([0, 1])
        return D.Dataset(
            images, labels, images, labels, source=f"two:{data_dir}", verified=False, classes=("a", "b")
        )

    D.register_source(D.Source("two", load_two, lambda root: (root / "two.npy").is_file()))
    try:
        found = D.load_dataset(own, **options)
        assert found.source == f"two:{own}" and found.classes == ("a", "b") and len(found.train_images) == 2
        assert D.load_dataset("two", data_dir=own).source == f"two:{own}"
        assert D.load_dataset(small_npz, **options).source == by_name.source  # CIFAR-10 still comes first
    finally:
        D.SOURCES.pop("two")


def test_class_names_and_statistics_load_without_numpy_or_torch():
    code = (
        "from cifar10_cnn.constants import CLASSES, MEAN, STD\n"
        "assert len(CLASSES) == 10 and len(MEAN) == len(STD) == 3\n"
    )
    assert loaded_by(code, ("numpy", "torch")) == []


# --- the download is bounded by the archive's known size ----------------------------------------------------


def test_a_download_larger_than_the_archive_is_cut_off_and_nothing_kept(endless_server, tmp_path):
    assert D.ARCHIVE_SIZE == 170_498_071  # the real cifar-10-python.tar.gz
    root = tmp_path / "data"
    with pytest.raises(
        DataError, match=r"sent more than 1,048,576 bytes, more than the CIFAR-10 python archive is"
    ) as err:
        D.load_cifar10(root, url=f"{endless_server}/x.tar.gz", size=2**20, cache_dir="off", progress=False)
    assert "\n" not in str(err.value) and "nothing was kept" in str(err.value)
    assert leftovers(root) == []


def test_a_download_of_one_byte_more_than_the_size_is_refused_of_exactly_the_size_kept(
    server, small_archive, tmp_path
):
    www, url = server
    os.link(small_archive, www / D.ARCHIVE)
    size = small_archive.stat().st_size
    options = {"url": f"{url}/{D.ARCHIVE}", "md5": md5(small_archive), "cache_dir": "off", "progress": False}
    with pytest.raises(DataError, match=f"sent more than {size - 1:,} bytes"):
        D.load_cifar10(tmp_path / "short", size=size - 1, allow_unverified=True, **options)
    assert leftovers(tmp_path / "short") == []
    data = D.load_cifar10(tmp_path / "exact", size=size, allow_unverified=True, **options)
    assert len(data.train_images) == 1000 and leftovers(tmp_path / "exact") == [D.ARCHIVE]


# --- what a killed extraction leaves is cleaned on the next run, and only that -----------------------------

KILL_DURING_EXTRACTION = """
import os, signal, sys
from pathlib import Path
from cifar10_cnn import archive

def kill_after_two_members(frame, event, arg):  # a real SIGKILL, with two members staged
    if event == "return" and frame.f_code is archive._Stage.add.__code__ and len(frame.f_locals["self"].seen) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

sys.setprofile(kill_after_two_members)
archive.extract_archive(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def look_alike(root: Path, name: str, marker: str | None, extra: str | None = None) -> Path:
    """A folder named like a stage that is not a stale one of ours: a user's, or one still being written."""
    folder = root / name
    (folder / D.BATCHES_DIR).mkdir(parents=True)
    (folder / D.BATCHES_DIR / "data_batch_1").write_bytes(b"the user's")
    if marker is not None:
        (folder / ".cifar10-cnn-stage").write_text(marker)
    if extra:
        (folder / extra).write_text("the user's notes")
    return folder


def test_a_killed_extraction_is_cleaned_on_the_next_run_and_look_alikes_are_left(small_archive, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    os.link(small_archive, root / D.ARCHIVE)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_EXTRACTION, str(root / D.ARCHIVE), str(root)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    (killed,) = root.glob(".extract-*")
    assert sorted(p.name for p in (killed / D.BATCHES_DIR).iterdir()) == ["data_batch_1", "data_batch_2"]
    ours = (killed / ".cifar10-cnn-stage").read_text()
    host = ours.splitlines()[1]
    alive = f"cifar10-cnn extraction stage\n{host}\npid {os.getpid()}\n"  # this process: still extracting
    others = [
        look_alike(root, ".extract-u5er0wns", None),  # no marker: a user's folder named alike
        look_alike(root, ".extract-n0tes4me", ours, extra="notes.txt"),  # our marker, and a user's file
        look_alike(root, ".extract-running_", alive),  # a running extraction's
        look_alike(root, ".extract-otherhst", ours.replace(host, "host elsewhere")),  # another host's
        look_alike(root, ".extract-named-by-user", ours),  # not a name mkdtemp gives
    ]
    linked = tmp_path / "user-folder"
    shutil.copytree(killed, linked)
    (root / ".extract-l1nk2usr").symlink_to(linked)  # a link to a folder that looks like our stage
    before = {p.name: snapshot(p) for p in [*others, linked]}
    data = D.load_cifar10(root, allow_unverified=True, cache_dir="off", progress=False)
    assert len(data.train_images) == 1000
    assert not killed.exists()
    assert {p.name: snapshot(p) for p in [*others, linked]} == before
    assert leftovers(root) == sorted([D.ARCHIVE, ".extract-l1nk2usr", *(p.name for p in others)])


KILL_DURING_DOWNLOAD = """
import os, signal, sys
from pathlib import Path
from cifar10_cnn import download

def kill_after_two_writes(frame, event, arg):  # a real SIGKILL, with part of the archive written
    global writes
    if event == "return" and frame.f_code is download._CappedFile.write.__code__:
        writes = globals().get("writes", 0) + 1
        if writes == 2:
            os.kill(os.getpid(), signal.SIGKILL)

sys.setprofile(kill_after_two_writes)
download.fetch_archive(Path(sys.argv[1]), url=sys.argv[2], md5=sys.argv[3], progress=False)
"""


def test_a_killed_download_is_cleaned_on_the_next_run_and_look_alikes_are_left(
    server, small_archive, tmp_path
):
    www, url = server
    os.link(small_archive, www / D.ARCHIVE)
    root = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_DOWNLOAD, str(root), f"{url}/{D.ARCHIVE}", md5(small_archive)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    (killed,) = root.glob(".download-*")
    (partial,) = (p for p in killed.iterdir() if p.name.startswith("tmp"))
    assert 0 < partial.stat().st_size < small_archive.stat().st_size
    user = root / ".download-u5er0wns"  # a user's folder named alike: no marker
    user.mkdir()
    (user / "tmpabcdefgh").write_text("the user's")
    notes = root / ".download-n0tes4me"  # our marker, and a user's file beside it
    shutil.copytree(killed, notes)
    (notes / "notes.txt").write_text("the user's notes")
    before = {p.name: snapshot(p) for p in (user, notes)}
    data = D.load_cifar10(root, url=f"{url}/{D.ARCHIVE}", md5=md5(small_archive), allow_unverified=True,
                          cache_dir="off", progress=False)  # fmt: skip
    assert len(data.train_images) == 1000 and not killed.exists()
    assert {p.name: snapshot(p) for p in (user, notes)} == before
    assert leftovers(root) == sorted([D.ARCHIVE, user.name, notes.name])
