"""The study storage: is it ours? A SQLite file is looked at read-only before Optuna opens it.

A file that is not SQLite, a database of another application, a folder or a FIFO is refused with one line and
left as it is; a report opens the database read-only and creates nothing; a search needs a writable one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import UserError, first_line

SQLITE_HEADER = b"SQLite format 3\x00"
# Some of the tables Optuna creates (under SQLite each CREATE TABLE may commit on its own).
OPTUNA_TABLES = {"studies", "trials", "version_info"}


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite storage URL; None for an in-memory database or another kind of storage."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise UserError(f"cannot open the study storage {url!r}: {first_line(e)}") from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):  # SQLite's own URI form: it names its file and mode itself
        return None
    return Path(parsed.database)


def _sqlite_kind(path: Path, url: str) -> str:
    """'new' (no file, an empty file or no tables) or 'optuna'; anything else is one line, and left as it is."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "new"
    except OSError as e:
        raise UserError(f"cannot open the study storage {url!r}: {first_line(e)}") from None
    if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO (opening it would hang) or a device
        raise UserError(f"the study storage {url!r}: {path} is not a regular file")
    if info.st_size == 0:
        return "new"
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise UserError(
                f"the study storage {url!r}: {path} is not a SQLite database; nothing was changed"
            )
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except (OSError, sqlite3.Error) as e:
        raise UserError(f"cannot read the study storage {url!r}: {first_line(e)}") from None
    if not tables or tables < OPTUNA_TABLES:
        # Some of Optuna's tables: another process is creating them (two searches started together on a new
        # file); Optuna then creates the rest, which is idempotent (see _open_rdb's retries).
        return "new"
    if not tables >= OPTUNA_TABLES:
        raise UserError(
            f"the study storage {url!r}: {path} is a database of another application "
            f"(tables {', '.join(sorted(tables)[:4])}); nothing was changed: give --storage a new file"
        )
    return "optuna"


class NoDatabase(UserError):
    """A report's SQLite database does not exist (or is empty): there is nothing to report."""


def _check_writable(path: Path, url: str) -> None:
    """A search writes trials: the file, or the folder that will hold it (and SQLite's journal), must be writable."""
    folder = path.parent if str(path.parent) else Path(".")
    for target in (path, folder) if path.exists() else (folder,):
        if target.exists() and not os.access(target, os.W_OK):
            raise UserError(
                f"the study storage {url!r}: {target} is read-only; give --storage a writable file"
            )


def open_storage(url: str, *, read_only: bool = False) -> Any:
    """An Optuna RDB storage with heartbeats (so a killed trial is failed and retried), or one clear error.

    read_only (for a report): the database must exist and is opened read-only, so that nothing is created or
    written. Otherwise a new SQLite file gets Optuna's tables, and an existing one must already hold them.
    """
    path = _sqlite_file(url)
    kind = _sqlite_kind(path, url) if path is not None else None
    if read_only and kind == "new":
        state = "does not exist" if not path.exists() else "holds no studies"
        raise NoDatabase(f"{path} {state}; nothing was created")
    if path is not None and not read_only:
        _check_writable(path, url)
    target = url
    if read_only and path is not None:
        target = f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true"
    return _open_rdb(url, target, existing=kind == "optuna")


def _open_rdb(url: str, target: str, *, existing: bool) -> Any:
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

    engine_kwargs = {"connect_args": {"timeout": 60}} if target.startswith("sqlite") else {}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(
                target,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=10,
                grace_period=30,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                skip_table_creation=existing,  # its tables are there: Optuna's version check alone decides
            )
        except (IntegrityError, OperationalError) as e:  # e.g. two processes creating one database at once
            if attempt == 3:
                raise UserError(f"cannot open the study storage {url!r}: {first_line(e)}") from None
            time.sleep(0.5 * (attempt + 1))
        except (SQLAlchemyError, ValueError, ImportError, RuntimeError) as e:  # RuntimeError: another schema
            raise UserError(f"cannot open the study storage {url!r}: {first_line(e)}") from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A database that fails later (read-only, locked, corrupt) is one line; SQLite rolls back what failed."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as e:
        raise UserError(f"the study storage {url!r} failed: {first_line(e)}") from None
