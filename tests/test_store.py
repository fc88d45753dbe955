"""LatentStore: exact round trips, read-time rescaling, fingerprints, checksums, processes."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import random
import sqlite3

import pytest
import torch

from semidyn_rag.store import CorruptEntryError, LatentStore, chunk_key, normalize_text
from semidyn_rag.types import ContextFeatures
from tests.conftest import TEXTS


@pytest.fixture(scope="module")
def comp(tiny_config):
    from semidyn_rag import SemiDynamicCompressor

    return SemiDynamicCompressor(tiny_config)


@pytest.fixture(scope="module")
def feats(comp):
    return comp.encode(TEXTS)


def _put(store, feats):
    store.put_many([(chunk_key(t), f) for t, f in zip(TEXTS, feats)])
    return [chunk_key(t) for t in TEXTS]


def test_keys_normalise_layout_only():
    assert normalize_text("  The  Eiffel\n\tTower ") == "The Eiffel Tower"
    assert chunk_key("The  Eiffel\nTower") == chunk_key("The Eiffel Tower")
    assert chunk_key("The Eiffel Tower") != chunk_key("the eiffel tower")
    assert chunk_key("cafe\u0301") == chunk_key("caf\u00e9")  # NFC


def test_round_trip_fp32_is_exact(tmp_path, comp, feats):
    with LatentStore(tmp_path / "s.sqlite", dtype="float32") as store:
        keys = _put(store, feats)
        got = store.get_many(keys, comp.feature_fingerprint)
    assert list(got) == keys
    for f, k in zip(feats, keys):
        g = got[k]
        assert torch.equal(g.features, f.features) and torch.equal(g.counts, f.counts)
        assert (g.y_hat, g.n_tokens, g.fingerprint) == (f.y_hat, f.n_tokens, f.fingerprint)


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_round_trip_half_precision(tmp_path, comp, feats, dtype, tol):
    with LatentStore(tmp_path / "s.sqlite", dtype=dtype) as store:
        keys = _put(store, feats)
        got = store.get_many(keys, comp.feature_fingerprint)
        stats = store.stats()
    assert stats.by_dtype == {dtype: len(TEXTS)} and stats.entries == len(TEXTS)
    for f, k in zip(feats, keys):
        g = got[k]
        want = f.features.to(getattr(torch, dtype)).float()
        assert torch.equal(g.features, want)  # exactly the rounded values
        torch.testing.assert_close(g.features, f.features, rtol=tol, atol=tol)
        assert torch.equal(g.counts, f.counts) and g.y_hat == f.y_hat


def test_fp16_overflow_falls_back_to_fp32(tmp_path, comp, feats):
    big = dataclasses.replace(feats[0], features=feats[0].features * 1e6)
    with LatentStore(tmp_path / "s.sqlite") as store:
        store.put("k", big)
        assert store.stats().by_dtype == {"float32": 1}
        assert torch.equal(store.get("k", big.fingerprint).features, big.features)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 3e-2)])
def test_read_time_rescaling_equals_fresh_compress(tmp_path, comp, feats, dtype, tol):
    with LatentStore(tmp_path / "s.sqlite", dtype=dtype) as store:
        keys = _put(store, feats)
        stored = [store.get(k, comp.feature_fingerprint) for k in keys]
    for kwargs in [dict(scale=s) for s in (-2.0, -1.0, 0.0, 1.0, 2.0)] + [dict(factor=f) for f in (2, 4, 8, 16, 32)]:
        fresh = comp.compress(TEXTS, **kwargs)
        derived = comp.compress_features(stored, **kwargs)
        for a, b in zip(derived, fresh):
            assert a.factor == b.factor and a.n_latents == b.n_latents and a.fingerprint == b.fingerprint
            torch.testing.assert_close(a.latents, b.latents, rtol=tol, atol=tol)
    # the scales above really exercised several factors
    assert len({c.factor for s in (-2.0, 2.0) for c in comp.compress_features(stored, scale=s)}) > 1


def test_stored_features_give_direct_window_means(tmp_path, comp, feats):
    """Coarse windows derived from stored finest windows equal pooling the encoder states at S."""
    with LatentStore(tmp_path / "s.sqlite", dtype="float32") as store:
        stored = [store.get(k, comp.feature_fingerprint) for k in _put(store, feats)]
    ids = comp.encoder.tokenize(TEXTS)
    with torch.inference_mode():
        enc = comp.encoder(ids)
    for factor in (4, 16):
        derived = comp.compress_features(stored, factor=factor)
        for i, ctx in enumerate(derived):
            n = comp.pooling.pooled_length(len(ids[i]))  # the text, and the end marker when it is pooled
            states = enc.hidden[i, enc.text_start : enc.text_start + n]
            pooled = torch.stack([w.mean(0) for w in states.split(factor)])
            with torch.inference_mode():
                direct = comp.projector(pooled)
            torch.testing.assert_close(ctx.latents, direct, rtol=1e-5, atol=1e-5)


def test_other_fingerprint_is_never_returned(tmp_path, comp, feats, make_compressor):
    other = make_compressor()
    assert other.feature_fingerprint != comp.feature_fingerprint
    with LatentStore(tmp_path / "s.sqlite") as store:
        keys = _put(store, feats)
        fp = other.feature_fingerprint
        assert store.get(keys[0], fp) is None
        assert store.get_many(keys, fp) == {}
        assert not store.contains(keys[0], fp) and store.contains(keys[0], comp.feature_fingerprint)
        assert store.missing(keys, fp) == keys
        # read-through for the other compressor encodes with it and keeps both entries apart
        res = store.fetch_or_encode(other, TEXTS)
        assert (res.hits, res.encoded) == (0, len(TEXTS))
        assert all(f.fingerprint == fp for f in res.features)
        assert store.stats().by_fingerprint == {comp.feature_fingerprint: len(TEXTS), fp: len(TEXTS)}
        mine = store.get_many(keys, comp.feature_fingerprint)
    assert all(torch.equal(mine[k].features.half().float(), f.features.half().float()) for k, f in zip(keys, feats))


def _corrupt(path, sql, params=()):
    conn = sqlite3.connect(path)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_corrupt_blob_is_detected_and_recomputed(tmp_path, comp, feats):
    path = tmp_path / "s.sqlite"
    with LatentStore(path) as store:
        keys = _put(store, feats)
    row = sqlite3.connect(path).execute("SELECT features FROM entries WHERE key = ?", (keys[1],)).fetchone()[0]
    flipped = bytearray(row)
    flipped[len(flipped) // 2] ^= 0x10
    _corrupt(path, "UPDATE entries SET features = ? WHERE key = ?", (bytes(flipped), keys[1]))
    _corrupt(path, "UPDATE entries SET y_hat = y_hat + 0.5 WHERE key = ?", (keys[2],))
    fp = comp.feature_fingerprint
    with LatentStore(path) as store:
        with pytest.raises(CorruptEntryError, match="checksum"):
            store.get(keys[1], fp)
        with pytest.raises(CorruptEntryError):
            store.get_many(keys, fp)
        assert set(store.get_many(keys, fp, on_corrupt="skip")) == {keys[0], keys[3]}
        assert sorted(store.verify()) == sorted([(keys[1], fp), (keys[2], fp)])
        assert store.missing(keys, fp) == [] and store.missing(keys, fp, verify=True) == [keys[1], keys[2]]
        res = store.fetch_or_encode(comp, TEXTS)
        assert res.hits == 2 and res.encoded == 2 and sorted(res.corrupt) == sorted([keys[1], keys[2]])
        assert res.encoded_keys == {keys[1], keys[2]}  # corrupt entries count as encoded, not as hits
        assert store.verify() == []
        torch.testing.assert_close(store.get(keys[1], fp).features, feats[1].features, rtol=1e-3, atol=1e-3)


def test_entries_written_with_the_old_sha256_checksum_still_verify(tmp_path, comp, feats):
    from semidyn_rag.store.record import checksum

    path = tmp_path / "s.sqlite"
    with LatentStore(path) as store:
        keys = _put(store, feats)
    cols = "key, fingerprint, dtype, rows, cols, features, counts, y_hat, n_tokens"
    rows = sqlite3.connect(path).execute(f"SELECT {cols}, checksum FROM entries ORDER BY key").fetchall()
    assert all(r[-1].startswith("crc32:") and len(r[-1]) == 14 for r in rows)  # what new entries carry
    for r in rows[:2]:  # rewrite two entries as a store of the sha256 era holds them
        old = checksum(*r[:-1], algorithm="sha256")
        assert len(old) == 64 and old != r[-1]
        _corrupt(path, "UPDATE entries SET checksum = ? WHERE key = ?", (old, r[0]))
    fp = comp.feature_fingerprint
    with LatentStore(path) as store:
        assert store.verify() == [] and set(store.get_many(keys, fp)) == set(keys)
        i = keys.index(rows[0][0])
        torch.testing.assert_close(store.get(keys[i], fp).features, feats[i].features, rtol=1e-3, atol=1e-3)
    _corrupt(path, "UPDATE entries SET y_hat = y_hat + 0.5 WHERE key = ?", (rows[0][0],))
    with LatentStore(path) as store:  # and an old entry that changed is still caught
        assert store.verify() == [(rows[0][0], fp)]
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        checksum(*rows[0][:-1], algorithm="md5")


def test_entry_moved_under_another_key_is_detected(tmp_path, comp, feats):
    path = tmp_path / "s.sqlite"
    with LatentStore(path) as store:
        keys = _put(store, feats[:1] + feats[1:2])[:2]
    _corrupt(path, "DELETE FROM entries WHERE key = ?", (keys[1],))
    _corrupt(path, "UPDATE entries SET key = ? WHERE key = ?", (keys[1], keys[0]))
    with LatentStore(path) as store, pytest.raises(CorruptEntryError):
        store.get(keys[1], comp.feature_fingerprint)


def test_put_many_validates_before_writing(tmp_path, comp, feats):
    bad = dataclasses.replace(feats[1], features=torch.full_like(feats[1].features, float("nan")))
    with LatentStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(ValueError, match="not finite"):
            store.put_many([("a", feats[0]), ("b", bad)])
        assert store.stats().entries == 0  # all or nothing
        with pytest.raises(ValueError, match="storage dtype"):
            LatentStore(tmp_path / "t.sqlite", dtype="int8")
    with pytest.raises(FileNotFoundError):
        LatentStore(tmp_path / "absent.sqlite", readonly=True)


def test_readonly_store_reads_but_refuses_writes(tmp_path, comp, feats):
    with LatentStore(tmp_path / "s.sqlite") as store:
        keys = _put(store, feats)
    with LatentStore(tmp_path / "s.sqlite", readonly=True) as ro:
        assert set(ro.get_many(keys, comp.feature_fingerprint)) == set(keys)
        with pytest.raises(PermissionError):
            ro.put("x", feats[0])


def test_delete_and_stats(tmp_path, comp, feats):
    with LatentStore(tmp_path / "s.sqlite") as store:
        keys = _put(store, feats)
        st = store.stats()
        assert st.tokens == sum(f.n_tokens for f in feats)
        assert st.payload_bytes == sum(f.features.numel() * 2 + f.counts.numel() * 4 for f in feats)
        assert store.delete(keys[:2], comp.feature_fingerprint) == 2
        assert store.missing(keys, comp.feature_fingerprint) == keys[:2]


# -- several processes ----------------------------------------------------------------------------

FP = "f" * 32
N_WRITERS, PER_WRITER, SHARED = 2, 300, 40


def _expected(i: int) -> ContextFeatures:
    g = torch.Generator().manual_seed(i)
    rows = 1 + i % 40  # blobs up to 5 kB: several span SQLite overflow pages
    feats = torch.randint(-512, 512, (rows, 64), generator=g).float() / 64  # exact in fp16
    counts = torch.full((rows,), 2, dtype=torch.long)
    return ContextFeatures(feats, counts, float(i) / 8, 2 * rows, FP)


def _key(i: int) -> str:
    return f"k{i:05d}"


def _writer(store: LatentStore, w: int, errors) -> None:
    try:
        torch.set_num_threads(1)
        ids = list(range(w * PER_WRITER, (w + 1) * PER_WRITER)) + list(range(1000, 1000 + SHARED))
        random.Random(w).shuffle(ids)
        for s in range(0, len(ids), 10):
            store.put_many([(_key(i), _expected(i)) for i in ids[s : s + 10]])
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        errors.put(f"writer {w}: {e!r}")


def _reader(path, r: int, stop, errors, reads) -> None:
    try:
        torch.set_num_threads(1)
        all_ids = list(range(N_WRITERS * PER_WRITER)) + list(range(1000, 1000 + SHARED))
        rng = random.Random(100 + r)
        seen = 0
        with LatentStore(path) as store:
            while not stop.is_set():
                ids = rng.sample(all_ids, 25)
                got = store.get_many([_key(i) for i in ids], FP)  # raises on any corrupt entry
                for i in ids:
                    if _key(i) in got:
                        e, g = _expected(i), got[_key(i)]
                        if not (torch.equal(e.features, g.features) and torch.equal(e.counts, g.counts)
                                and e.y_hat == g.y_hat and e.n_tokens == g.n_tokens):
                            errors.put(f"reader {r}: wrong content for {_key(i)}")
                        seen += 1
        reads.put(seen)
    except BaseException as e:  # noqa: BLE001
        errors.put(f"reader {r}: {e!r}")


def test_concurrent_writers_and_readers_leave_no_corruption(tmp_path):
    path = tmp_path / "s.sqlite"
    ctx = mp.get_context("fork")
    store = LatentStore(path)
    store.put("seed", _expected(9999))  # the parent's connection is open across fork
    errors, reads, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    readers = [ctx.Process(target=_reader, args=(path, r, stop, errors, reads)) for r in range(2)]
    writers = [ctx.Process(target=_writer, args=(store, w, errors)) for w in range(N_WRITERS)]
    for p in readers + writers:
        p.start()
    for p in writers:
        p.join(120)
    stop.set()
    for p in readers:
        p.join(60)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, msgs
    assert all(p.exitcode == 0 for p in readers + writers)
    assert sum(reads.get(timeout=5) for _ in readers) > 0  # readers saw entries while writers wrote
    all_ids = list(range(N_WRITERS * PER_WRITER)) + list(range(1000, 1000 + SHARED))
    got = store.get_many([_key(i) for i in all_ids], FP)
    assert len(got) == len(all_ids)
    assert all(torch.equal(got[_key(i)].features, _expected(i).features) for i in all_ids)
    assert store.stats().entries == len(all_ids) + 1 and store.verify() == []
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


# -- issue 17: damaged files, read-only folders, odd paths, a full disk -----------------------------


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    else:  # pages in the middle overwritten: the header and schema still read
        with open(path, "r+b") as f:
            f.seek(4096 * 3)
            f.write(random.Random(1).randbytes(4096 * 2))


def _filled(tmp_path, feats, n_copies: int = 30):
    """A store with enough entries to span many pages, closed (no WAL left)."""
    path = tmp_path / "s.sqlite"
    with LatentStore(path, dtype="float32") as store:
        store.put_many([(f"k{i}", feats[i % len(feats)]) for i in range(n_copies)])
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_file_is_a_clear_error_naming_it(tmp_path, feats, how):
    """Issue 17.5: a truncated or garbage file raised a bare sqlite3.DatabaseError."""
    from semidyn_rag.store import CorruptStoreError

    path = _filled(tmp_path, feats)
    _damage(path, how)
    for readonly in (False, True):
        with pytest.raises(CorruptStoreError, match="s.sqlite is damaged.*semidyn-rag repair") as e:
            LatentStore(path, readonly=readonly)
        assert e.value.path == path


def test_damaged_pages_are_found_by_the_integrity_check(tmp_path, feats, comp):
    from semidyn_rag.store import CorruptStoreError

    path = _filled(tmp_path, feats)
    _damage(path, "pages")
    with LatentStore(path) as store:  # opens: the header and schema are intact
        with pytest.raises(CorruptStoreError):
            store.check_integrity()
        with pytest.raises(CorruptStoreError):  # and a read through the bad pages says so too
            store.get_many([f"k{i}" for i in range(30)], comp.feature_fingerprint)


def test_an_empty_file_is_not_a_store_for_readers(tmp_path):
    from semidyn_rag.store import CorruptStoreError

    (tmp_path / "s.sqlite").write_bytes(b"")
    with pytest.raises(CorruptStoreError, match="no latent store tables"):
        LatentStore(tmp_path / "s.sqlite", readonly=True)


def test_set_aside_moves_the_file_and_its_wal(tmp_path, feats):
    from semidyn_rag.store import set_aside

    path = tmp_path / "s.sqlite"
    store = LatentStore(path)
    _put(store, feats)  # the open connection keeps the -wal and -shm files
    assert (tmp_path / "s.sqlite-wal").exists()
    aside = set_aside(path)
    store.close()
    assert not path.exists() and not (tmp_path / "s.sqlite-wal").exists()
    assert aside.name.startswith("s.sqlite.corrupt-") and aside.exists()
    assert set_aside(path) != aside  # a second one never overwrites the first


@pytest.mark.parametrize("folder", ["corp#1", "what?x=1", "100%"])
def test_odd_characters_in_the_path_are_quoted_in_the_uri(tmp_path, comp, feats, folder):
    """Issue 17.7: a '#' or '?' cut the read-only URI and SQLite created an empty file at the cut."""
    path = tmp_path / folder / "latents.sqlite"
    with LatentStore(path) as store:
        keys = _put(store, feats)
    before = sorted(p.name for p in tmp_path.iterdir())
    with LatentStore(path, readonly=True) as ro:
        assert set(ro.get_many(keys, comp.feature_fingerprint)) == set(keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no file at a truncated path


def test_readonly_folder_uses_immutable_and_skips_write_back(tmp_path, comp, feats, monkeypatch, caplog):
    """Issue 17.6: a reader that cannot write the folder opens mode=ro (+ immutable=1 without a
    WAL) and a recomputed entry is not written back (a warning says so) instead of failing."""
    import semidyn_rag.store.latent_store as ls
    import semidyn_rag.store.sqlite as sq

    path = tmp_path / "s.sqlite"
    with LatentStore(path) as store:
        keys = _put(store, feats[:2])[:2]
    uris = []
    real = sq.sqlite3.connect
    monkeypatch.setattr(sq.sqlite3, "connect", lambda db, **kw: uris.append(db) or real(db, **kw))
    monkeypatch.setattr(sq.os, "access", lambda p, mode: False)  # a folder and file we may not write
    monkeypatch.setattr(ls, "writable", lambda p: False)
    with LatentStore.for_reading(path) as store:
        assert store.readonly and uris[-1].endswith("?mode=ro&immutable=1")
        res = store.fetch_or_encode(comp, TEXTS)
        assert (res.hits, res.encoded) == (2, len(TEXTS) - 2)
        assert "read-only" in caplog.text and "not written back" in caplog.text
        assert store.missing([chunk_key(t) for t in TEXTS], comp.feature_fingerprint) == \
            [chunk_key(t) for t in TEXTS[2:]]
        assert set(keys) <= set(store.get_many(keys, comp.feature_fingerprint))


def test_full_disk_is_an_oserror_that_keeps_what_was_committed(tmp_path, feats):
    """Issue 17.9: SQLITE_FULL surfaces as StoreFullError (errno ENOSPC) naming the file."""
    import errno

    from semidyn_rag.store import StoreFullError

    path = tmp_path / "s.sqlite"
    with LatentStore(path, dtype="float32") as store:
        store.put_many([("a", feats[0])])
        conn = store._connection()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own way to make the disk 'full'
        with pytest.raises(StoreFullError) as e:
            store.put_many([(f"k{i}", feats[1]) for i in range(20)])
        assert e.value.errno == errno.ENOSPC and "s.sqlite" in str(e.value)
        assert store.stats().entries == 1  # the failed transaction left nothing half-written
