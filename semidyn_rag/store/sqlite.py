"""Opening the store's SQLite file, and SQLite failures as errors that say what to do next.

Readers open through a URI with ``mode=ro``, plus ``immutable=1`` when the folder cannot be
written and no WAL file exists: SQLite would otherwise try to create its shared-memory file
there and fail. The path in a URI is percent-quoted, because a ``#`` or ``?`` in a folder name
would end the path early and SQLite would create an empty file at the cut.

A damaged file (SQLITE_CORRUPT, SQLITE_NOTADB) becomes ``CorruptStoreError`` and a full disk
``StoreFullError`` (an OSError with ENOSPC), so commands can offer the way out (move the file
aside with ``set_aside`` and rebuild; free space and rerun) instead of a traceback.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from ..atomic import DiskFullError

SIDE_FILES = ("-wal", "-shm")  # SQLite's companions of a WAL-mode database file


class StoreError(RuntimeError):
    """The latent store cannot be used as asked; the message names the file and the problem."""


class CorruptStoreError(StoreError):
    """The store file is damaged (not a database, or pages that fail SQLite's checks)."""

    def __init__(self, path: str | os.PathLike, detail: str):
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"{path} is damaged ({detail}); move it aside and rebuild it: "
                         "`semidyn-rag repair DIR` for a corpus directory, or rerun precompress")


class StoreBusyError(StoreError):
    """The store stayed locked by other writers for longer than the retry budget."""


class StoreFullError(DiskFullError):
    """The disk (or SQLite's size limit) is full; what was committed before stays valid."""

    def __init__(self, path: str | os.PathLike, detail: str):
        super().__init__(f"no space left writing {path} ({detail})", path)


def sqlite_uri(path: str | os.PathLike, *, immutable: bool = False) -> str:
    """A read-only ``file:`` URI for ``path``, the path percent-quoted (``#``, ``?``, ``%``)."""
    uri = f"file:{quote(Path(path).absolute().as_posix(), safe='/')}?mode=ro"
    return uri + "&immutable=1" if immutable else uri


def writable(path: str | os.PathLike) -> bool:
    """Whether this process could write the database at ``path`` (the file and its folder)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not os.access(folder, os.W_OK):
        return False
    return not path.exists() or os.access(path, os.W_OK)


def connect(path: Path, *, readonly: bool, timeout: float) -> sqlite3.Connection:
    """An autocommit connection to ``path``: read-only through a quoted URI, or read-write."""
    if readonly:
        no_wal = not any(Path(f"{path}{s}").exists() for s in SIDE_FILES)
        uri = sqlite_uri(path, immutable=no_wal and not os.access(path.parent, os.W_OK))
        return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
    return sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)


def is_busy(e: sqlite3.Error) -> bool:
    """Whether ``e`` is "database is locked/busy" (worth retrying)."""
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def translate(path: Path, e: sqlite3.Error) -> BaseException:
    """The error to raise for SQLite's ``e`` on ``path``: damaged, full, or unusable."""
    name = getattr(e, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or (
            type(e) is sqlite3.DatabaseError and not name):  # noqa: E721 (exactly DatabaseError)
        return CorruptStoreError(path, str(e))
    if name.startswith("SQLITE_FULL") or "disk is full" in str(e):
        return StoreFullError(path, str(e))
    if isinstance(e, sqlite3.OperationalError):
        return StoreError(f"cannot use the latent store {path}: {e}")
    return e


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged store (and its WAL files) to ``<name>.corrupt-<timestamp>``; return the new path.

    The WAL files move with it: left behind, SQLite could replay them into the new store.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(Path(f"{target}{s}").exists() for s in ("", *SIDE_FILES)):
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for s in SIDE_FILES:
        if Path(f"{path}{s}").exists():
            os.replace(f"{path}{s}", f"{target}{s}")
    if path.exists():
        os.replace(path, target)
    return target
