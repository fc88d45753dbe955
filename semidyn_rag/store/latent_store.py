"""The latent store: encoder features of chunks on SQLite (WAL), keyed by text and fingerprint.

It keeps what ``SemiDynamicCompressor.encode`` returns, not latents at one scale: finest-factor
window means and counts (mean pooling) or the longest state suffix (token backbones), plus
y_hat and the token count. ``comp.compress_features`` turns an entry into latents at any scale
or factor at read time, so changing ``scale`` never re-runs the encoder over a corpus.

One SQLite file in WAL mode gives many readers and serialised writers across processes; every
``put_many`` is one ``BEGIN IMMEDIATE`` transaction (all or nothing, also under ``kill -9``),
retried with backoff while another process holds the write lock. Entries are checksummed, an
entry under another fingerprint is never returned, and a corrupt one is reported, never used.
A damaged file raises ``CorruptStoreError`` and a full disk ``StoreFullError`` (see ``sqlite``).
A read-only store (``readonly=True``, e.g. in a folder the reader cannot write) serves reads;
``fetch_or_encode`` then skips the write-back of what it encoded, with a warning.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..types import ContextFeatures
from .fetch import FetchResult, StoreStats
from .keys import chunk_key, normalize_text
from .record import STORAGE_DTYPES, CorruptEntryError, Record, check, pack, unpack
from .sqlite import CorruptStoreError, StoreBusyError, StoreError, connect, is_busy, translate, writable

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_COLUMNS = "key, fingerprint, dtype, rows, cols, features, counts, y_hat, n_tokens, checksum"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT NOT NULL,          -- sha256 of the normalised chunk text
    fingerprint TEXT NOT NULL,  -- feature fingerprint of the compressor that encoded it
    dtype TEXT NOT NULL,        -- storage dtype of the features blob
    rows INTEGER NOT NULL,
    cols INTEGER NOT NULL,
    features BLOB NOT NULL,
    counts BLOB,                -- int32 tokens per finest window (mean pooling), else NULL
    y_hat REAL NOT NULL,
    n_tokens INTEGER NOT NULL,
    checksum TEXT NOT NULL,     -- "crc32:..." over all of the above (bare sha256 hex in older stores)
    created REAL NOT NULL,
    UNIQUE (key, fingerprint)
);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
"""
_IN_CHUNK = 500  # keys per "IN (...)" query, well under SQLite's variable limit
_INSERT = f"INSERT OR REPLACE INTO entries ({_COLUMNS}, created) VALUES ({','.join('?' * 11)})"
# Connections inherited through fork(): kept referenced so they are never closed in the child
# (closing one there could disturb the parent's locks); the child opens its own.
_INHERITED: list[sqlite3.Connection] = []


class LatentStore:
    """Checksummed ``ContextFeatures`` by (chunk key, feature fingerprint), on SQLite in WAL mode.

    Usable as a context manager. Safe to share between threads of one process and to open from
    many processes at once (each process opens its own connection; a forked child reconnects).
    """

    def __init__(self, path: str | os.PathLike, *, dtype: str = "float16", timeout: float = 60.0,
                 readonly: bool = False, synchronous: str = "NORMAL"):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self.dtype = dtype
        self.timeout = float(timeout)
        self.readonly = readonly
        self.synchronous = synchronous.upper()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        if readonly and not self.path.exists():
            raise FileNotFoundError(f"no latent store at {self.path}")
        self._connection()  # create the schema (or fail) now, not on first use

    @classmethod
    def for_reading(cls, path: str | os.PathLike, **kwargs) -> LatentStore:
        """Open an existing store the way a reader should: read-write where this process may write
        (misses found later are written back), read-only otherwise, with a warning.

        Raises FileNotFoundError when there is no store, CorruptStoreError when it is damaged.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no latent store at {path}")
        if writable(path):
            try:
                return cls(path, **kwargs)
            except CorruptStoreError:
                raise
            except StoreError as e:  # e.g. a folder that refuses SQLite's WAL files
                logger.warning("%s; opening it read-only", e)
        else:
            logger.warning("%s is read-only here: chunks encoded now are not written back", path)
        return cls(path, readonly=True, **kwargs)

    # -- connection ---------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:  # a connection must not cross fork(): set it aside, unclosed
            _INHERITED.append(self._conn)
            self._conn = None
        if not self.readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = connect(self.path, readonly=self.readonly, timeout=self.timeout)
        except sqlite3.Error as e:
            raise translate(self.path, e) from e
        try:
            self._check_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new store; refuse a file that is not a store this version reads."""
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if not self.readonly:
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone()
                if not exists:  # only a new store takes the write lock on open
                    self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
                    self._retry(lambda: conn.executescript(_SCHEMA))
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() \
                if "meta" in tables else None
        except sqlite3.Error as e:
            if is_busy(e):
                raise
            raise translate(self.path, e) from e
        if not {"meta", "entries"} <= tables or row is None:
            raise CorruptStoreError(self.path, "no latent store tables in it")
        if int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer semidyn-rag (store schema {row[0]}, "
                             f"this version reads {SCHEMA_VERSION})")

    def _retry(self, op):
        """Run ``op`` until it gets past "database is locked", with jittered backoff."""
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                return op()
            except sqlite3.Error as e:
                if not is_busy(e):
                    raise translate(self.path, e) from e
                if time.monotonic() > deadline:
                    raise StoreBusyError(f"{self.path} stayed locked for {self.timeout:.0f} s: {e}") from e
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                if self._pid == os.getpid():
                    self._conn.close()
                else:
                    _INHERITED.append(self._conn)
            self._conn = None

    def __enter__(self) -> LatentStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LatentStore({str(self.path)!r}, dtype={self.dtype!r})"

    # -- reading ------------------------------------------------------------------------------

    def _select(self, columns: str, keys: Sequence[str], fingerprint: str) -> list[tuple]:
        out: list[tuple] = []
        with self._lock:
            conn = self._connection()
            for s in range(0, len(keys), _IN_CHUNK):
                part = list(keys[s : s + _IN_CHUNK])
                marks = ",".join("?" * len(part))
                sql = f"SELECT {columns} FROM entries WHERE fingerprint = ? AND key IN ({marks})"
                out.extend(self._retry(lambda: conn.execute(sql, [fingerprint, *part]).fetchall()))
        return out

    def get(self, key: str, fingerprint: str) -> ContextFeatures | None:
        """The features stored for ``key`` under ``fingerprint``, or None.

        Raises CorruptEntryError when the entry fails its checksum.
        """
        return self.get_many([key], fingerprint).get(key)

    def get_many(self, keys: Sequence[str], fingerprint: str, *, on_corrupt: str = "raise",
                 compute_dtype: torch.dtype = torch.float32) -> dict[str, ContextFeatures]:
        """Features for those of ``keys`` stored under ``fingerprint``, in the order of ``keys``
        (absent keys are left out).

        ``on_corrupt="raise"`` raises CorruptEntryError at the first corrupt entry; ``"skip"``
        logs it and leaves it out, so callers treat it as a miss and recompute it.
        """
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        wanted = list(dict.fromkeys(keys))
        found: dict[str, ContextFeatures] = {}
        for row in self._select(_COLUMNS, wanted, fingerprint):
            rec = Record(*row)
            try:
                found[rec.key] = unpack(rec, compute_dtype)
            except CorruptEntryError as e:
                if on_corrupt == "raise":
                    raise
                logger.warning("%s; it will be treated as missing", e)
        return {k: found[k] for k in wanted if k in found}  # in the order asked for

    def contains(self, key: str, fingerprint: str) -> bool:
        """Whether an entry exists for ``key`` under ``fingerprint`` (not checksum-verified)."""
        return bool(self._select("key", [key], fingerprint))

    def missing(self, keys: Sequence[str], fingerprint: str, *, verify: bool = False) -> list[str]:
        """Those of ``keys`` (in order, unique) with no usable entry under ``fingerprint``.

        With ``verify=True`` entries are read and checksummed, and corrupt ones count as missing.
        """
        keys = list(dict.fromkeys(keys))
        found: set[str] = set()
        for s in range(0, len(keys), _IN_CHUNK):  # bounded memory: one slice of blobs at a time
            part = keys[s : s + _IN_CHUNK]
            if not verify:
                found.update(r[0] for r in self._select("key", part, fingerprint))
                continue
            for row in self._select(_COLUMNS, part, fingerprint):
                try:
                    check(Record(*row))
                    found.add(row[0])
                except CorruptEntryError as e:
                    logger.warning("%s; it will be recomputed", e)
        return [k for k in keys if k not in found]

    def summaries(self, keys: Sequence[str], fingerprint: str) -> dict[str, tuple[float, int]]:
        """``key -> (y_hat, n_tokens)`` without reading the blobs (for factor statistics)."""
        return {k: (y, n) for k, y, n in self._select("key, y_hat, n_tokens", list(dict.fromkeys(keys)), fingerprint)}

    def verify(self, fingerprint: str | None = None) -> list[tuple[str, str]]:
        """Checksum every entry (of one fingerprint, or all); return (key, fingerprint) of bad ones."""
        bad = []
        with self._lock:
            conn = self._connection()
            where = " WHERE fingerprint = ?" if fingerprint else ""
            ids = self._retry(lambda: conn.execute(f"SELECT rowid FROM entries{where} ORDER BY rowid",
                                                   [fingerprint] if fingerprint else []).fetchall())
            for s in range(0, len(ids), _IN_CHUNK):  # bounded memory: one slice of blobs at a time
                part = [r[0] for r in ids[s : s + _IN_CHUNK]]
                sql = f"SELECT {_COLUMNS} FROM entries WHERE rowid IN ({','.join('?' * len(part))})"
                for row in self._retry(lambda: conn.execute(sql, part).fetchall()):
                    try:
                        check(Record(*row))
                    except CorruptEntryError:
                        bad.append((row[0], row[1]))
        return bad

    def check_integrity(self) -> None:
        """SQLite's quick_check over the whole file (pages, b-trees); raises CorruptStoreError if it fails.

        Entry checksums (``verify``) catch flipped bytes inside blobs; this catches damage
        to the file's structure that a read of some entries might not touch.
        """
        with self._lock:
            conn = self._connection()
            rows = self._retry(lambda: conn.execute("PRAGMA quick_check").fetchall())
        if [r[0] for r in rows] != ["ok"]:
            raise CorruptStoreError(self.path, "; ".join(str(r[0]) for r in rows[:3]))

    def stats(self) -> StoreStats:
        """Counts and sizes of what the store holds."""
        with self._lock:
            conn = self._connection()
            q = lambda sql: self._retry(lambda: conn.execute(sql).fetchall())  # noqa: E731
            by_fp = dict(q("SELECT fingerprint, count(*) FROM entries GROUP BY fingerprint"))
            by_dtype = dict(q("SELECT dtype, count(*) FROM entries GROUP BY dtype"))
            payload, tokens = q("SELECT coalesce(sum(length(features) + coalesce(length(counts), 0)), 0), "
                                "coalesce(sum(n_tokens), 0) FROM entries")[0]
        files = [self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")]
        return StoreStats(str(self.path), sum(by_fp.values()), by_fp, by_dtype, int(payload),
                          sum(f.stat().st_size for f in files if f.exists()), int(tokens))

    # -- writing ------------------------------------------------------------------------------

    def put(self, key: str, features: ContextFeatures) -> None:
        """Store one entry (replacing any under the same key and fingerprint)."""
        self.put_many([(key, features)])

    def put_many(self, items: Iterable[tuple[str, ContextFeatures]]) -> int:
        """Store entries in one transaction (all or none); returns how many were written.

        Entries are keyed by ``(key, features.fingerprint)`` and replace what was there.
        Raises StoreBusyError when the write lock cannot be had within ``timeout``.
        """
        if self.readonly:
            raise PermissionError(f"{self.path} was opened read-only")
        records = [pack(k, f, self.dtype) for k, f in items]  # serialise outside the lock
        if not records:
            return 0
        now = time.time()
        rows = [(r.key, r.fingerprint, r.dtype, r.rows, r.cols, r.features, r.counts, r.y_hat,
                 r.n_tokens, r.checksum, now) for r in records]
        with self._lock:
            conn = self._connection()

            def txn():
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._insert(conn, rows)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

            self._retry(txn)
        return len(records)

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[tuple]) -> None:
        """The writes of one ``put_many`` transaction (between BEGIN and COMMIT)."""
        conn.executemany(_INSERT, rows)

    def delete(self, keys: Sequence[str], fingerprint: str) -> int:
        """Remove entries; returns how many were removed."""
        if self.readonly:
            raise PermissionError(f"{self.path} was opened read-only")
        keys = list(dict.fromkeys(keys))
        removed = 0
        with self._lock:
            conn = self._connection()

            def txn():
                n = 0
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for s in range(0, len(keys), _IN_CHUNK):
                        part = keys[s : s + _IN_CHUNK]
                        cur = conn.execute(f"DELETE FROM entries WHERE fingerprint = ? AND key IN "
                                           f"({','.join('?' * len(part))})", [fingerprint, *part])
                        n += cur.rowcount
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return n

            removed = self._retry(txn)
        return removed

    # -- read-through -------------------------------------------------------------------------

    def fetch_or_encode(self, compressor, texts: Sequence[str], *, batch_size: int = 16, write_back: bool = True,
                        keys: Sequence[str] | None = None,
                        token_ids: Sequence[Sequence[int]] | None = None) -> FetchResult:
        """Features of ``texts`` for ``compressor``: from the store, misses encoded (and stored).

        Texts are normalised first (the key's normal form), so features always belong to the
        text their key names; ``keys`` (with ``texts`` already normalised) and ``token_ids``
        (the encoder's ids of those texts) spare hashing and tokenizing again. Corrupt entries
        are logged, re-encoded and replaced. On a read-only store the write-back is skipped
        with a warning. Raises CorruptStoreError when the file itself is damaged.
        """
        norm = list(texts) if keys is not None else [normalize_text(t) for t in texts]
        keys = list(keys) if keys is not None else [chunk_key(t) for t in norm]
        fp = compressor.feature_fingerprint
        found = self.get_many(keys, fp, on_corrupt="skip")
        unread = [k for k in dict.fromkeys(keys) if k not in found]
        corrupt = sorted(set(unread) - set(self.missing(unread, fp))) if unread else []
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first position of each key
        miss = [i for k, i in sorted(first.items(), key=lambda x: x[1]) if k not in found]
        if miss:
            encoded = (compressor.encode_ids([token_ids[i] for i in miss], batch_size) if token_ids is not None
                       else compressor.encode([norm[i] for i in miss], batch_size=batch_size))
            new = dict(zip((keys[i] for i in miss), encoded))
            if write_back and self.readonly:
                logger.warning("%s is read-only: %d chunks encoded now are not written back", self.path, len(new))
            elif write_back:
                self.put_many(new.items())
            found.update(new)
        missed = {keys[i] for i in miss}
        hits = sum(1 for k in keys if k not in missed)
        return FetchResult([found[k] for k in keys], keys, hits, len(keys) - hits, corrupt, missed)

