"""Issue 17 through the command line: bad values refused, damage repaired, failures as clean errors.

Each test reproduces one defect a hostile-user battery found (it failed before the fix): NaN or
huge scales, a corrupt index or store, a read-only directory, an existing file as ``--out``, a
full disk, Ctrl-C and SIGTERM, empty questions and untrained factors. Store-level cases are in
``test_store.py``, the selector's in ``test_selector.py``, chunking's in ``test_corpus.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from semidyn_rag.cli import main
from semidyn_rag.corpus import CorpusDirectory, load_index, read_manifest
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import write_random_docs

ARGS = ["--chunk-tokens", "40", "--batch-size", "4", "--no-progress"]
QUESTION = "Where is the Eiffel Tower?"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    write_random_docs(root, 12, seed=3, words=(5, 12))
    (root / "eiffel.txt").write_text("The Eiffel Tower is in Paris, the capital of France.")
    return root


def _precompress(corpus, out, ckpt, *extra):
    return main(["precompress", str(corpus), "--out", str(out), "--compressor", str(ckpt), *ARGS, *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, ckpt):
    out = tmp_path_factory.mktemp("ref") / "dir"
    assert _precompress(corpus, out, ckpt) == 0
    return out


@pytest.fixture
def copy(reference, tmp_path):
    out = tmp_path / "dir"
    shutil.copytree(reference, out)
    return out


def _query(out, *extra):
    return main(["query", str(out), QUESTION, "-k", "3", "--json", "--max-new-tokens", "4", *extra])


def _entries(out) -> int:
    return sqlite3.connect(out / "latents.sqlite").execute("SELECT count(*) FROM entries").fetchone()[0]


# -- 2, 3, 10: values that must never pass ---------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_every_command_refuses_a_non_finite_scale(tmp_path, reference, ckpt, corpus, value, capsys):
    for argv in (["query", str(reference), QUESTION, "--scale", value],
                 ["precompress", str(corpus), "--out", str(tmp_path / "new"), "--scale", value],
                 ["eval", "--dataset", "d.jsonl", "--compressor", str(ckpt), "--out", str(tmp_path / "e"),
                  "--scales", value]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "finite" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # 3: nothing written for a refused scale


def test_precompress_api_refuses_nan_before_writing(tmp_path, compressor, corpus):
    from semidyn_rag.corpus import precompress

    with pytest.raises(ValueError, match="scale"):
        precompress(corpus, tmp_path / "out", compressor, scale=float("nan"), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_huge_scale_gives_the_most_compression(reference, capsys):
    assert _query(reference, "--scale", "1e9") == 0
    assert set(json.loads(capsys.readouterr().out)["compression"]["factors"]) == {"32"}
    assert _query(reference, "--scale", "-1e9") == 0
    assert set(json.loads(capsys.readouterr().out)["compression"]["factors"]) == {"2"}


def test_empty_question_and_untrained_factor_are_refused(reference, capsys):
    for q in ("", "   "):
        with pytest.raises(SystemExit) as e:
            main(["query", str(reference), q])
        assert e.value.code == 2 and "empty" in capsys.readouterr().err
    assert _query(reference, "--factor", "64") == 2
    assert "--factor 64 is not a factor this compressor was trained on; use one of 2, 4, 8, 16, 32" \
        in capsys.readouterr().err


@pytest.mark.parametrize("content,expect", [
    ("{not json", "corpus.json is not valid JSON"),
    ('"scale": null', "corpus.json has invalid fields: scale"),
    ('"chunks": "many"', "corpus.json has invalid fields: chunks"),
])
def test_a_damaged_manifest_is_a_clear_error(copy, content, expect, capsys):
    m = copy / "corpus.json"
    if content.startswith("{"):
        m.write_text(content)
    else:
        raw = json.loads(m.read_text())
        key, value = content.split(": ")
        raw[json.loads(key)] = json.loads(value)
        m.write_text(json.dumps(raw))
    assert _query(copy) == 1
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


# -- 4, 5: a damaged index or store is detected and rebuilt -----------------------------------------


def test_a_garbage_or_short_index_is_rebuilt_on_rerun(copy, corpus, ckpt, capsys):
    n = read_manifest(copy).chunks
    (copy / "index.faiss").write_bytes(os.urandom(4000))
    assert _query(copy) == 1
    err = capsys.readouterr().err
    assert "index.faiss cannot be read" in err and "semidyn-rag repair" in err
    assert _precompress(corpus, copy, ckpt) == 0
    assert load_index(copy / "index.faiss").ntotal == n
    assert json.loads((copy / "stats.json").read_text())["encoded"] == 0  # the store was fine
    # an index that reads but holds the wrong number of vectors is rebuilt too
    from semidyn_rag.corpus import build_index, save_index

    save_index(build_index(load_index(copy / "index.faiss").reconstruct_n(0, 3)), copy / "index.faiss")
    assert _query(copy) == 1 and "holds 3 vectors" in capsys.readouterr().err
    assert _precompress(corpus, copy, ckpt) == 0 and load_index(copy / "index.faiss").ntotal == n
    assert _query(copy) == 0


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_query_on_a_damaged_store_encodes_with_a_warning(copy, capsys, caplog):
    _truncate(copy / "latents.sqlite")
    assert _query(copy) == 0
    c = json.loads(capsys.readouterr().out)["compression"]
    assert (c["store_hits"], c["encoded"]) == (0, 3)
    assert "latents.sqlite is damaged" in caplog.text and f"semidyn-rag repair {copy}" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_precompress_rerun_moves_a_damaged_store_aside(copy, corpus, ckpt, reference, damage, caplog):
    db = copy / "latents.sqlite"
    if damage == "truncated":
        _truncate(db)
    else:
        db.write_bytes(os.urandom(db.stat().st_size))
    assert _precompress(corpus, copy, ckpt) == 0
    aside = [p.name for p in copy.iterdir() if p.name.startswith("latents.sqlite.corrupt-")
             and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and f"moved it to {aside[0]}" in caplog.text
    assert _entries(copy) == _entries(reference) and LatentStore(db).verify() == []
    assert json.loads((copy / "stats.json").read_text())["encoded"] == _entries(reference)


def test_repair_rebuilds_index_and_store_from_the_chunk_table(copy, reference, capsys):
    (copy / "index.faiss").write_bytes(b"")
    _truncate(copy / "latents.sqlite")
    assert main(["repair", str(copy), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "repaired" in out and "index      rebuilt" in out and "moved to latents.sqlite.corrupt-" in out
    assert _entries(copy) == _entries(reference) and load_index(copy / "index.faiss").ntotal == _entries(reference)
    assert _query(copy) == 0
    assert json.loads(capsys.readouterr().out)["compression"]["store_hits"] == 3
    assert main(["repair", str(copy), "--no-progress"]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    (copy / "chunks.parquet").write_bytes(b"PAR1 garbage")  # the source of repairs: precompress is the way out
    assert main(["repair", str(copy), "--no-progress"]) == 1
    assert "rerun precompress" in capsys.readouterr().err


# -- 6, 7: read-only directories and odd paths -------------------------------------------------------


def test_query_in_a_read_only_folder_with_a_hash_in_its_name(reference, tmp_path, monkeypatch, capsys, caplog):
    import semidyn_rag.store.latent_store as ls
    import semidyn_rag.store.sqlite as sq

    out = tmp_path / "corp#1"
    shutil.copytree(reference, out)
    fp = read_manifest(out).compressor.feature_fingerprint
    with CorpusDirectory(out) as cd:
        hits = cd.search(QUESTION, k=3)
        assert cd.store.delete([hits[0].chunk.key], fp) == 1
    monkeypatch.setattr(ls, "writable", lambda p: False)  # as a reader without write permission sees it
    monkeypatch.setattr(sq.os, "access", lambda p, mode: False)
    assert _query(out) == 0
    c = json.loads(capsys.readouterr().out)["compression"]
    assert (c["store_hits"], c["encoded"]) == (2, 1)
    assert "not written back" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corp#1"]  # no empty file at "corp"
    with LatentStore(out / "latents.sqlite") as store:
        assert not store.contains(hits[0].chunk.key, fp)


def _can_drop_root_write_access() -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    probe = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "true"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_drop_root_write_access(), reason="needs root and setpriv to make a folder read-only")
def test_query_in_a_really_read_only_folder(reference, tmp_path, ckpt):
    """Issue 17.6 as it happened: SQLite refused to open the store read-write in a folder without
    write permission (as root, permissions are only enforced once DAC_OVERRIDE is dropped)."""
    out = tmp_path / "ro"
    shutil.copytree(reference, out)
    for p in [out, *out.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        proc = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable,
                               "-m", "semidyn_rag.cli", "query", str(out), QUESTION, "-k", "2", "--json",
                               "--max-new-tokens", "2"], env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["compression"]["store_hits"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


# -- 9: clean errors: existing files, YAML, a full disk, signals ----------------------------------


def test_out_that_is_an_existing_file_is_refused(tmp_path, corpus, ckpt, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    for argv in (["precompress", str(corpus), "--out", str(f), "--compressor", str(ckpt)],
                 ["eval", "--dataset", "d.jsonl", "--compressor", str(ckpt), "--out", str(f)],
                 ["export", str(ckpt), str(f)],
                 ["precompress", str(corpus), "--out", str(f / "sub"), "--compressor", str(ckpt)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "taken" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_invalid_yaml_train_config_names_the_file_and_line(tmp_path, caplog, capsys):
    bad = tmp_path / "train.yaml"
    bad.write_text("output_dir: runs/x\noptim:\n  lr: [1e-4\n  max_steps: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"{bad} is not valid YAML" in caplog.text and "line" in caplog.text
    bad.write_bytes(b"\xff\xfe\x00binary")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not UTF-8 text" in caplog.text and "Traceback" not in capsys.readouterr().err


def test_a_full_disk_stops_precompress_saying_what_was_saved(tmp_path, corpus, ckpt, reference, monkeypatch,
                                                             capsys):
    real, calls = LatentStore._insert, []

    def filling(conn, rows):
        calls.append(len(rows))
        if len(calls) == 3:  # SQLite's own "database or disk is full", after two committed batches
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        real(conn, rows)

    monkeypatch.setattr(LatentStore, "_insert", staticmethod(filling))
    out = tmp_path / "dir"
    assert _precompress(corpus, out, ckpt) == 1
    err = capsys.readouterr().err.strip().splitlines()  # (model loading may print progress bars first)
    assert [line for line in err if "semidyn-rag" in line or "Traceback" in line] == err[-1:]
    assert err[-1].startswith("semidyn-rag: error: no space left on the device writing")
    assert "this run saved 8 of" in err[-1] and "rerun the same command to resume" in err[-1]
    assert _entries(out) == 8
    monkeypatch.setattr(LatentStore, "_insert", staticmethod(real))
    assert _precompress(corpus, out, ckpt) == 0 and _entries(out) == _entries(reference)


def test_a_full_disk_writing_a_file_keeps_nothing_half_written(tmp_path, corpus, ckpt, monkeypatch, capsys):
    import errno

    import semidyn_rag.corpus.build as build

    def full(target, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(build, "atomic_write_text", full)
    assert _precompress(corpus, tmp_path / "dir", ckpt) == 1
    err = capsys.readouterr().err
    assert "no space left on the device writing" in err and "corpus.json" in err and "rerun the same" in err
    assert not (tmp_path / "dir" / "corpus.json").exists()


# The real CLI in a child process, each store transaction held open a while so the signal lands
# inside one (as in test_precompress's kill -9 test). The child sets Python's own Ctrl-C handler,
# as an interactive shell's child has it: a shell without job control starts background commands
# (a suite run with `&`, some CI runners) with SIGINT ignored, and Python keeps an inherited
# SIG_IGN, so the child would finish its work and exit 0.
_SLOW_CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from semidyn_rag.store.latent_store import LatentStore
real = LatentStore._insert
def slow(conn, rows):
    real(conn, rows)
    time.sleep(0.4)
LatentStore._insert = staticmethod(slow)
from semidyn_rag.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_print_one_line_and_resume(tmp_path, corpus, ckpt, reference, sig, code):
    out = tmp_path / "dir"
    cmd = [sys.executable, "-c", _SLOW_CHILD, "precompress", str(corpus), "--out", str(out),
           "--compressor", str(ckpt), *ARGS]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db, deadline = out / "latents.sqlite", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if db.exists() and _entries(out) >= 4:
                    break
            except sqlite3.OperationalError:
                pass  # schema not created yet
            time.sleep(0.02)
        assert proc.poll() is None, f"precompress ended before the signal: {proc.communicate()[1][-2000:]}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("finished work is kept: rerun the same command to resume")
    assert _entries(out) % 4 == 0 and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert _precompress(corpus, out, ckpt) == 0 and _entries(out) == _entries(reference)


def test_known_errors_become_one_line_and_bugs_keep_their_traceback():
    import errno

    from semidyn_rag.atomic import DiskFullError
    from semidyn_rag.cli import describe_error
    from semidyn_rag.corpus import CorpusError
    from semidyn_rag.store import CorruptStoreError

    assert describe_error(CorpusError("x is bad")) == "x is bad"
    assert describe_error(CorruptStoreError("/d/latents.sqlite", "file is not a database")).startswith(
        "/d/latents.sqlite is damaged (file is not a database)")
    assert describe_error(DiskFullError("saved 3 of 9", "/d/f")) == "saved 3 of 9"
    assert "writing /d/f" in describe_error(OSError(errno.ENOSPC, "No space left on device", "/d/f"))
    assert describe_error(FileNotFoundError(2, "No such file or directory", "/nope")) == \
        "/nope: No such file or directory"
    assert describe_error(RuntimeError("a bug")) is None and describe_error(KeyError("k")) is None
