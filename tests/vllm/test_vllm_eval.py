"""`semidyn-rag eval --backend vllm` and `query --backend vllm` answer as with transformers."""

from __future__ import annotations

import json

from semidyn_rag.cli import main
from tests.conftest import TEXTS

ROWS = [
    {"id": "q0", "context": TEXTS[0], "question": "Where is the Eiffel Tower?", "answer": "Paris"},
    {"id": "q1", "context": TEXTS[1], "question": "Which is the highest mountain?", "answer": "Everest"},
    {"id": "q2", "context": TEXTS[2], "question": "What does photosynthesis convert?", "answer": "light"},
]


def _answers(out):
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return {(d["system"], d["sample_id"]): (d["prediction"], d["prefill_tokens"], d["new_tokens"]) for d in lines}


def test_eval_with_the_vllm_backend_answers_as_transformers(vllm_compressor, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIDYN_RAG_CACHE", str(tmp_path / "cache"))  # merged and base decoders land here
    ckpt = tmp_path / "ckpt"
    vllm_compressor.save_pretrained(ckpt)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ["eval", "--dataset", str(data), "--compressor", str(ckpt), "--systems", "uncompressed,no_context,fixed",
              "--factors", "2,8", "--max-new-tokens", "6", "--decode-batch-size", "2", "--llmlingua", "off",
              "--no-progress", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "hf")]) == 0
    assert main([*common, "--out", str(tmp_path / "vllm"), "--backend", "vllm"]) == 0
    want, got = _answers(tmp_path / "hf"), _answers(tmp_path / "vllm")
    assert len(got) == 4 * len(ROWS) and got == want
    # the baselines read with the base LLM, served by a second engine on the base weights
    folders = [p for p in (tmp_path / "cache" / "decoders").iterdir() if p.is_dir()]
    assert sorted(p.name.startswith("base-") for p in folders) == [False, True]


def test_query_with_a_vllm_server_answers_as_transformers(vllm_compressor, vllm_servers, tmp_path, capsys):
    from semidyn_rag.testing import write_random_docs

    ckpt = tmp_path / "ckpt"
    vllm_compressor.save_pretrained(ckpt)  # the servers serve this compressor's merged decoder
    docs = write_random_docs(tmp_path / "docs", 6)
    (docs / "eiffel.txt").write_text(TEXTS[0])
    corpus = tmp_path / "corpus"
    assert main(["precompress", str(docs), "--out", str(corpus), "--compressor", str(ckpt), "--chunk-tokens", "40",
                 "--no-progress"]) == 0
    capsys.readouterr()
    ask = ["query", str(corpus), "Where is the Eiffel Tower?", "-k", "3", "--json", "--max-new-tokens", "8"]
    assert main(ask) == 0
    want = json.loads(capsys.readouterr().out)
    assert main([*ask, "--vllm-url", vllm_servers[0]]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["answer"] == want["answer"] and got["compression"]["latents"] == want["compression"]["latents"] > 0
    # progressive reading: the plan runs on the compressor, the answer is decoded by the server
    prog = [*ask, "--progressive", "--max-latents", "12"]
    assert main(prog) == 0
    want = json.loads(capsys.readouterr().out)
    assert main([*prog, "--vllm-url", vllm_servers[0]]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["answer"] == want["answer"] and got["sources"] == want["sources"]
    assert main([*ask, "--backend", "transformers", "--vllm-url", vllm_servers[0]]) == 2
    assert main([*ask, "--vllm-url", vllm_servers[1]]) == 1  # the server without prompt embeddings
    assert "--enable-prompt-embeds" in capsys.readouterr().err
