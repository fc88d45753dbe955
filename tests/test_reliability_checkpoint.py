"""Issue 17, checkpoints: a checkpoint never runs code, and a damaged one is a clean error.

``--trust-remote-code`` is the only way remote code gets enabled from the command line (with a
warning). The loader half (a ``config.json`` that sets ``trust_remote_code: true`` must be
ignored; damaged weights and configs raise CheckpointError naming the file) lives in
``semidyn_rag/checkpoint``; these tests check it through the commands users run.
"""

from __future__ import annotations

import json
import shutil

import pytest

from semidyn_rag.cli import main


class _Stop(Exception):
    pass


@pytest.fixture
def calls(monkeypatch):
    """Record the overrides each command passes to from_pretrained, then stop the command."""
    from semidyn_rag.compressor import SemiDynamicCompressor

    seen = []

    def fake(cls, path, **overrides):
        seen.append(overrides)
        raise _Stop()

    monkeypatch.setattr(SemiDynamicCompressor, "from_pretrained", classmethod(fake))
    return seen


@pytest.mark.parametrize("command", ["query", "precompress", "repair"])
def test_remote_code_only_with_the_flag_and_a_warning(tmp_path, ckpt, calls, capsys, monkeypatch, command):
    from semidyn_rag.corpus import CompressorRecord, CorpusManifest

    src, out = tmp_path / "src", tmp_path / "dir"
    src.mkdir()
    (src / "a.txt").write_text("The Eiffel Tower is in Paris.")
    if command != "precompress":  # a corpus directory to open (query and repair load the compressor after)
        out.mkdir()
        rec = CompressorRecord(path=str(ckpt), fingerprint="f", feature_fingerprint="ff")
        manifest = CorpusManifest(embedder="e", embedding_dim=4, chunk_tokens=8, overlap=0, documents=0, chunks=0,
                                  chunks_digest="d", texts_digest="t", compressor=rec)
        (out / "corpus.json").write_text(manifest.model_dump_json())
        (out / "chunks.parquet").write_bytes(b"")
        (out / "index.faiss").write_bytes(b"")
    argv = {"query": ["query", str(out), "a question", "--compressor", str(ckpt)],
            "precompress": ["precompress", str(src), "--out", str(out), "--compressor", str(ckpt)],
            "repair": ["repair", str(out), "--compressor", str(ckpt)]}[command]
    if command == "repair":  # repair loads the compressor only when it has chunks to encode
        import semidyn_rag.corpus.repair as rp

        monkeypatch.setattr(rp, "repair_directory", lambda path, load_compressor, **kw: load_compressor())
    for flag in ([], ["--trust-remote-code"]):
        with pytest.raises(_Stop):
            main(argv + flag)
        err = capsys.readouterr().err
        if flag:
            assert calls[-1].get("trust_remote_code") is True and "warning: --trust-remote-code" in err
        else:
            assert "trust_remote_code" not in calls[-1] and "trust-remote-code" not in err


_EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("code from the checkpoint ran")
'''


def test_a_checkpoint_config_cannot_turn_on_remote_code(tmp_path, ckpt, tiny_dirs):
    """Issue 17.1 (loader half, semidyn_rag/checkpoint): config.json with trust_remote_code: true
    and an auto_map in the encoder folder ran that folder's Python before any check."""
    from semidyn_rag import SemiDynamicCompressor

    marker = tmp_path / "ran"
    enc = tmp_path / "evil-encoder"
    shutil.copytree(tiny_dirs[0], enc)
    (enc / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    cfg = json.loads((enc / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                       "AutoModelForCausalLM": "evil.EvilModel"}
    (enc / "config.json").write_text(json.dumps(cfg))
    hostile = tmp_path / "hostile"
    shutil.copytree(ckpt, hostile)
    top = json.loads((hostile / "config.json").read_text())
    top["compressor"].update(encoder=str(enc), trust_remote_code=True)
    (hostile / "config.json").write_text(json.dumps(top))
    try:
        SemiDynamicCompressor.from_pretrained(str(hostile))
    except Exception:  # noqa: BLE001 (refusing it is fine; running its code is not)
        pass
    assert not marker.exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage,names", [
    (lambda c: _truncate(c / "projector" / "model.safetensors"), "model.safetensors"),
    (lambda c: (c / "config.json").write_text("{not json"), "config.json"),
    (lambda c: (c / "config.json").write_text(json.dumps({"format": "semidyn-rag", "format_version": 1})),
     "config.json"),
], ids=["truncated-safetensors", "invalid-config-json", "config-without-compressor"])
def test_a_damaged_checkpoint_is_a_clean_error(tmp_path, ckpt, capsys, damage, names):
    """Issue 17.9 (loader half, semidyn_rag/checkpoint): these raised SafetensorError,
    JSONDecodeError and KeyError tracebacks; they must be CheckpointError naming the file."""
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    damage(bad)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("The Eiffel Tower is in Paris.")
    code = main(["precompress", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--compressor", str(bad),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and names in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
