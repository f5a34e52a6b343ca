"""CIFAR-100: the official python archive (downloaded, or a local copy) -> the same arrays as CIFAR-10's.

The archive holds cifar-100-python/{train,test,meta}: pickled dicts (b'data' uint8 (N, 3072), b'fine_labels',
b'coarse_labels'; meta b'fine_label_names', b'coarse_label_names'). It is read member by member in memory
with the same guards as CIFAR-10's (data.py): only the known members, each within a size cap, no links,
devices or paths outside the folder, the decompressed total capped, and the pickles read by the restricted
unpickler that loads nothing but these dicts. The archive is verified by its md5 (the official one), so a
repacked or extracted copy is used only with --allow-unverified. Labels are the 100 fine classes, or with
labels="coarse" the 20 superclasses.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import archive as A
from . import download as DL
from . import readers as R
from .errors import DataError, first_line
from .runs import write_atomic
from .sources import CACHE_ENV, Dataset, resolve_data_dir

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
# Caps above the real members' sizes (train 155 MB, test 31 MB, meta 1.5 kB); nothing else is read.
MEMBER_LIMITS = {"train": 160 * 2**20, "test": 33 * 2**20, "meta": 2**16}
IGNORED = ("file.txt~",)  # in the real archive; a small text file, skipped
UNPACKED_LIMIT = sum(MEMBER_LIMITS.values()) + 2**20
SIZES = {"train": 50_000, "test": 10_000}
LABELS = ("fine", "coarse")
ARCHIVE_LIMIT = 180 * 2**20  # bytes a download may take: above the real archive's 161 MiB
NUM_CLASSES = {"fine": 100, "coarse": 20}


@dataclass
class CIFAR100(Dataset):
    """CIFAR-100's arrays (as data.CIFAR10 holds them) with fine or coarse labels; verified: the archive's md5."""

    labels: str = "fine"
    cached: bool = False  # read from the cache, not from the archive

    def provenance(self) -> dict:
        return {
            **super().provenance(),
            "kind": "cifar100",
            "labels": self.labels,
            "classes": list(self.classes),
        }


def load_cifar100(
    data_dir: str | os.PathLike | None = None,
    *,
    labels: str = "fine",
    download: bool = True,
    allow_unverified: bool = False,
    progress: bool = True,
    url: str = URL,
    md5: str = MD5,
    cache_dir: str | os.PathLike | None = None,
    size: int = ARCHIVE_LIMIT,
) -> CIFAR100:
    """CIFAR-100 from data_dir: the archive (downloaded there if missing), or an extracted cifar-100-python/.

    The arrays are cached as CIFAR-10's are (keyed by the files' path, size, mtime and inode; re-hashed on
    every read), so the archive is unpacked and its md5 computed once.
    """
    if labels not in LABELS:
        raise DataError(
            f"--labels {labels!r}: CIFAR-100 has fine (100 classes) or coarse (20 classes) labels"
        )
    root = resolve_data_dir(data_dir)
    archive, folder = root / ARCHIVE, root / FOLDER
    if not archive.is_file() and not folder.is_dir():
        if not download:
            raise DataError(f"no CIFAR-100 found in {root}; put {ARCHIVE} there or allow the download")
        fetch(root, url=url, md5=md5, progress=progress, size=size)
    paths = [archive] if archive.is_file() else [folder / name for name in MEMBER_LIMITS]
    cache = _cache_path(paths, f"{labels}\0{md5}", cache_dir)
    data = _read_cache(cache) if cache else None
    if data is None:
        if archive.is_file():
            members, verified, source = read_archive(archive), _md5(archive) == md5, f"archive:{archive}"
        else:
            members, verified, source = read_folder(folder), False, f"folder:{folder}"
        data = _dataset(members, labels, source, verified)
        if cache:
            _write_cache(cache, data)
    if not data.verified and not allow_unverified:
        raise DataError(
            f"{data.source.split(':', 1)[1]} is not the official CIFAR-100 archive (md5 {md5} expected); "
            "replace it, or pass --allow-unverified to use it anyway"
        )
    return data


def _dataset(members: dict[str, bytes], labels: str, source: str, verified: bool) -> CIFAR100:
    meta = _unpickle(members["meta"], f"{source}:meta")
    names = _names(meta, f"{labels}_label_names", NUM_CLASSES[labels], source)
    arrays = {}
    for split in ("train", "test"):
        images, y = _parse(members[split], f"{source}:{split}", labels, len(names), SIZES[split])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, y
    return CIFAR100(
        **arrays,
        source=source,
        verified=verified,
        sha256=R.content_sha256(arrays),
        classes=names,
        labels=labels,
    )


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with R.open_regular(path, "the CIFAR-100 archive is needed") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


# --- reading: the archive's three members (or the extracted folder's files), each within its cap ------------


def read_archive(archive: Path) -> dict[str, bytes]:
    """The bytes of train, test and meta from the archive; anything unexpected in it is refused."""
    members: dict[str, bytes] = {}
    try:
        with (
            R.open_regular(archive, "the CIFAR-100 python archive is needed") as raw,
            gzip.GzipFile(fileobj=raw) as gz,
            tarfile.open(fileobj=A.CappedStream(gz, UNPACKED_LIMIT, archive, "CIFAR-100"), mode="r|") as tar,
        ):
            for member in tar:
                name = _member_name(member, archive)
                if name is None:
                    continue
                if name in members:
                    raise DataError(f"archive member {member.name!r} appears twice in {archive}; refusing it")
                members[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"{archive} is not a readable CIFAR-100 archive ({first_line(e)}); delete it and retry"
        ) from None
    missing = [n for n in MEMBER_LIMITS if n not in members]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-100 python archive")
    return members


def _member_name(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The name of a member we read (train, test, meta), None for one we skip; refuse anything else."""
    path = member.name.removeprefix("./")
    parts = path.replace("\\", "/").split("/")
    if member.name.startswith("/") or ".." in parts:
        raise DataError(
            f"archive member {member.name!r} of {archive} would be written outside its folder; refusing it"
        )
    if path.rstrip("/") in (FOLDER, ".", "") and member.isdir():
        return None
    name = path.removeprefix(f"{FOLDER}/")
    if path != f"{FOLDER}/{name}" or name not in (*MEMBER_LIMITS, *IGNORED):
        raise DataError(
            f"archive member {member.name!r} of {archive} is not part of the CIFAR-100 archive; refusing it"
        )
    if not member.isfile():
        raise DataError(
            f"archive member {member.name!r} of {archive} is {A.member_kind(member)}; the CIFAR-100 archive "
            "holds only regular files; refusing it"
        )
    if name in IGNORED:
        return None
    if member.size > MEMBER_LIMITS[name]:
        raise DataError(
            f"archive member {member.name!r} of {archive} is {member.size:,} bytes, more than the "
            f"{MEMBER_LIMITS[name]:,} a CIFAR-100 {name} file can be; refusing it"
        )
    return name


def read_folder(folder: Path) -> dict[str, bytes]:
    """train, test and meta of an extracted cifar-100-python/ folder (regular files within their caps)."""
    what = "the extracted CIFAR-100 folder is incomplete"
    return {name: R.read_capped(folder / name, limit, what) for name, limit in MEMBER_LIMITS.items()}


def _unpickle(payload: bytes, where: str) -> dict:
    try:
        obj = R.SafeUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except R.UNPICKLE_ERRORS as e:
        raise DataError(f"{where} is not a CIFAR-100 file ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a CIFAR-100 file (no dict)")
    return obj


def _names(meta: dict, key: str, n: int, source: str) -> tuple[str, ...]:
    """The n class names of meta[key] (bytes or str, printable, distinct)."""
    value = meta.get(key.encode())
    if isinstance(value, list) and all(isinstance(v, bytes) for v in value):
        value = [v.decode("utf-8", "replace") for v in value]
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, str) and v.isprintable() and 0 < len(v) <= 200 for v in value)
        or len(set(value)) != n
    ):
        raise DataError(f"{source}:meta: {key} must be {n} distinct class names")
    return tuple(value)


def _parse(
    payload: bytes, where: str, labels: str, n_classes: int, max_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels int64) of the train or test dict, every field checked."""
    d = _unpickle(payload, where)
    data, y = d.get(b"data"), d.get(f"{labels}_labels".encode())
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where} holds data of {got}, expected uint8 (N, 3072)")
    if not 1 <= len(data) <= max_rows:
        raise DataError(f"{where} holds {len(data):,} images; CIFAR-100 has 1 to {max_rows:,}")
    ok = isinstance(y, list) and len(y) == len(data) and all(type(v) is int and 0 <= v < n_classes for v in y)
    if not ok:
        raise DataError(f"{where}: b'{labels}_labels' must be {len(data)} integers in 0..{n_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), np.array(y, dtype=np.int64)


def fetch(
    root: Path, *, url: str = URL, md5: str = MD5, progress: bool = True, size: int = ARCHIVE_LIMIT
) -> Path:
    """Download the archive into root, checking its md5; the file appears only when complete and right.

    CIFAR-10's download (download.py): written in a stage of ours, cut off beyond size bytes.
    """
    DL.remove_stale_downloads(root, ARCHIVE)
    return DL.fetch_archive(
        root, url=url, md5=md5, progress=progress, size=size, fname=ARCHIVE, name="CIFAR-100"
    )


# --- the cache: as CIFAR-10's (sources.py), with the class names and the md5's verdict ------------------------


def _cache_path(paths: list[Path], what: str, cache_dir: str | os.PathLike | None) -> Path | None:
    base = cache_dir or os.environ.get(CACHE_ENV)
    if base == "off":
        return None
    base = (
        Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar10-cnn"
    )
    stamp = ["cifar100-v1", what]
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            return None  # a file is missing: reading the source says which
        stamp.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return (
        base
        / "cifar100"
        / hashlib.sha256("\n".join(stamp).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    )


def _read_cache(path: Path) -> CIFAR100 | None:
    """The cached dataset if it is whole and its arrays hash to the recorded sha256, else None."""
    try:
        meta = json.loads(R.read_capped(path / "meta.json", 2**20, "cache"))
        arrays = {}
        for name in R.ARRAY_NAMES:
            split, part = name.split("_")
            shape, dtype = ((32, 32, 3), np.uint8) if part == "images" else ((), np.int64)
            with R.open_regular(path / f"{name}.npy", "cache") as f:
                arrays[name] = R.read_npy(f, "cache", SIZES[split], shape, dtype)
        classes = tuple(str(c) for c in meta["classes"])
        if R.content_sha256(arrays) != meta["sha256"] or meta["labels"] not in LABELS:
            return None
        R.check_arrays(arrays, "cache", n_classes=len(classes))
        return CIFAR100(**arrays, source=str(meta["source"]), verified=meta["verified"] is True,
                        sha256=meta["sha256"], classes=classes, labels=meta["labels"], cached=True)  # fmt: skip
    except (DataError, OSError, ValueError, KeyError, TypeError, UnicodeError):
        return None


def _write_cache(path: Path, data: CIFAR100) -> None:
    """Best effort (a read-only or full disk only costs the speed-up); meta.json, written last, marks it whole."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)
        for name in R.ARRAY_NAMES:
            buffer = io.BytesIO()
            np.save(buffer, getattr(data, name))
            write_atomic(path / f"{name}.npy", buffer.getbuffer())
        meta = {"source": data.source, "verified": data.verified, "sha256": data.sha256,
                "classes": list(data.classes), "labels": data.labels, "time": time.time()}  # fmt: skip
        write_atomic(path / "meta.json", json.dumps(meta))
    except OSError:
        pass  # write_atomic removed its own temporary file
