"""SemiDynamicDocumentCompressor on real langchain-core documents (tiny models)."""

import asyncio
import json
import threading

import pytest
import torch
from langchain_core.documents import Document
from langchain_semidyn_rag import SemiDynamicDocumentCompressor
from semidyn_langchain_helpers import WordRetriever, documents


def test_documents_keep_text_ids_and_metadata_and_get_json_semidyn_metadata(session):
    docs = documents()
    comp = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1)
    out = comp.compress_documents(docs, "anything")
    assert [d.id for d in out] == [d.id for d in docs]
    for before, after in zip(docs, out):
        assert type(after) is Document and after is not before
        assert after.page_content == before.page_content
        assert {k: after.metadata[k] for k in before.metadata} == before.metadata
        semi = {k: v for k, v in after.metadata.items() if k.startswith("semidyn_")}
        ctx = session.registered(before.page_content)
        assert semi == {"semidyn_key": semi["semidyn_key"], "semidyn_n_tokens": ctx.n_tokens,
                        "semidyn_compressed": True, "semidyn_n_latents": ctx.n_latents,
                        "semidyn_factor": ctx.factor, "semidyn_y_hat": round(ctx.y_hat, 4),
                        "semidyn_cache_hit": False}
        json.loads(json.dumps(after.metadata))
        assert not any(isinstance(v, torch.Tensor) for v in after.metadata.values())
    # the caller's documents are untouched
    assert all(not any(k.startswith("semidyn") for k in d.metadata) for d in docs)
    assert session.encoder_calls == 1  # one batch for all misses
    assert comp.compress_documents([], "q") == []


def test_short_empty_and_over_budget_documents_stay_text_with_a_reason(session):
    docs = documents() + [Document(page_content="   ", metadata={"n": 9})]
    out = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=10_000).compress_documents(docs, "q")
    assert all(d.metadata["semidyn_compressed"] is False for d in out)
    assert out[-1].metadata["semidyn_reason"] == "empty"
    assert out[0].metadata["semidyn_reason"] == "under 10000 tokens"
    assert all(session.registered(d.page_content) is None for d in docs)
    free = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1).compress_documents(documents(), "q")
    total = sum(d.metadata["semidyn_n_latents"] for d in free)
    budget = max(3, total // 3)
    tight = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1, max_latents=budget)
    out = tight.compress_documents(documents(), "q")
    used = sum(d.metadata["semidyn_n_latents"] for d in out if d.metadata["semidyn_compressed"])
    assert used <= budget
    assert {d.metadata.get("semidyn_reason") for d in out} <= {None, "over the latent budget"}


def test_second_identical_call_never_calls_the_encoder(session, monkeypatch):
    comp = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1)
    comp.compress_documents(documents(), "q")

    def no_encoder(*a, **k):
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(session.compressor, "encode", no_encoder)
    monkeypatch.setattr(session.compressor.encoder, "forward", no_encoder)
    again = comp.compress_documents(documents(), "q")
    assert session.encoder_calls == 1 and all(d.metadata["semidyn_cache_hit"] for d in again)


def test_async_compress_runs_in_a_worker_thread(session, monkeypatch):
    comp = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1)
    seen = []
    orig = session.compress_chunks

    def spy(*a, **k):
        seen.append(threading.get_ident())
        return orig(*a, **k)

    monkeypatch.setattr(session, "compress_chunks", spy)

    async def run():
        ticks = 0

        async def tick():  # keeps running while the encoder works: the loop is not blocked
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        out = await comp.acompress_documents(documents(), "q")
        ticker.cancel()
        return threading.get_ident(), out, ticks

    loop_thread, out, ticks = asyncio.run(run())
    assert seen and loop_thread not in seen and ticks > 1
    assert all(d.metadata["semidyn_compressed"] for d in out)
    sync = comp.compress_documents(documents(), "q")  # same figures, now from the cache
    assert [{**d.metadata, "semidyn_cache_hit": True} for d in out] == [d.metadata for d in sync]


def test_builds_its_session_from_a_checkpoint_and_store_path(compressor, tmp_path):
    ckpt = tmp_path / "ckpt"
    compressor.save_pretrained(ckpt)
    comp = SemiDynamicDocumentCompressor(compressor_path=str(ckpt), store_path=str(tmp_path / "latents.sqlite"),
                                         device="cpu", min_chunk_tokens=1)
    assert comp.session.compressor.fingerprint == compressor.fingerprint
    out = comp.compress_documents(documents()[:2], "q")
    assert all(d.metadata["semidyn_compressed"] for d in out)
    s = comp.session
    assert s.store.missing([d.metadata["semidyn_key"] for d in out], s.compressor.feature_fingerprint) == []


def test_inside_contextual_compression_retriever(session):
    ccr = pytest.importorskip("langchain_classic.retrievers.contextual_compression")
    comp = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1)
    retriever = ccr.ContextualCompressionRetriever(base_compressor=comp,
                                                   base_retriever=WordRetriever(docs=documents()))
    docs = retriever.invoke("Which mountain is the highest?")
    assert [d.id for d in docs] == ["doc1", "doc2"]
    assert all(d.metadata["semidyn_compressed"] for d in docs)
    adocs = asyncio.run(retriever.ainvoke("Which mountain is the highest?"))
    assert [d.metadata for d in adocs] == [{**d.metadata, "semidyn_cache_hit": True} for d in docs]
