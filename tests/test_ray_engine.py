"""The Ray engine of precompress, on a real local Ray: same store as the local engine, resumption
after a killed job or broken shards, idempotent import of its shards; install hint without Ray."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from semidyn_rag.cli import main
from semidyn_rag.corpus import CorpusDirectory, read_manifest
from semidyn_rag.distributed import list_shards, read_shard, shard_keys
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import write_random_docs

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'semidyn-rag[ray]')")

ARGS = ["--chunk-tokens", "40", "--batch-size", "4", "--no-progress"]
SHARD = 6  # chunks per shard


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    write_random_docs(root, 12, seed=1, words=(4, 14))
    return root


def _precompress(corpus, out, ckpt, *extra) -> int:
    return main(["precompress", str(corpus), "--out", str(out), "--compressor", str(ckpt), *ARGS, *extra])


def _ray(out, *extra) -> list[str]:
    return ["--engine", "ray", "--shard-size", str(SHARD), "--num-workers", "2", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, ckpt):
    """The local engine's directory."""
    out = tmp_path_factory.mktemp("local") / "dir"
    assert _precompress(corpus, out, ckpt) == 0
    return out


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray instance for the module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def through_ray(tmp_path_factory, corpus, ckpt, ray_local):
    """A directory precompressed through Ray (the CLI, on the module's Ray instance)."""
    out = tmp_path_factory.mktemp("ray") / "dir"
    assert _precompress(corpus, out, ckpt, *_ray(out)) == 0
    return out


def _seed(out, reference):
    """Start ``out`` from the reference's chunk table and index, so only the store step runs."""
    out.mkdir(parents=True)
    for name in ("corpus.json", "chunks.parquet", "index.faiss"):
        shutil.copy(reference / name, out / name)
    return out


def _stats(out) -> dict:
    import json

    return json.loads((out / "stats.json").read_text())


def _entries(out) -> dict:
    m = read_manifest(out)
    with CorpusDirectory(out) as cd:
        keys = [c.key for c in cd.chunks(range(len(cd)))]
    with LatentStore(out / "latents.sqlite", readonly=True) as store:
        return store.get_many(keys, m.compressor.feature_fingerprint)


def _assert_same_entries(a, b) -> None:
    ea, eb = _entries(a), _entries(b)
    assert list(ea) == list(eb) and len(ea) == read_manifest(a).chunks
    for k in ea:
        x, y = ea[k], eb[k]
        assert (x.n_tokens, x.fingerprint) == (y.n_tokens, y.fingerprint)
        assert torch.equal(x.counts, y.counts)
        assert x.y_hat == pytest.approx(y.y_hat, abs=1e-5)
        torch.testing.assert_close(x.features, y.features, atol=2e-3, rtol=2e-3)  # fp16 storage, other batches


def _covered(shards_dir) -> set[str]:
    keys: set[str] = set()
    for p in list_shards(shards_dir):
        keys.update(r.key for r in read_shard(p)[1])
    return keys


def test_without_ray_the_command_says_how_to_install(monkeypatch, capsys, corpus, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code = main(["precompress", str(corpus), "--out", str(tmp_path / "d"), "--compressor", str(tmp_path),
                 "--engine", "ray"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pip install 'semidyn-rag[ray]'" in err and "Ray" in err
    assert not (tmp_path / "d").exists()


def test_ray_options_need_the_ray_engine(capsys, corpus, tmp_path):
    code = main(["precompress", str(corpus), "--out", str(tmp_path / "d"), "--compressor", str(tmp_path),
                 "--shards-dir", str(tmp_path / "s"), "--num-workers", "2"])
    assert code == 2 and "--num-workers, --shards-dir only apply to --engine ray" in capsys.readouterr().err


# The child runs the real CLI on a Ray instance of its own. Its driver pauses before ingesting
# each shard, so the SIGKILL below lands midway: some shards in the store, others only on disk
# or not written yet, maybe a shard half-written by a worker.
_CHILD = textwrap.dedent("""
    import sys, time
    import ray
    import semidyn_rag.distributed.ray_engine as engine

    ingest = engine.ingest_shards
    def slowed(*args, **kwargs):
        time.sleep(0.4)
        return ingest(*args, **kwargs)
    engine.ingest_shards = slowed

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    from semidyn_rag.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies are dead already
                pids.append(int(name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the child's session (Ray gives workers process groups of their own)."""
    for _ in range(100):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _stored(store_file) -> int:
    try:
        with sqlite3.connect(f"file:{store_file}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM entries").fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet


@needs_ray
def test_killed_job_resumes_and_ends_equal(request, tmp_path, corpus, ckpt, reference):
    out = _seed(tmp_path / "dir", reference)
    shards = out / "shards"
    n_chunks = read_manifest(reference).chunks
    argv = ["precompress", str(corpus), "--out", str(out), "--compressor", str(ckpt), *ARGS, *_ray(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and child.poll() is None and _stored(out / "latents.sqlite") < SHARD:
            time.sleep(0.05)
    finally:
        _kill_session(child.pid)  # the driver, its Ray and its workers, at once
        child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-3000:]
    child.stderr.close()
    keys = list(_entries(reference))
    with LatentStore(out / "latents.sqlite") as store:
        stored = set(keys) - set(store.missing(keys, read_manifest(reference).compressor.feature_fingerprint))
    done = _covered(shards)
    assert 0 < len(stored) < n_chunks and stored <= done  # killed midway; the store fills from shards only

    request.getfixturevalue("ray_local")
    assert _precompress(corpus, out, ckpt, *_ray(out)) == 0
    stats = _stats(out)
    assert stats["encoded"] == n_chunks - len(done) and stats["reused"] == len(done)
    _assert_same_entries(out, reference)
    assert _covered(shards) == set(keys)
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]  # no temporaries left


@needs_ray
def test_ray_store_equals_local_store(through_ray, reference):
    stats, ref = _stats(through_ray), _stats(reference)
    assert stats["encoded"] == stats["chunks"] == ref["chunks"] and stats["reused"] == 0
    for k in ("tokens", "latents", "histogram", "documents"):
        assert stats[k] == ref[k]
    _assert_same_entries(through_ray, reference)
    shards = list_shards(through_ray / "shards")
    assert len(shards) == -(-stats["chunks"] // SHARD)
    assert sum(read_shard(p)[0].rows for p in shards) == stats["chunks"]
    # a shard holds chunks of similar length: blocks are cut from the length-sorted chunks
    with CorpusDirectory(through_ray) as cd:
        n_tok = {c.key: c.n_tokens for c in cd.chunks(range(len(cd)))}
    spans = sorted((min(n_tok[k] for k in ks), max(n_tok[k] for k in ks)) for ks in (shard_keys(p)[1] for p in shards))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@needs_ray
def test_broken_and_missing_shards_are_redone(tmp_path, corpus, ckpt, through_ray, reference):
    out = _seed(tmp_path / "dir", reference)
    shards = tmp_path / "elsewhere"  # --shards-dir outside the corpus directory
    shutil.copytree(through_ray / "shards", shards)
    files = list_shards(shards)
    lost = read_shard(files[0])[1] + read_shard(files[1])[1]
    files[0].unlink()  # never written
    files[1].write_bytes(files[1].read_bytes()[:1000])  # half-written by a non-atomic copy
    (shards / f".{files[2].name}.elsewhere.1.tmp").write_bytes(b"another host's write in progress")
    assert _precompress(corpus, out, ckpt, *_ray(out, "--shards-dir", str(shards))) == 0
    stats = _stats(out)
    assert stats["encoded"] == len(lost) and stats["reused"] == stats["chunks"] - len(lost)
    _assert_same_entries(out, reference)
    assert not files[1].exists() or read_shard(files[1])  # the broken one was deleted (or rewritten whole)
    assert _covered(shards) == set(_entries(reference))
    assert (shards / f".{files[2].name}.elsewhere.1.tmp").exists()  # not ours to delete


@needs_ray
def test_import_latents_twice_is_a_noop(tmp_path, through_ray, capsys):
    serving = tmp_path / "serving"
    serving.mkdir()
    for name in ("corpus.json", "chunks.parquet", "index.faiss"):
        shutil.copy(through_ray / name, serving / name)
    n = read_manifest(through_ray).chunks
    assert main(["import-latents", str(through_ray / "shards"), "--into", str(serving), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"entries    {n} written, 0 already present" in out and f"{n}/{n} chunks" in out
    ref = _entries(through_ray)
    got = _entries(serving)
    assert list(got) == list(ref)
    assert all(torch.equal(got[k].features, ref[k].features) and got[k].y_hat == ref[k].y_hat for k in ref)
    def rows(d):
        with sqlite3.connect(d / "latents.sqlite") as conn:
            return conn.execute("SELECT key, checksum, created FROM entries ORDER BY key").fetchall()

    assert [r[:2] for r in rows(serving)] == [r[:2] for r in rows(through_ray)]  # the same checksums
    before = rows(serving)
    assert main(["import-latents", str(through_ray / "shards"), "--into", str(serving), "--no-progress"]) == 0
    assert f"entries    0 written, {n} already present" in capsys.readouterr().out
    assert rows(serving) == before
    assert main(["import-latents", str(tmp_path / "none"), "--into", str(serving)]) == 2
    assert main(["import-latents", str(through_ray / "shards"), "--into", str(tmp_path)]) == 2


@needs_ray
def test_a_worker_that_loads_another_compressor_fails_clearly(tmp_path, corpus, ckpt, tiny_config, reference,
                                                              ray_local):
    from semidyn_rag import SemiDynamicCompressor
    from semidyn_rag.corpus import precompress
    from semidyn_rag.distributed import RayEngine, RayEngineError

    torch.manual_seed(7)
    other = tmp_path / "other"
    SemiDynamicCompressor(tiny_config).save_pretrained(other)  # another density head: another fingerprint
    comp = SemiDynamicCompressor.from_pretrained(str(ckpt))
    with pytest.raises(RayEngineError, match="every node must see the same checkpoint.*rerun to resume"):
        precompress(corpus, _seed(tmp_path / "dir", reference), comp, chunk_tokens=40, progress=False,
                    engine=RayEngine(str(other), tmp_path / "shards"))
