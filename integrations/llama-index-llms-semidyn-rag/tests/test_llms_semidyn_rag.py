"""End to end with real llama-index-core: retriever -> postprocessor -> synthesizer -> SemiDynamicLLM."""

import asyncio

import pytest
import torch
from conftest import build_index as _index
from llama_index.core.base.llms.types import CompletionResponse
from llama_index.llms.semidyn_rag import SemiDynamicLLM
from llama_index.postprocessor.semidyn_rag import SemiDynamicCompressPostprocessor

from semidyn_rag.session import CompressionSession
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import CaptureGenerate as Capture

def _engine(index, session, **kw):
    pp = SemiDynamicCompressPostprocessor(session=session, min_chunk_tokens=1)
    llm = SemiDynamicLLM(session=pp.session, max_new_tokens=6)
    return index.as_query_engine(node_postprocessors=[pp], llm=llm, similarity_top_k=2, **kw), pp, llm


@pytest.mark.parametrize("mode", ["compact", "simple_summarize"])
def test_decoder_reads_projected_latents_at_placeholders(embed_model, session, mode):
    engine, pp, llm = _engine(_index(embed_model), session, response_mode=mode)
    cap = Capture(session.compressor.decoder)
    response = engine.query("Where is the Eiffel Tower?")
    assert isinstance(response.response, str)
    usage = llm.last_usage
    assert len(usage["chunks"]) == 2 and usage["latent_slots"] > 0
    # the embeddings the decoder got: at latent positions exactly the registered latents, in order
    embeds = cap.calls[-1][0]
    assert embeds.shape[0] == usage["prefill_positions"]
    texts = [n.node.get_content() for n in response.source_nodes]
    used = [session.registered(t) for t in texts]
    starts = [_find_rows(embeds, c.latents) for c in used]
    assert all(s is not None for s in starts), "projected latents missing from the decoder's input embeddings"
    assert starts == sorted(starts)  # in prompt order
    # and they are what a fresh compress gives (store keeps fp16 features)
    for c, fresh in zip(used, session.compressor.compress(texts)):
        torch.testing.assert_close(c.latents, fresh.latents, atol=2e-2, rtol=2e-2)
    assert usage["saved_tokens"] == usage["uncompressed_tokens"] - usage["prefill_positions"]
    assert usage["saved_tokens"] > 0


def _find_rows(embeds, lat):
    """Start row of ``lat`` as a contiguous block of rows in ``embeds``, or None."""
    m = lat.shape[0]
    for s in range(embeds.shape[0] - m + 1):
        if torch.equal(embeds[s : s + m], lat.to(embeds.dtype)):
            return s
    return None


def test_second_identical_query_hits_the_cache(embed_model, session, monkeypatch):
    engine, pp, llm = _engine(_index(embed_model), session)
    first = engine.query("What do plants do with sunlight?")
    assert session.encoder_calls == 1
    comp = session.compressor

    def no_encoder(*a, **k):
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(comp, "encode", no_encoder)
    monkeypatch.setattr(comp.encoder, "forward", no_encoder)
    second = engine.query("What do plants do with sunlight?")
    assert second.response == first.response
    assert all(n.node.metadata["semidyn_cache_hit"] for n in second.source_nodes)


def test_a_fresh_session_reads_the_store_without_encoding(embed_model, compressor, tmp_path, monkeypatch):
    path = tmp_path / "latents.sqlite"
    with LatentStore(path) as store:
        _engine(_index(embed_model), CompressionSession(compressor, store))[0].query("Where is Everest?")
    monkeypatch.setattr(compressor, "encode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoded")))
    with LatentStore(path) as store:
        s2 = CompressionSession(compressor, store)
        resp = _engine(_index(embed_model), s2)[0].query("Where is Everest?")
    assert all(n.node.metadata["semidyn_cache_hit"] for n in resp.source_nodes)


def test_streaming_yields_text(embed_model, session):
    engine, pp, llm = _engine(_index(embed_model), session, streaming=True)
    response = engine.query("Where is the Great Wall?")
    pieces = list(response.response_gen)
    assert all(isinstance(p, str) for p in pieces)
    full = engine.query("Where is the Great Wall?")
    assert "".join(pieces) == full.get_response().response
    whole = SemiDynamicLLM(session=session, max_new_tokens=6).complete("Hi")  # no chunk in it: plain text
    assert isinstance(whole, CompletionResponse) and whole.additional_kwargs["semidyn_usage"]["latent_slots"] == 0


def test_aquery_and_async_stream(embed_model, session):
    engine, pp, llm = _engine(_index(embed_model), session)
    sync = engine.query("Where is the Eiffel Tower?").response
    assert asyncio.run(engine.aquery("Where is the Eiffel Tower?")).response == sync

    async def stream():
        gen = await llm.astream_complete("Say something")
        return [r.delta async for r in gen]

    assert "".join(asyncio.run(stream())) == llm.complete("Say something").text


def test_faiss_vector_store_and_uncompressed_short_nodes(embed_model, session):
    index = _index(embed_model, faiss_store=True)
    pp = SemiDynamicCompressPostprocessor(session=session, min_chunk_tokens=10_000)  # everything stays text
    llm = SemiDynamicLLM(session=session, max_new_tokens=4)
    response = index.as_query_engine(node_postprocessors=[pp], llm=llm, similarity_top_k=2).query("Everest?")
    assert len(response.source_nodes) == 2
    assert all(not n.node.metadata["semidyn_compressed"] for n in response.source_nodes)
    assert llm.last_usage["latent_slots"] == 0 and llm.last_usage["saved_tokens"] == 0


