"""The download of the CIFAR-10 (and CIFAR-100) python archive: md5-checked by pooch, bounded by its known size.

The archive appears in the data folder only when it is complete and right: pooch writes it in a stage of
ours (<data>/.download-XXXXXXXX, see stages.py), removed when the download fails, is too large or has the
wrong md5; a stage that a kill left behind is removed by the next load (remove_stale_downloads).
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

from .errors import DataError, first_line
from .stages import MARKER, make_stage, only_files, remove_stale_stages

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_SIZE = 170_498_071  # bytes: the download is cut off beyond it
DATA_ENV = "CIFAR10_DATA"


def fetch_archive(
    root: Path,
    *,
    url: str = URL,
    md5: str = MD5,
    progress: bool = True,
    size: int = ARCHIVE_SIZE,
    fname: str = ARCHIVE,
    name: str = "CIFAR-10",
) -> Path:
    """Download the archive of dataset `name` into root as fname, checking its md5; the file appears only when
    complete and right (CIFAR-100's download is this one too, with its own url, md5, size and names).

    A server that sends more than size bytes (the archive's known size, or a bound above it) is cut off, and
    nothing is kept. Every failure is one line that names the dataset.
    """
    import pooch  # imported here: only the download needs it
    import requests

    pooch.get_logger().setLevel("WARNING")  # the progress bar says it; errors are ours to word
    try:
        root.mkdir(parents=True, exist_ok=True)
        stage = make_stage(root, "download")  # pooch's temporary file goes there: a kill leaves it ours
        try:
            staged = pooch.retrieve(
                url,
                known_hash=f"md5:{md5}",
                fname=fname,
                path=stage,
                downloader=CappedDownloader(pooch.HTTPDownloader(progressbar=progress), size, name),
            )
            if not (root / fname).exists():  # else another process brought it meanwhile: that one stays
                os.rename(staged, root / fname)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except ValueError as e:  # pooch's hash mismatch
        raise DataError(
            f"the download of the {name} archive {url} failed its md5 check ({first_line(e)}); nothing was kept"
        ) from None
    except (requests.RequestException, OSError) as e:
        cause = root_cause(e)
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS:
            raise DataError(
                f"cannot download the {name} archive into {root} ({first_line(cause)}); it needs "
                f"{math.ceil(size / 2**20)} MB there: free some space or pass --data-dir (or set {DATA_ENV}) "
                "to a writable folder"
            ) from None
        raise DataError(
            f"cannot download the {name} archive {url} ({first_line(cause)}); check the network, or put "
            f"{fname} in {root} (or pass --data-dir / set {DATA_ENV})"
        ) from None
    return root / fname


class CappedDownloader:
    """pooch's HTTP downloader writing through _CappedFile; pooch removes its temporary file when we raise."""

    def __init__(self, http, size: int, name: str = "CIFAR-10") -> None:
        self._http, self._size, self._name = http, size, name

    def __call__(self, url: str, output_file: str, pooch, check_only: bool = False):
        if check_only:
            return self._http(url, output_file, pooch, check_only=True)
        with open(output_file, "w+b") as f:
            return self._http(url, _CappedFile(f, self._size, url, self._name), pooch)


class _CappedFile:
    """A file that refuses to grow beyond limit bytes (a server sending more than the archive is)."""

    def __init__(self, f: BinaryIO, limit: int, url: str, name: str) -> None:
        self._f, self._left, self._limit, self._url, self._name = f, limit, limit, url, name

    def write(self, chunk: bytes) -> int:
        self._left -= len(chunk)
        if self._left < 0:
            raise DataError(
                f"{self._url} sent more than {self._limit:,} bytes, more than the {self._name} python archive "
                "is; cut off, nothing was kept"
            )
        return self._f.write(chunk)

    def flush(self) -> None:
        self._f.flush()


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (a refused connection rather than the retry wrapper around it)."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    return e


_POOCH_TEMPORARY = re.compile(r"tmp[a-z0-9_]{8}")  # tempfile.NamedTemporaryFile's names, as pooch makes them


def remove_stale_downloads(root: Path, archive: str = ARCHIVE) -> list[Path]:
    """Remove what killed downloads of archive left in root (only stages of ours; see stages.py)."""

    def holds_only_ours(folder: Path) -> bool:
        return only_files(
            folder, lambda name: name in (MARKER, archive) or bool(_POOCH_TEMPORARY.fullmatch(name))
        )

    return remove_stale_stages(root, "download", holds_only_ours)
