"""ChatSemiDynamic with real langchain-core: an LCEL RAG chain on the core suite's tiny models."""

import asyncio
import json
import threading

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_semidyn_rag import ChatSemiDynamic, SemiDynamicDocumentCompressor
from semidyn_langchain_helpers import PROMPT, Capture, WordRetriever, documents, expected_embeds, format_docs, rag_chain

from semidyn_rag.session import PromptUsage, messages_to_prompt

Q = "Where is the Eiffel Tower?"


def _setup(session, max_tokens=6, k=2):
    comp = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1)
    llm = ChatSemiDynamic(session=comp.session, max_tokens=max_tokens)
    return rag_chain(WordRetriever(docs=documents(), k=k), comp, llm), comp, llm


def test_decoder_reads_exactly_the_registered_latents_in_place_of_the_documents(session):
    chain, _, llm = _setup(session)
    cap = Capture(session.compressor.decoder)
    out = chain.invoke(Q)
    docs, answer = out["docs"], out["answer"]
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str)
    assert [d.id for d in docs] == ["doc0", "doc1"]
    # the prompt the chat model got, rebuilt; the decoder's input embeddings are its template
    # tokens with each document's registered latents, in order, where the document's text was
    prompt = PROMPT.invoke({"context": format_docs(docs), "question": Q}).to_messages()[0].content
    want, contexts = expected_embeds(session, prompt, [d.page_content for d in docs])
    assert all(c is not None for c in contexts)
    got = cap.calls[-1][0]
    assert got.shape == want.shape and torch.equal(got, want)
    # token accounting: input tokens are prefill positions (latent slots + text tokens)
    usage = answer.response_metadata["semidyn_usage"]
    assert usage == llm.last_usage
    assert usage["latent_slots"] == sum(c.n_latents for c in contexts) == sum(d.metadata["semidyn_n_latents"]
                                                                               for d in docs)
    assert answer.usage_metadata["input_tokens"] == usage["prefill_positions"] == got.shape[0]
    n_out = len(session.compressor.decoder.tokenizer(answer.content, add_special_tokens=False)["input_ids"])
    assert answer.usage_metadata["output_tokens"] == n_out
    assert answer.usage_metadata["total_tokens"] == usage["prefill_positions"] + n_out
    assert usage["saved_tokens"] == usage["uncompressed_tokens"] - usage["prefill_positions"] > 0
    assert [c["key"] for c in usage["chunks"]] == [d.metadata["semidyn_key"] for d in docs]
    json.dumps(answer.response_metadata)  # plain values only


def test_documents_ids_and_metadata_survive_the_chain(session):
    chain, _, _ = _setup(session)
    originals = {d.id: d for d in documents()}
    docs = chain.invoke("Which mountain is the highest?")["docs"]
    assert len(docs) == 2
    for d in docs:
        before = originals[d.id]
        assert d.page_content == before.page_content
        assert {k: d.metadata[k] for k in before.metadata} == before.metadata
        assert d.metadata["semidyn_compressed"] is True
        json.dumps(d.metadata)
        assert not any(isinstance(v, torch.Tensor) for v in d.metadata.values())


def test_second_identical_query_never_calls_the_encoder(session, monkeypatch):
    chain, _, _ = _setup(session)
    first = chain.invoke("What do plants do with sunlight?")
    assert session.encoder_calls == 1
    comp = session.compressor

    def no_encoder(*a, **k):
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(comp, "encode", no_encoder)
    monkeypatch.setattr(comp.encoder, "forward", no_encoder)
    second = chain.invoke("What do plants do with sunlight?")
    assert session.encoder_calls == 1
    assert second["answer"].content == first["answer"].content
    assert all(d.metadata["semidyn_cache_hit"] for d in second["docs"])


def test_unknown_documents_stay_text(session):
    comp = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1)
    llm = ChatSemiDynamic(session=session, max_tokens=4)
    unknown = documents()[1]
    known = comp.compress_documents(documents()[:1], "q")[0]
    cap = Capture(session.compressor.decoder)
    msg = llm.invoke(f"Context:\n{known.page_content}\n\n{unknown.page_content}\n\nQuestion: Everest?")
    usage = msg.response_metadata["semidyn_usage"]
    assert [c["key"] for c in usage["chunks"]] == [known.metadata["semidyn_key"]]
    assert usage["latent_slots"] == session.registered(known.page_content).n_latents
    assert cap.calls[-1].shape[1] == usage["prefill_positions"]
    # nothing compressed at all: the prompt is read as text
    plain = llm.invoke(f"Context:\n{unknown.page_content}\n\nQuestion: Everest?")
    pu = plain.response_metadata["semidyn_usage"]
    assert pu["latent_slots"] == 0 and pu["saved_tokens"] == 0 and pu["chunks"] == []
    assert plain.usage_metadata["input_tokens"] == pu["uncompressed_tokens"]


def test_streaming_matches_invoke_and_reports_usage_once(session):
    chain, comp, llm = _setup(session, max_tokens=8)
    whole = chain.invoke(Q)["answer"]
    chunks = []
    for part in chain.stream(Q):
        if "answer" in part:
            chunks.append(part["answer"])
    assert len(chunks) >= 2 and all(isinstance(c.content, str) for c in chunks)
    assert "".join(c.content for c in chunks) == whole.content
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    total = sum(chunks[1:], chunks[0])
    assert total.usage_metadata == whole.usage_metadata
    assert total.response_metadata["semidyn_usage"] == whole.response_metadata["semidyn_usage"]


def test_async_invoke_and_stream_run_off_the_event_loop(session, monkeypatch):
    chain, comp, llm = _setup(session, max_tokens=6)
    sync = chain.invoke(Q)
    threads = []
    for name in ("answer", "stream", "compress_chunks"):
        orig = getattr(session, name)

        def spy(*a, _orig=orig, **k):
            threads.append(threading.get_ident())
            return _orig(*a, **k)

        monkeypatch.setattr(session, name, spy)

    async def run():
        loop_thread = threading.get_ident()
        out = await chain.ainvoke(Q)
        parts = [p["answer"].content async for p in chain.astream(Q) if "answer" in p]
        return loop_thread, out, parts

    loop_thread, out, parts = asyncio.run(run())
    assert out["answer"].content == sync["answer"].content
    assert [d.id for d in out["docs"]] == [d.id for d in sync["docs"]]
    assert "".join(parts) == sync["answer"].content
    assert len(threads) == 4 and loop_thread not in threads  # compress x2, answer, stream


def test_stop_sequences_cut_the_answer(session, monkeypatch):
    # the tiny decoder only writes newlines, so the decoder's text is fixed here: the cut is ours
    llm = ChatSemiDynamic(session=session, max_tokens=12)
    usage = PromptUsage(text_tokens=20, latent_slots=0, uncompressed_tokens=20)
    pieces = ["Par", "is, Fra", "nce. It was"]
    monkeypatch.setattr(session, "answer", lambda p, **k: ("".join(pieces), usage))
    monkeypatch.setattr(session, "stream", lambda p, **k: (iter(pieces), usage))
    for stop, want in [(["ance"], "Paris, Fr"), (["It", "s, "], "Pari"), (["nowhere"], "Paris, France. It was")]:
        assert llm.invoke("Q", stop=stop).content == want
        chunks = list(llm.stream("Q", stop=stop))
        assert "".join(c.content for c in chunks) == want  # a stop spanning two pieces is never emitted
        whole = llm.invoke("Q", stop=stop).usage_metadata
        assert sum(chunks[1:], chunks[0]).usage_metadata == whole
    assert llm.bind(stop=["is"]).invoke("Q").content == "Par"


def test_system_and_human_messages_still_read_latents(session, monkeypatch):
    comp = SemiDynamicDocumentCompressor(session=session, min_chunk_tokens=1)
    llm = ChatSemiDynamic(session=session, max_tokens=4)
    doc = comp.compress_documents(documents()[:1], Q)[0]
    prompts = []
    orig = session.answer
    monkeypatch.setattr(session, "answer", lambda p, **k: (prompts.append(p), orig(p, **k))[1])
    human = f"Context: {doc.page_content}\n\nQuestion: {Q}"
    msg = llm.invoke([SystemMessage("Answer briefly."), HumanMessage(human)])
    assert prompts[-1] == f"System: Answer briefly.\n\nUser: {human}"
    assert msg.response_metadata["semidyn_usage"]["latent_slots"] == doc.metadata["semidyn_n_latents"]
    llm.invoke([HumanMessage(human)])
    assert prompts[-1] == human  # a lone user message is the prompt as written
    chat = [("user", "a"), ("assistant", "b"), ("user", "c")]
    assert messages_to_prompt(chat) == "User: a\n\nAssistant: b\n\nUser: c"
    with pytest.raises(ValueError):
        messages_to_prompt([])
