"""Atomic writes of files and folders: build next to the target, then rename over it.

A reader, or a rerun after ``kill -9``, sees the old content or the new one, never half.
Temporaries carry the writer's host and pid in their name
(``.<target>.<host>.<pid>.tmp``), so a later sweep can delete what dead writers on this host
left behind without touching the work of live processes or of other hosts on shared storage.
``DiskFullError`` is how a writer reports a full disk: what was saved, and that a rerun resumes.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """No space left on the device (errno ENOSPC); the message says what was saved and what to run."""

    def __init__(self, message: str, filename: str | os.PathLike | None = None):
        super().__init__(errno.ENOSPC, message, None if filename is None else str(filename))

    def __str__(self) -> str:
        return self.strerror


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{_host()}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path to write; on success it is fsynced and replaces ``target``."""
    target = Path(target)
    tmp = _temporary_name(target)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it takes the place of ``target``.

    An existing ``target`` is moved aside first and deleted only once the new folder is in
    place, so a failure at any point leaves either the old folder or the new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.fill-"))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")  # never swept: it may be the only copy
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old.exists() and not target.exists():
                os.replace(old, target)  # put the old folder back
            raise
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries that dead writers on this host left in ``folder``; returns how many.

    Temporaries of other hosts (shared storage) and of live processes are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    host, n = _host(), 0
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        if not p.is_file():
            continue
        parts = p.name.removesuffix(TMP_SUFFIX).rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every filesystem lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
