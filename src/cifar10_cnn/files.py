"""Bounded reading of the small files we read back (a run's JSON and CSV, a --config): the one owner.

Anyone may have put anything at such a path. A file is opened without blocking (a FIFO never waits for a
writer), read only if it is a regular file (never a device), and at most limit + 1 bytes whatever it claims
(no /dev/zero exhausts memory). JSON must be an object nested at most MAX_DEPTH deep: far deeper overflows the
parser's stack, and deeper than ours overflows the stack of whatever formats it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import FileError, first_line

# Far above what a run of ours writes (results.json ~4 KB, eval/metrics.json ~14 KB, a config ~2 KB).
MAX_JSON_BYTES = 2 * 2**20
MAX_DEPTH = 32


def read_bounded(path: str | os.PathLike, limit: int) -> bytes | None:
    """The bytes of a regular file (None if nothing is there); more than limit bytes is a FileError."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:  # a socket (ENXIO), no permission ...
        if path.exists() and not path.is_file():
            raise FileError(f"{path} is not a regular file") from None
        raise FileError(f"{path} is not readable ({first_line(e)})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # of what was opened: no race with a swap
            raise FileError(f"{path} is not a regular file")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise FileError(f"{path} is not readable ({first_line(e)})") from None
    if len(data) > limit:
        raise FileError(f"{path} is larger than {limit // 2**20} MB; it is not a file of ours")
    return data


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
