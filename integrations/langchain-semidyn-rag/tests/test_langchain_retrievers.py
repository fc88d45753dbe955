"""SemiDynamicCorpusRetriever over a real corpus directory, wired into an LCEL RAG chain."""

import asyncio
import json

import pytest
from langchain_semidyn_rag import ChatSemiDynamic, SemiDynamicCorpusRetriever, SemiDynamicDocumentCompressor
from semidyn_langchain_helpers import TEXTS, rag_chain

from semidyn_rag.corpus import CorpusDirectory, precompress
from semidyn_rag.embedded import minilm_path


@pytest.fixture
def corpus_dir(compressor, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(TEXTS)))
    ckpt = tmp_path / "ckpt"
    compressor.save_pretrained(ckpt)
    precompress(docs, tmp_path / "corpus", compressor, compressor_path=str(ckpt),
                embedder=str(minilm_path()), progress=False)
    return tmp_path / "corpus"


def test_corpus_retriever_and_chain_read_precompressed_latents(corpus_dir, compressor, monkeypatch):
    retriever = SemiDynamicCorpusRetriever(corpus=str(corpus_dir), k=2)
    docs = retriever.invoke("highest mountain")
    assert len(docs) == 2 and "Everest" in docs[0].page_content
    assert docs[0].metadata["n"] == 1 and docs[0].metadata["score"] >= docs[1].metadata["score"]
    assert {"doc_id", "position", "chunk_id"} <= set(docs[0].metadata)
    with CorpusDirectory(corpus_dir) as cd:
        assert [d.id for d in docs] == [h.chunk.key for h in cd.search("highest mountain", k=2)]
    adocs = asyncio.run(retriever.ainvoke("highest mountain"))
    assert [(d.id, d.page_content, d.metadata) for d in adocs] == [(d.id, d.page_content, d.metadata) for d in docs]

    comp = SemiDynamicDocumentCompressor(store_path=str(corpus_dir), min_chunk_tokens=1)
    session = comp.session
    assert session.compressor.fingerprint == compressor.fingerprint  # the corpus's recorded compressor
    monkeypatch.setattr(session.compressor, "encode",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("precompressed chunks re-encoded")))
    llm = ChatSemiDynamic(session=session, max_tokens=4)
    out = rag_chain(retriever, comp, llm).invoke("Which mountain is the highest?")
    assert session.encoder_calls == 0
    assert all(d.metadata["semidyn_cache_hit"] for d in out["docs"])
    assert out["answer"].response_metadata["semidyn_usage"]["latent_slots"] == sum(
        d.metadata["semidyn_n_latents"] for d in out["docs"]) > 0


def test_corpus_retriever_accepts_an_open_directory_and_checks_k(corpus_dir):
    with CorpusDirectory(corpus_dir) as cd:
        docs = SemiDynamicCorpusRetriever(corpus=cd, k=1).invoke("photosynthesis sunlight")
        assert len(docs) == 1 and "Photosynthesis" in docs[0].page_content
    with pytest.raises(ValueError):
        SemiDynamicCorpusRetriever(corpus=corpus_dir, k=0)
