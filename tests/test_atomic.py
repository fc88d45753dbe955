"""Atomic files and folders: a failure leaves the old content, success leaves only the new."""

import os
import socket
import subprocess
import sys

import pytest

from semidyn_rag.atomic import atomic_directory, atomic_path, atomic_write_text, remove_stale_temporaries


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
        assert not target.exists()  # nothing visible until the block succeeds
    assert (target / "weights").read_text() == "v1"

    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("v2, half written")
            raise RuntimeError("out of disk")
    assert (target / "weights").read_text() == "v1"

    with atomic_directory(target) as tmp:
        (tmp / "other").write_text("v3")
    assert sorted(p.name for p in target.iterdir()) == ["other"]  # the old folder's files are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_sweep_removes_only_dead_writers_files_on_this_host(tmp_path):
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"dead": f".a.json.{host}.{dead.pid}.tmp", "live": f".b.json.{host}.{os.getpid()}.tmp",
             "other_host": f".c.json.elsewhere.{dead.pid}.tmp", "not_ours": ".notes.tmp"}
    for name in names.values():
        (tmp_path / name).write_text("half")
    (tmp_path / f".d.{host}.{dead.pid}.tmp").mkdir()  # folders are never swept: one may be the only copy
    assert remove_stale_temporaries(tmp_path) == 1
    assert not (tmp_path / names["dead"]).exists()
    assert len(list(tmp_path.iterdir())) == 4
    assert remove_stale_temporaries(tmp_path / "missing") == 0
