"""The LlamaIndex query engine with SemiDynamicLLM(backend="vllm"): same answers as with transformers."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.embeddings.huggingface")

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It was built in 1889.",
    "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal of the Himalayas.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar.",
    "The Great Wall of China is a series of fortifications built across the historical northern borders of China.",
]
QUESTION = "Where is the Eiffel Tower?"


@pytest.fixture(scope="module")
def index():
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from semidyn_rag.embedded import minilm_path

    embed = HuggingFaceEmbedding(model_name=str(minilm_path()), device="cpu")
    return VectorStoreIndex.from_documents([Document(text=t, id_=f"doc{i}") for i, t in enumerate(DOCS)],
                                           embed_model=embed)


def _query(index, compressor, **llm_kwargs):
    from llama_index.llms.semidyn_rag import SemiDynamicLLM
    from llama_index.postprocessor.semidyn_rag import SemiDynamicCompressPostprocessor

    from semidyn_rag.session import CompressionSession

    pp = SemiDynamicCompressPostprocessor(session=CompressionSession(compressor), min_chunk_tokens=1)
    llm = SemiDynamicLLM(session=pp.session, max_new_tokens=10, **llm_kwargs)
    engine = index.as_query_engine(node_postprocessors=[pp], llm=llm, similarity_top_k=2)
    response = engine.query(QUESTION)
    streamed = index.as_query_engine(node_postprocessors=[pp], llm=llm, similarity_top_k=2, streaming=True)
    pieces = list(streamed.query(QUESTION).response_gen)
    async_answer = asyncio.run(engine.aquery(QUESTION)).response
    return response, "".join(pieces), async_answer, llm, pp.session


@pytest.mark.parametrize("where", ["server", "in-process"])
def test_query_engine_with_vllm_backend_answers_as_transformers(index, vllm_compressor, vllm_servers, where,
                                                                monkeypatch, tmp_path):
    from semidyn_rag.serving.vllm_engine import VLLMBackend
    from semidyn_rag.serving.vllm_remote import RemoteVLLMBackend

    want, _, _, llm_t, _ = _query(index, vllm_compressor)
    if where == "server":
        kwargs = {"backend": "vllm", "vllm_url": vllm_servers[0]}
    else:
        monkeypatch.setenv("SEMIDYN_RAG_CACHE", str(tmp_path))  # the merged decoder is cached here
        kwargs = {"backend": "vllm"}
    got, streamed, async_answer, llm_v, session = _query(index, vllm_compressor, **kwargs)
    try:
        assert isinstance(session.backend, RemoteVLLMBackend if where == "server" else VLLMBackend)
        assert got.response == want.response and streamed == want.response and async_answer == want.response
        assert llm_v.last_usage["latent_slots"] > 0 and llm_v.last_usage == llm_t.last_usage
        assert [n.node.node_id for n in got.source_nodes] == [n.node.node_id for n in want.source_nodes]
    finally:
        session.backend.close()
    if where == "in-process":
        assert any(p.is_dir() for p in (tmp_path / "decoders").iterdir())  # served from a merged copy in the cache
