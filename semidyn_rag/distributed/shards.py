"""Latent shards: Parquet files of store records, the hand-off between encoders and stores.

A cluster encodes a corpus once into shards; any number of machines then load them into their
own ``LatentStore`` (``semidyn-rag import-latents``). One row is one ``store.record.Record``,
packed by the same ``record.pack``, so a row's checksum is the one the store computes.

Format (``FORMAT_VERSION`` 1), one Parquet file per shard::

    key          string   sha256 (hex) of the normalised chunk text
    fingerprint  string   feature fingerprint of the compressor that encoded it
    dtype        string   float16 | bfloat16 | float32: element type of ``features``
    rows         int64    feature rows (finest windows / kept states)
    cols         int64    feature width (encoder hidden size)
    features     binary   rows x cols little-endian values, row-major
    counts       binary   int32 tokens per finest window (mean pooling), else null
    y_hat        float64  predicted log2 compression factor
    n_tokens     int64    source tokens of the chunk
    checksum     string   CRC-32 over all of the above (``store.record.checksum``)

The Parquet footer carries ``semidyn_rag.shard`` (JSON): format, version, row count, the
fingerprint, sha256 over the keys in row order and over the checksums in row order. A shard
is valid when its footer parses, every count and digest agrees and every row passes its
checksum; a truncated file has no footer and is rejected. Shards are written to a temporary
name and renamed into place, so a finished name always holds a whole file. A shard's name is
``<fingerprint[:12]>-<keys digest[:24]>.parquet``: the same chunks give the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..store.record import CorruptEntryError, Record, check

FORMAT = "semidyn-rag-latent-shard"
FORMAT_VERSION = 1
META_KEY = b"semidyn_rag.shard"
SUFFIX = ".parquet"

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("fingerprint", pa.string()),
    ("dtype", pa.string()),
    ("rows", pa.int64()),
    ("cols", pa.int64()),
    ("features", pa.large_binary()),
    ("counts", pa.large_binary()),
    ("y_hat", pa.float64()),
    ("n_tokens", pa.int64()),
    ("checksum", pa.string()),
])
_FIELDS = SCHEMA.names


class InvalidShardError(RuntimeError):
    """A shard file is incomplete, corrupt or not a shard: it must be rewritten (or skipped)."""

    def __init__(self, path: str | os.PathLike, why: str):
        super().__init__(f"latent shard {path} is invalid: {why}")
        self.path, self.why = str(path), why


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's footer says about it."""

    path: Path
    rows: int
    fingerprint: str
    keys_digest: str
    checksums_digest: str

    @property
    def name(self) -> str:
        return self.path.name


def _digest(values: Sequence[str]) -> str:
    h = hashlib.sha256()
    for v in values:
        h.update(v.encode())
        h.update(b"\n")
    return h.hexdigest()


def shard_name(fingerprint: str, keys: Sequence[str]) -> str:
    """The file name of the shard holding ``keys`` (in this order) under ``fingerprint``."""
    return f"{fingerprint[:12]}-{_digest(keys)[:24]}{SUFFIX}"


def write_shard(folder: str | os.PathLike, records: Sequence[Record]) -> ShardInfo:
    """Write ``records`` (one fingerprint) as a shard in ``folder``, atomically; return its info.

    The file goes to a temporary name (host and pid in it), is fsynced and renamed into place.
    Raises ValueError for no records, several fingerprints or a repeated key.
    """
    if not records:
        raise ValueError("a shard needs at least one record")
    fps = {r.fingerprint for r in records}
    if len(fps) != 1:
        raise ValueError(f"a shard holds one fingerprint, got {len(fps)}: {sorted(fps)[:3]}")
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        raise ValueError("a shard holds each key once")
    fp = fps.pop()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rows": len(records), "fingerprint": fp,
            "keys_digest": _digest(keys), "checksums_digest": _digest([r.checksum for r in records])}
    table = pa.table({f: [getattr(r, f) for r in records] for f in _FIELDS}, schema=SCHEMA)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / shard_name(fp, keys)
    with atomic_path(target) as tmp:
        # float blobs barely compress; plain pages keep writing and reading cheap
        pq.write_table(table, tmp, compression="none", row_group_size=max(1, len(records)))
    return ShardInfo(target, meta["rows"], fp, meta["keys_digest"], meta["checksums_digest"])


def shard_info(path: str | os.PathLike) -> ShardInfo:
    """The footer of the shard at ``path``, checked against the file's row count (rows unread).

    Raises InvalidShardError for a truncated or foreign file and a count that disagrees.
    """
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise InvalidShardError(path, f"not a complete Parquet file (truncated?): {e}") from None
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    if raw is None:
        raise InvalidShardError(path, f"no {META_KEY.decode()} footer: not a latent shard")
    try:
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise InvalidShardError(path, f"format {meta.get('format')!r} is not {FORMAT!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise InvalidShardError(path, f"written by a newer semidyn-rag (format {meta['format_version']})")
        info = ShardInfo(path, int(meta["rows"]), str(meta["fingerprint"]), str(meta["keys_digest"]),
                         str(meta["checksums_digest"]))
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidShardError(path, f"unreadable footer: {e}") from None
    missing = [f for f in _FIELDS if f not in pf.schema_arrow.names]
    if missing:
        raise InvalidShardError(path, f"columns {missing} are missing")
    if pf.metadata.num_rows != info.rows:
        raise InvalidShardError(path, f"{pf.metadata.num_rows} rows but the footer says {info.rows}")
    return info


def shard_keys(path: str | os.PathLike) -> tuple[ShardInfo, list[str]]:
    """The footer and the keys of a shard, reading only the key column.

    Raises InvalidShardError as ``shard_info`` does, and when the keys disagree with the footer.
    """
    info = shard_info(path)
    try:
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise InvalidShardError(path, f"cannot read its keys: {e}") from None
    if _digest(keys) != info.keys_digest:
        raise InvalidShardError(path, "its keys do not match the footer's digest")
    return info, keys


def read_shard(path: str | os.PathLike) -> tuple[ShardInfo, list[Record]]:
    """Every record of the shard at ``path``, each verified against its checksum.

    Raises InvalidShardError when the file, the footer or any row fails a check.
    """
    info = shard_info(path)
    try:
        table = pq.read_table(path, columns=_FIELDS)
    except (OSError, pa.ArrowException) as e:
        raise InvalidShardError(path, f"cannot read its rows: {e}") from None
    cols = [table.column(f).to_pylist() for f in _FIELDS]
    records = [Record(*row) for row in zip(*cols)]
    if len(records) != info.rows:
        raise InvalidShardError(path, f"{len(records)} rows but the footer says {info.rows}")
    if _digest([r.key for r in records]) != info.keys_digest:
        raise InvalidShardError(path, "its keys do not match the footer's digest")
    if _digest([r.checksum for r in records]) != info.checksums_digest:
        raise InvalidShardError(path, "its row checksums do not match the footer's digest")
    for r in records:
        if r.fingerprint != info.fingerprint:
            raise InvalidShardError(path, f"row {r.key[:16]}... has fingerprint {r.fingerprint}, "
                                          f"the footer {info.fingerprint}")
        try:
            check(r)
        except CorruptEntryError as e:
            raise InvalidShardError(path, str(e)) from None
    return info, records


def list_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard files of a folder (sorted; temporaries skipped) or the given files.

    Raises FileNotFoundError for a path that does not exist.
    """
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.glob(f"*{SUFFIX}") if not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no shard or folder of shards at {p}")
    return out
