"""The download of the CIFAR-10 python archive: md5-checked by pooch, and bounded by the archive's known size.

The archive appears in the data folder only when it is complete and right: pooch writes it in a stage of
ours (<data>/.download-XXXXXXXX, see stages.py), removed when the download fails, is too large or has the
wrong md5; a stage that a kill left behind is removed by the next load (remove_stale_downloads).
"""

from __future__ import annotations

import errno
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
    root: Path, *, url: str = URL, md5: str = MD5, progress: bool = True, size: int = ARCHIVE_SIZE
) -> Path:
    """Download the archive into root, checking its md5; the file appears only when complete and right.

    A server that sends more than size bytes (the archive's known size) is cut off, and nothing is kept.
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
                fname=ARCHIVE,
                path=stage,
                downloader=_CappedDownloader(pooch.HTTPDownloader(progressbar=progress), size),
            )
            if not (root / ARCHIVE).exists():  # else another process brought it meanwhile: that one stays
                os.rename(staged, root / ARCHIVE)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except ValueError as e:  # pooch's hash mismatch
        raise DataError(
            f"download of {url} failed its md5 check ({first_line(e)}); nothing was kept"
        ) from None
    except (requests.RequestException, OSError) as e:
        cause = _root_cause(e)
        if isinstance(cause, OSError) and cause.errno in _WRITE_ERRNOS:
            raise DataError(
                f"cannot download into {root} ({first_line(cause)}); the archive needs 163 MB there: "
                f"free some space or pass --data-dir (or set {DATA_ENV}) to a writable folder"
            ) from None
        raise DataError(
            f"cannot download {url} ({first_line(cause)}); check the network, or put the data in {root} "
            f"(or pass --data-dir / set {DATA_ENV})"
        ) from None
    return root / ARCHIVE


class _CappedDownloader:
    """pooch's HTTP downloader writing through _CappedFile; pooch removes its temporary file when we raise."""

    def __init__(self, http, size: int) -> None:
        self._http, self._size = http, size

    def __call__(self, url: str, output_file: str, pooch, check_only: bool = False):
        if check_only:
            return self._http(url, output_file, pooch, check_only=True)
        with open(output_file, "w+b") as f:
            return self._http(url, _CappedFile(f, self._size, url), pooch)


class _CappedFile:
    """A file that refuses to grow beyond limit bytes (a server sending more than the archive is)."""

    def __init__(self, f: BinaryIO, limit: int, url: str) -> None:
        self._f, self._left, self._limit, self._url = f, limit, limit, url

    def write(self, chunk: bytes) -> int:
        self._left -= len(chunk)
        if self._left < 0:
            raise DataError(
                f"{self._url} sent more than {self._limit:,} bytes, the size of the CIFAR-10 python archive; "
                "cut off, nothing was kept"
            )
        return self._f.write(chunk)

    def flush(self) -> None:
        self._f.flush()


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (a refused connection rather than the retry wrapper around it)."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    return e


_POOCH_TEMPORARY = re.compile(r"tmp[a-z0-9_]{8}")  # tempfile.NamedTemporaryFile's names, as pooch makes them


def remove_stale_downloads(root: Path) -> list[Path]:
    """Remove what killed downloads left in root (only stages of ours; see stages.py)."""

    def holds_only_ours(folder: Path) -> bool:
        return only_files(
            folder, lambda name: name in (MARKER, ARCHIVE) or bool(_POOCH_TEMPORARY.fullmatch(name))
        )

    return remove_stale_stages(root, "download", holds_only_ours)
