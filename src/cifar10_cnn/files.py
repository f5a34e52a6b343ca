"""Bounded reading of files we did not just write: the one owner (run files, a --config, datasets, images).

Anyone may have put anything at such a path. A file is opened without blocking (a FIFO never waits for a
writer), read only if it is a regular file (never a device), and at most limit + 1 bytes whatever it claims
(no /dev/zero exhausts memory). JSON must be an object nested at most MAX_DEPTH deep: far deeper overflows the
parser's stack, and deeper than ours overflows the stack of whatever formats it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from .errors import FileError, first_line

# Far above what a run of ours writes (results.json ~4 KB, eval/metrics.json ~14 KB, a config ~2 KB).
MAX_JSON_BYTES = 2 * 2**20
MAX_DEPTH = 32


class NotRegularFile(OSError):
    """What is at a path is not a regular file; kind says what it is ("a FIFO", "a folder" ...)."""

    def __init__(self, kind: str):
        super().__init__(f"not a regular file ({kind})")
        self.kind = kind


class FileTooLarge(OSError):
    """A regular file larger than the reader's limit (read no further than the limit)."""


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """path opened for reading if it is a regular file: it never blocks on a FIFO, never reads a device.

    The check is on what was opened (fstat), so a path swapped for a FIFO after a stat cannot make it wait.
    Raises FileNotFoundError, NotRegularFile, or the OSError of the open.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket cannot be opened
            raise NotRegularFile("a socket") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(_KINDS.get(stat.S_IFMT(mode), "a special file"))
    return os.fdopen(fd, "rb")


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
}


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most limit bytes (at most limit + 1 are read, whatever it claims).

    Raises what open_regular raises, FileTooLarge, or the OSError of the read; each caller words them.
    """
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"larger than {limit:,} bytes")
    return data


def read_bounded(path: str | os.PathLike, limit: int) -> bytes | None:
    """The bytes of a regular file (None if nothing is there); more than limit bytes is a FileError."""
    path = Path(path)
    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        return None
    except NotRegularFile:
        raise FileError(f"{path} is not a regular file") from None
    except FileTooLarge:
        raise FileError(f"{path} is larger than {limit // 2**20} MB; it is not a file of ours") from None
    except OSError as e:
        raise FileError(f"{path} is not readable ({first_line(e)})") from None


def too_deep(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and objects nest deeper than limit (without recursion, so any depth is safe)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]
    return False


def read_json_object(
    path: str | os.PathLike, *, limit: int = MAX_JSON_BYTES, required: bool = False
) -> dict[str, Any]:
    """A JSON object from a file, bounded in size and depth; a missing file is {} (a FileError if required)."""
    path = Path(path)
    data = read_bounded(path, limit)
    if data is None:
        if required:
            raise FileError(f"{path} does not exist")
        return {}
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: '[[[[...' nested past the stack
        raise FileError(f"{path} is not readable JSON ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise FileError(f"{path} must hold a JSON object")
    if too_deep(obj):
        raise FileError(f"{path} nests deeper than {MAX_DEPTH} levels; it is not a file of ours")
    return obj
