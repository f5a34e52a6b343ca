"""The official CIFAR-10 python archive, extracted into arrays.

Extraction reads only the known members, each within its known size, and refuses links, devices, unknown
names and duplicates; the unpacked total is capped too (a decompression bomb). The batches folder is kept
next to the archive only when the arrays are the real CIFAR-10; the staging folder that a killed extraction
leaves behind is removed by the next load (remove_stale_extractions), and nothing else of that name.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import stat
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DataError, first_line
from .readers import (
    BATCHES_DIR,
    SHA256,
    TEST_BATCH,
    TRAIN_BATCHES,
    content_sha256,
    join_batches,
    open_regular,
    parse_batch,
)
from .stages import MARKER, make_stage, only_files, remove_stale_stages

# The members of the real cifar-10-python.tar.gz and their sizes in bytes: nothing else is extracted, and
# nothing larger (a repacked archive may hold smaller batches, e.g. a subset).
MEMBER_SIZES = {
    "data_batch_1": 31035704,
    "data_batch_2": 31035320,
    "data_batch_3": 31035999,
    "data_batch_4": 31035696,
    "data_batch_5": 31035623,
    "test_batch": 31035526,
    "batches.meta": 158,
    "readme.html": 88,
}
# All that a tar of those members may unpack to, headers and padding included.
UNPACKED_LIMIT = sum(MEMBER_SIZES.values()) + 2**20


# --- extraction: only the known members, each within its known size; kept only when verified -------------


class CappedStream(io.RawIOBase):
    """A read-only stream that fails once more than limit bytes were read from it (a decompression bomb)."""

    def __init__(self, f: BinaryIO, limit: int, archive: Path, name: str = "CIFAR-10") -> None:
        self._f, self._left, self._limit, self._archive, self._name = f, limit, limit, archive, name

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        self._left -= n
        if self._left < 0:
            raise DataError(
                f"{self._archive} unpacks to more than {self._limit:,} bytes, more than the real {self._name} "
                "python archive; refusing it"
            )
        return n


def extract_archive(archive: Path, target: Path) -> dict[str, np.ndarray]:
    """The arrays of a CIFAR-10 python archive, read member by member in memory.

    Only the known members are read, each within its known size; links, devices, unknown names and
    duplicates are refused. The members are also staged in target/.extract-*, and moved into place as
    target/cifar-10-batches-py/ only if the arrays are the real CIFAR-10 (sha256): an unverified folder
    would shadow the archive as a source on later runs. Staging is best effort: a read-only or full disk
    only means that nothing is kept.
    """
    stage = _Stage(target)
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with (
            open_regular(archive, "the CIFAR-10 python archive is needed") as raw,
            gzip.GzipFile(fileobj=raw) as gz,
            tarfile.open(fileobj=CappedStream(gz, UNPACKED_LIMIT, archive), mode="r|") as tar,
        ):
            for member in tar:
                name = _member_name(member, archive)
                if name is None:
                    continue
                if name in stage.seen:
                    raise DataError(f"archive member {member.name!r} appears twice in {archive}; refusing it")
                payload = tar.extractfile(member).read()
                stage.add(name, payload)
                if name in (*TRAIN_BATCHES, TEST_BATCH):
                    batches[name] = parse_batch(payload, f"{archive}:{member.name}")
        missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if name not in batches]
        if missing:
            raise DataError(f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-10 python archive")
        arrays = join_batches(batches)
        stage.keep(target / BATCHES_DIR, content_sha256(arrays) == SHA256)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{archive} is not a readable CIFAR-10 archive ({first_line(e)}); delete it and retry"
        ) from None
    finally:
        stage.discard()
    return arrays


def _member_name(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The file name of a member we extract, None for the batches folder entry itself; refuse anything else."""
    parts = member.name.replace("\\", "/").split("/")
    if member.name.startswith("/") or ".." in parts:
        raise DataError(
            f"archive member {member.name!r} of {archive} would be written outside the target folder; refusing it"
        )
    if member.name.removeprefix("./").rstrip("/") in (BATCHES_DIR, ".") and member.isdir():
        return None
    if not member.isfile():
        raise DataError(
            f"archive member {member.name!r} of {archive} is {member_kind(member)}; the CIFAR-10 archive holds "
            "only regular files; refusing it"
        )
    path = member.name.removeprefix("./")  # as `tar -C dir .` would write it
    name = path.removeprefix(f"{BATCHES_DIR}/")
    if name not in MEMBER_SIZES or path != f"{BATCHES_DIR}/{name}":
        raise DataError(
            f"archive member {member.name!r} of {archive} is not part of the CIFAR-10 archive; refusing it"
        )
    if member.size > MEMBER_SIZES[name]:
        raise DataError(
            f"archive member {member.name!r} of {archive} is {member.size:,} bytes, more than the "
            f"{MEMBER_SIZES[name]:,} of the real file; refusing it"
        )
    return name


def member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.isdev():
        return "a FIFO" if member.isfifo() else "a device"
    return "a folder" if member.isdir() else "a special entry"


class _Stage:
    """target/.extract-*/cifar-10-batches-py, written as the members are read; best effort throughout."""

    def __init__(self, target: Path) -> None:
        self.seen: set[str] = set()
        try:
            self.root: Path | None = make_stage(target, "extract")
            (self.root / BATCHES_DIR).mkdir()
        except OSError:  # read-only, full, or not a folder: the arrays are read in memory all the same
            self.discard()

    def add(self, name: str, payload: bytes) -> None:
        self.seen.add(name)
        if self.root is None:
            return
        try:
            with open(self.root / BATCHES_DIR / name, "xb") as f:
                f.write(payload)
        except OSError:  # e.g. the disk is full: keep nothing
            self.discard()

    def keep(self, final: Path, verified: bool) -> None:
        """Move the staged folder to final if the arrays verified and final does not exist (no clobbering)."""
        if self.root is None or not verified or final.exists() or final.is_symlink():
            return
        with contextlib.suppress(OSError):  # e.g. final appeared meanwhile: it is not ours to replace
            os.rename(self.root / BATCHES_DIR, final)

    def discard(self) -> None:
        if getattr(self, "root", None) is not None:
            shutil.rmtree(self.root, ignore_errors=True)  # our own mkdtemp folder
        self.root = None


def remove_stale_extractions(target: Path) -> list[Path]:
    """Remove what killed extractions left in target (only stages of ours; see stages.py)."""

    def holds_only_ours(folder: Path) -> bool:
        names = set(os.listdir(folder))
        if not names <= {MARKER, BATCHES_DIR}:
            return False
        batches = folder / BATCHES_DIR
        if BATCHES_DIR in names and not stat.S_ISDIR(batches.lstat().st_mode):
            return False
        return BATCHES_DIR not in names or only_files(batches, lambda name: name in MEMBER_SIZES)

    return remove_stale_stages(target, "extract", holds_only_ours)
