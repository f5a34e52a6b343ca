"""Working folders of ours in the data folder (a download's, an extraction's), and removing those a kill left.

A stage is made by tempfile.mkdtemp as <target>/.<kind>-XXXXXXXX and holds our marker, written first: it names
the kind, the host and the process. A later run removes a stage only if it is surely ours and abandoned: the
name is one mkdtemp gives, it is a folder (not a link) of our user, its marker is ours, its process is gone,
and what else it holds is what that kind of stage writes (checked by the caller).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DataError
from .readers import read_capped

MARKER = ".cifar10-cnn-stage"
_MARKER_TEXT = re.compile(r"cifar10-cnn (\w+) stage\nhost (.+)\npid (\d+)\n")


def make_stage(target: Path, kind: str) -> Path:
    """A new stage target/.<kind>-XXXXXXXX with our marker; OSError where target is read-only, full or missing."""
    folder = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target))
    try:
        (folder / MARKER).write_text(
            f"cifar10-cnn {kind} stage\nhost {socket.gethostname()}\npid {os.getpid()}\n"
        )
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)  # just made, by us
        raise
    return folder


def remove_stale_stages(target: Path, kind: str, holds_only_ours: Callable[[Path], bool]) -> list[Path]:
    """Remove the abandoned stages of this kind in target; holds_only_ours(folder) vets their contents.

    Best effort: a folder that cannot be read or removed stays. Returns the stages removed.
    """
    name = re.compile(rf"\.{kind}-[a-z0-9_]{{8}}")  # as tempfile.mkdtemp names them
    try:
        found = [Path(entry.path) for entry in os.scandir(target) if name.fullmatch(entry.name)]
    except OSError:
        return []
    stale = [folder for folder in found if _abandoned(folder, kind) and _vetted(holds_only_ours, folder)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def only_files(folder: Path, allowed: Callable[[str], bool]) -> bool:
    """Whether folder holds regular files only (no links, no folders), each with an allowed name."""
    return all(entry.is_file(follow_symlinks=False) and allowed(entry.name) for entry in os.scandir(folder))


def _abandoned(folder: Path, kind: str) -> bool:
    """A folder of our user holding our marker of this kind, written on this host by a process that is gone."""
    try:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            return False
        if not stat.S_ISREG((folder / MARKER).lstat().st_mode):
            return False
        found = _MARKER_TEXT.fullmatch(read_capped(folder / MARKER, 512, "a stage marker").decode())
        return (
            found is not None
            and found[1] == kind
            and found[2] == socket.gethostname()
            and not _alive(int(found[3]))
        )
    except (OSError, DataError, UnicodeError, ValueError, OverflowError):
        return False


def _vetted(holds_only_ours: Callable[[Path], bool], folder: Path) -> bool:
    try:
        return holds_only_ours(folder)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Whether process pid runs on this host (one of another user counts: it may be writing its stage)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # no permission to signal it: it exists
        return True
    return True
