"""The precompress and query commands: stats, resumption after kill -9, corrupt entries, answers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from semidyn_rag.cli import main
from semidyn_rag.corpus import CorpusDirectory, Embedder, load_index, read_manifest
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import write_random_docs




@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    write_random_docs(root, 16, seed=0, words=(5, 12))
    (root / "eiffel.txt").write_text("The Eiffel Tower is in Paris, the capital of France.")
    (root / "copy.txt").write_text((root / "doc00.txt").read_text())
    (root / "empty.txt").write_text("\n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (root / "latin1.md").write_bytes(b"na\xefve")
    return root


ARGS = ["--chunk-tokens", "40", "--batch-size", "4", "--no-progress"]


def _precompress(corpus, out, ckpt, *extra):
    return main(["precompress", str(corpus), "--out", str(out), "--compressor", str(ckpt), *ARGS, *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, ckpt):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "dir"
    assert _precompress(corpus, out, ckpt) == 0
    return out


def _entries(out):
    with LatentStore(out / "latents.sqlite", readonly=True) as store:
        fp = read_manifest(out).compressor.feature_fingerprint
        keys = [c.key for c in CorpusDirectory(out).chunks(range(read_manifest(out).chunks))]
        return store.get_many(keys, fp)


def test_stats_describe_the_run(reference, corpus, ckpt):
    from semidyn_rag import SemiDynamicCompressor

    stats = json.loads((reference / "stats.json").read_text())
    assert stats["documents"] == 18 and stats["skipped"] == 3
    assert stats["skipped_by_reason"] == {"binary": 1, "empty": 1, "not-utf8": 1}
    assert any("latin1.md: not valid UTF-8" in m for m in stats["skipped_inputs"])
    assert stats["duplicate_chunks"] > 0 and stats["encoded"] == stats["chunks"] and stats["reused"] == 0
    assert sum(stats["histogram"].values()) == stats["chunks"] and stats["histogram_of"] == "factor"
    assert stats["bytes_on_disk"]["total"] == sum(v for k, v in stats["bytes_on_disk"].items() if k != "total") > 0
    manifest = read_manifest(reference)
    assert manifest.compressor.path == str(ckpt.resolve()) and manifest.chunks == stats["chunks"]
    # tokens, latents and factors agree with compressing every chunk at the recorded scale
    comp = SemiDynamicCompressor.from_pretrained(str(ckpt))
    assert manifest.compressor.fingerprint == comp.fingerprint
    with CorpusDirectory(reference) as cd:
        chunks = cd.chunks(range(len(cd)))
        ctxs, fetched = cd.contexts(chunks, comp, scale=stats["scale"])
    assert fetched.encoded == 0
    assert stats["tokens"] == sum(c.n_tokens for c in ctxs)
    assert stats["latents"] == sum(c.n_latents for c in ctxs)
    assert stats["histogram"] == {str(f): sum(c.factor == f for c in ctxs) for f in sorted({c.factor for c in ctxs})}
    assert all(c.n_tokens <= 40 for c in ctxs)


def test_rerun_encodes_nothing_and_rewrites_nothing(reference, corpus, ckpt, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir() if p.suffix in (".parquet", ".faiss")}
    assert _precompress(corpus, reference, ckpt) == 0
    out = capsys.readouterr().out
    stats = json.loads((reference / "stats.json").read_text())
    assert stats["encoded"] == 0 and stats["reused"] == stats["chunks"]
    assert "0 this run" in out and "documents  18" in out
    assert before == {p.name: p.stat().st_mtime_ns for p in reference.iterdir() if p.suffix in (".parquet", ".faiss")}


# Runs the real CLI in a child process, with each store transaction held open for a while, so
# that SIGKILL lands inside one (uncommitted rows must vanish) rather than between batches.
_SLOW_CHILD = """
import sys, time
from semidyn_rag.store.latent_store import LatentStore
real = LatentStore._insert
def slow(conn, rows):
    real(conn, rows)
    time.sleep(0.4)
LatentStore._insert = staticmethod(slow)
from semidyn_rag.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, corpus, ckpt, reference):
    out = tmp_path / "dir"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _SLOW_CHILD, "precompress", str(corpus), "--out", str(out),
           "--compressor", str(ckpt), *ARGS]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = out / "latents.sqlite"
    deadline, committed = time.monotonic() + 120, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    committed = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute(
                        "SELECT count(*) FROM entries").fetchone()[0]
                except sqlite3.OperationalError:
                    committed = 0  # schema not created yet
                if committed >= 8:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"precompress ended before it could be killed: {proc.communicate()[1][-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    total = read_manifest(reference).chunks
    left = sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0]
    assert 8 <= left < total and left % 4 == 0  # whole batches only: the open transaction vanished

    assert _precompress(corpus, out, ckpt) == 0  # resume
    stats = json.loads((out / "stats.json").read_text())
    assert stats["encoded"] == total - left and stats["reused"] == left

    ref_stats = json.loads((reference / "stats.json").read_text())
    for k in ("documents", "chunks", "tokens", "latents", "histogram", "skipped_by_reason", "duplicate_chunks"):
        assert stats[k] == ref_stats[k], k
    import pyarrow.parquet as pq

    assert pq.read_table(out / "chunks.parquet").equals(pq.read_table(reference / "chunks.parquet"))
    a, b = load_index(out / "index.faiss"), load_index(reference / "index.faiss")
    np.testing.assert_allclose(a.reconstruct_n(0, a.ntotal), b.reconstruct_n(0, b.ntotal), atol=1e-6)
    got, want = _entries(out), _entries(reference)
    assert list(got) == list(want) and len(got) == total
    for k in want:
        g, w = got[k], want[k]
        assert g.n_tokens == w.n_tokens and torch.equal(g.counts, w.counts)
        assert abs(g.y_hat - w.y_hat) < 1e-4
        torch.testing.assert_close(g.features, w.features, rtol=2e-3, atol=2e-3)
    assert LatentStore(db).verify() == []


def test_corrupt_entry_is_recomputed_by_precompress(tmp_path, corpus, ckpt, reference):
    import shutil

    out = tmp_path / "dir"
    shutil.copytree(reference, out)
    db = out / "latents.sqlite"
    conn = sqlite3.connect(db)
    key, blob = conn.execute("SELECT key, features FROM entries LIMIT 1").fetchone()
    conn.execute("UPDATE entries SET features = ? WHERE key = ?", (bytes(len(blob)), key))
    conn.commit()
    conn.close()
    assert _precompress(corpus, out, ckpt) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["recomputed_corrupt"] == 1 and stats["encoded"] == 1
    assert LatentStore(db).verify() == []


def test_missing_compressor_and_empty_corpus_are_clear_errors(tmp_path, ckpt, capsys, monkeypatch):
    import semidyn_rag.default_compressor

    monkeypatch.setattr(semidyn_rag.default_compressor, "SHIPPED_COMPRESSOR", tmp_path / "no-such-checkpoint")
    assert main(["precompress", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no compressor given and no trained embedded default is installed: pass --compressor CKPT" \
        in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "e.txt").write_text("")
    assert main(["precompress", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--compressor", str(ckpt),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "yielded no text" in err and "e.txt: empty" in err
    assert main(["query", str(tmp_path / "nothing"), "q"]) == 1
    assert "not a corpus directory" in capsys.readouterr().err


def _query(out, *extra, capsys):
    assert main(["query", str(out), "Where is the Eiffel Tower?", "-k", "3", "--json", "--max-new-tokens", "8",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_query_answers_from_stored_latents(reference, ckpt, capsys):
    from semidyn_rag import SemiDynamicCompressor

    res = _query(reference, capsys=capsys)
    comp = SemiDynamicCompressor.from_pretrained(str(ckpt))
    with CorpusDirectory(reference, embedder=Embedder()) as cd:
        hits = cd.search("Where is the Eiffel Tower?", k=3)
        ctxs, _ = cd.contexts(hits, comp)
        answer = comp.generate("Where is the Eiffel Tower?", ctxs, max_new_tokens=8)
    assert res["answer"] == answer.strip()
    assert [s["chunk_id"] for s in res["sources"]] == [h.chunk.chunk_id for h in hits]
    assert res["sources"][0]["doc_id"] == "eiffel.txt"
    c = res["compression"]
    assert (c["store_hits"], c["encoded"]) == (3, 0)
    assert c["tokens"] == sum(x.n_tokens for x in ctxs) and c["latents"] == sum(x.n_latents for x in ctxs)
    # another scale: more compression, still no encoding
    res2 = _query(reference, "--scale", "2", capsys=capsys)
    assert res2["compression"]["encoded"] == 0 and res2["compression"]["latents"] < c["latents"]
    # text output names the answer, the sources and the stats
    assert main(["query", str(reference), "Where is the Eiffel Tower?", "-k", "2", "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "Answer:" in text and "Sources:" in text and "eiffel.txt" in text and "Compression: 2 contexts" in text


def test_query_encodes_misses_and_writes_them_back(tmp_path, reference, ckpt, capsys):
    import shutil

    out = tmp_path / "dir"
    shutil.copytree(reference, out)
    first = _query(out, capsys=capsys)
    keys = [c.key for c in CorpusDirectory(out).chunks([s["chunk_id"] for s in first["sources"]])]
    fp = read_manifest(out).compressor.feature_fingerprint
    with LatentStore(out / "latents.sqlite") as store:
        assert store.delete(keys[:2], fp) == 2
    res = _query(out, capsys=capsys)
    assert (res["compression"]["store_hits"], res["compression"]["encoded"]) == (1, 2)
    assert res["answer"] == first["answer"]
    with LatentStore(out / "latents.sqlite") as store:
        assert store.missing(keys, fp) == []
