"""The cache of a folder's decoded arrays: keyed by every file's name, size and mtime (stat only: a second run
loads in about a second); its arrays re-hashed on every read against the sha256 recorded. Best effort: a cache
that cannot be written only costs the speed-up, one that does not match is decoded anew.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from .errors import DataError
from .folder_decode import Decoded, sha256_of
from .folder_scan import Scan
from .readers import open_regular, read_capped, read_npy
from .sources import CACHE_ENV

MAX_META_JSON = 256 * 2**20


def cache_key(s: Scan, size: int) -> str:
    """sha256 of the root, layout, classes, image size and each file's name, split, size and mtime."""
    h = hashlib.sha256(
        f"folder-v1\0{s.root.resolve()}\0{s.layout}\0{size}\0".encode("utf-8", "surrogateescape")
    )
    h.update("\0".join(s.classes).encode() + b"\n")
    base = os.path.join(s.root, "")
    for rel, label, split in s.files:
        try:
            st = os.stat(base + rel)
            stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_mode}"
        except OSError as e:
            stamp = f"error {e.errno}"
        h.update(os.fsencode(rel) + f"\0{label}\0{split}\0{stamp}\n".encode())
    return h.hexdigest()


def cache_path(key: str, cache_dir: str | os.PathLike | None) -> Path | None:
    base = cache_dir or os.environ.get(CACHE_ENV)
    if base == "off":
        return None
    base = (
        Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar10-cnn"
    )
    return base / "folders" / key[:24]


def read_cache(path: Path, key: str, size: int) -> Decoded | None:
    """The cached decode if it is whole and intact (its sha256 as recorded), else None."""
    try:
        meta = json.loads(read_capped(path / "meta.json", MAX_META_JSON, "cache"))
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        n = len(meta["rels"])
        with open_regular(path / "images.npy", "cache") as f:
            images = read_npy(f, "cache", n, (size, size, 3), np.uint8)
        with open_regular(path / "labels.npy", "cache") as f:
            labels = read_npy(f, "cache", n, (), np.int64)
        sha = {"images": sha256_of(images), "labels": sha256_of(labels)}
        if len(images) != n or len(labels) != n or sha != meta["sha256"]:
            return None
        return Decoded(
            rels=[str(r) for r in meta["rels"]],
            labels=labels,
            splits=[str(x) for x in meta["splits"]],
            images=images,
            skipped=[(str(a), str(b)) for a, b in meta["skipped"]],
            files_sha256=str(meta["files_sha256"]),
            sha256=sha,
        )
    except (DataError, OSError, ValueError, KeyError, TypeError, UnicodeError):
        return None


def write_cache(path: Path, key: str, d: Decoded) -> None:
    """Best effort (a read-only or full disk only costs the speed-up); meta.json, written last, marks it whole."""
    from .runs import write_atomic

    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)
        for name, array in (("images", d.images), ("labels", d.labels)):
            buffer = io.BytesIO()
            np.save(buffer, array)
            write_atomic(path / f"{name}.npy", buffer.getbuffer())
        meta = {
            "key": key,
            "sha256": d.sha256,
            "rels": d.rels,
            "splits": d.splits,
            "skipped": d.skipped,
            "files_sha256": d.files_sha256,
            "time": time.time(),
        }
        write_atomic(path / "meta.json", json.dumps(meta))
    except OSError:
        pass  # write_atomic removed its own temporary file
