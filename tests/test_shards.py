"""Latent shards and their ingestion: format checks, atomic writes, idempotent import."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from semidyn_rag.distributed import (
    InvalidShardError,
    ingest_shards,
    list_shards,
    read_shard,
    remove_stale_temporaries,
    shard_info,
    shard_keys,
    shard_name,
    write_shard,
)
from semidyn_rag.store import LatentStore, chunk_key, pack
from semidyn_rag.types import ContextFeatures

FP = "f" * 32


def _features(i: int, fp: str = FP, rows: int = 3, width: int = 8) -> ContextFeatures:
    g = torch.Generator().manual_seed(i)
    return ContextFeatures(torch.randn(rows, width, generator=g), torch.full((rows,), 2, dtype=torch.long),
                           0.5 + i / 10, 2 * rows, fp)


def _records(n: int, fp: str = FP, dtype: str = "float16", start: int = 0):
    return [pack(chunk_key(f"chunk {i}"), _features(i, fp), dtype) for i in range(start, start + n)]


def _store_rows(path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT key, fingerprint, checksum, created FROM entries ORDER BY key").fetchall()


def test_roundtrip_keeps_records_and_names_by_content(tmp_path):
    recs = _records(5)
    info = write_shard(tmp_path, recs)
    assert info.name == shard_name(FP, [r.key for r in recs]) and info.rows == 5
    assert write_shard(tmp_path, recs).path == info.path  # same chunks, same file
    assert shard_name(FP, [r.key for r in recs[::-1]]) != info.name
    got_info, got = read_shard(info.path)
    assert got == recs and got_info == info
    assert shard_keys(info.path)[1] == [r.key for r in recs]
    assert list_shards(tmp_path) == [info.path] and not list(tmp_path.glob(".*"))  # no temporaries left


def test_write_refuses_what_is_not_one_shard(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        write_shard(tmp_path, [])
    with pytest.raises(ValueError, match="one fingerprint"):
        write_shard(tmp_path, _records(2) + _records(1, fp="e" * 32, start=5))
    with pytest.raises(ValueError, match="each key once"):
        write_shard(tmp_path, _records(2) + _records(1))


def test_truncated_shard_is_invalid(tmp_path):
    path = write_shard(tmp_path, _records(4)).path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidShardError, match="truncated"):
        read_shard(path)
    path.write_bytes(b"")
    with pytest.raises(InvalidShardError, match="not a complete Parquet file"):
        shard_info(path)


def test_flipped_byte_and_foreign_files_are_invalid(tmp_path):
    recs = _records(3)
    path = write_shard(tmp_path, recs).path
    # same footer, one feature byte changed: the row's checksum catches it
    table = pq.read_table(path)
    blob = bytearray(recs[1].features)
    blob[5] ^= 0xFF
    feats = table.column("features").to_pylist()
    feats[1] = bytes(blob)
    bad = table.set_column(table.schema.get_field_index("features"), "features", pa.array(feats, pa.large_binary()))
    pq.write_table(bad, path)
    with pytest.raises(InvalidShardError, match="checksum mismatch"):
        read_shard(path)
    # a row dropped: the footer's row count no longer matches
    pq.write_table(table.slice(0, 2), path)
    with pytest.raises(InvalidShardError, match="2 rows but the footer says 3"):
        shard_info(path)
    # a Parquet file that is not a shard
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(InvalidShardError, match="not a latent shard"):
        shard_info(tmp_path / "other.parquet")


def test_stale_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"dead": f".a.parquet.{host}.{dead.pid}.tmp", "live": f".b.parquet.{host}.{os.getpid()}.tmp",
             "other_host": f".c.parquet.elsewhere.{dead.pid}.tmp"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["other_host"]])
    assert list_shards(tmp_path) == []


def test_ingest_gives_the_store_checksums_and_twice_is_a_noop(tmp_path):
    recs = _records(6)
    write_shard(tmp_path / "shards", recs[:4])
    write_shard(tmp_path / "shards", recs[3:])  # one key in two shards
    with LatentStore(tmp_path / "s.sqlite") as store:
        first = ingest_shards(tmp_path / "shards", store)
        assert (first.shards, first.records, first.written, first.present) == (2, 7, 6, 1)
        assert first.by_fingerprint == {FP: 7} and first.keys == {r.key for r in recs}
        before = _store_rows(store.path)
        assert [(k, c) for k, _, c, _ in before] == sorted((r.key, r.checksum) for r in recs)
        got = store.get_many([r.key for r in recs], FP)
        assert all(torch.equal(got[r.key].features, _features(i).features.half().float()) for i, r in enumerate(recs))
        second = ingest_shards(tmp_path / "shards", store)
        assert (second.shards, second.written, second.present) == (2, 0, 7)
        assert _store_rows(store.path) == before  # nothing rewritten, not even the timestamps


def test_ingest_converts_to_the_store_dtype(tmp_path):
    recs = _records(2, dtype="float32")
    write_shard(tmp_path, recs)
    with LatentStore(tmp_path / "s.sqlite", dtype="float16") as store:
        assert ingest_shards(tmp_path, store).written == 2
        assert store.stats().by_dtype == {"float16": 2}
        expect = sorted((r.key, pack(r.key, _features(i), "float16").checksum) for i, r in enumerate(recs))
        assert [(k, c) for k, _, c, _ in _store_rows(store.path)] == expect


def test_ingest_replaces_a_corrupt_store_entry(tmp_path):
    recs = _records(3)
    write_shard(tmp_path / "shards", recs)
    with LatentStore(tmp_path / "s.sqlite") as store:
        ingest_shards(tmp_path / "shards", store)
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE entries SET y_hat = y_hat + 1 WHERE key = ?", (recs[0].key,))
        assert store.verify() == [(recs[0].key, FP)]
        again = ingest_shards(tmp_path / "shards", store)
        assert (again.written, again.present) == (1, 2) and store.verify() == []


def test_ingest_filters_by_keys_and_fingerprint(tmp_path):
    write_shard(tmp_path, _records(3))
    other = _records(2, fp="e" * 32, start=10)
    write_shard(tmp_path, other)
    with LatentStore(tmp_path / "s.sqlite") as store:
        rep = ingest_shards(tmp_path, store, fingerprint="e" * 32)
        assert (rep.shards, rep.filtered_shards, rep.written) == (1, 1, 2)
        rep = ingest_shards(tmp_path, store, keys={_records(1)[0].key})
        assert (rep.records, rep.written, rep.filtered_shards) == (1, 1, 1)
        assert store.stats().by_fingerprint == {FP: 1, "e" * 32: 2}


def test_ingest_on_invalid_raises_skips_or_deletes(tmp_path):
    good = write_shard(tmp_path, _records(2)).path
    bad = write_shard(tmp_path, _records(2, start=5)).path
    bad.write_bytes(bad.read_bytes()[:100])
    with LatentStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(InvalidShardError, match=bad.name):
            ingest_shards([bad, good], store)
        with pytest.raises(ValueError, match="on_invalid"):
            ingest_shards(tmp_path, store, on_invalid="ignore")
        rep = ingest_shards(tmp_path, store, on_invalid="skip")
        assert rep.written == 2 and [p for p, _ in rep.invalid] == [str(bad)] and bad.exists()
        rep = ingest_shards(tmp_path, store, on_invalid="delete")
        assert rep.written == 0 and len(rep.invalid) == 1 and not bad.exists() and good.exists()
    with pytest.raises(FileNotFoundError, match="no shard"):
        list_shards(tmp_path / "nothing")
