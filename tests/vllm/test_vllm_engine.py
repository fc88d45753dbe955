"""The in-process vLLM backend answers exactly as the transformers backend does, batched and streamed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from semidyn_rag.serving import HiddenSizeMismatchError, PromptTooLongError, TransformersBackend
from semidyn_rag.session import CompressionSession
from tests.conftest import TEXTS

from .conftest import MAX_MODEL_LEN, build_vllm_tiny_decoder

NEW = 12


def _prompts(comp):
    """Rendered, tokenized prompts with their latents: 3 chunks, 1 chunk, text only, 2 chunks at another scale."""
    dec = comp.decoder
    ctx = comp.compress(TEXTS[:3], scale=0.0)
    coarse = comp.compress(TEXTS[2:4], scale=3.0)
    q = "Where is the Eiffel Tower? Answer briefly."
    rendered = [dec.render(q, 3), dec.render("What is the highest mountain?", 1),
                dec.apply_chat(f"Context: {TEXTS[0]}\n\nQuestion: {q}"), dec.render("What converts light?", 2)]
    latents = [[c.latents for c in ctx], [ctx[1].latents], [], [c.latents for c in coarse]]
    return dec.encode_prompts(rendered), latents


def test_vllm_answers_equal_transformers_for_compressed_prompts(vllm_compressor, engine):
    ids, latents = _prompts(vllm_compressor)
    want = TransformersBackend(vllm_compressor.decoder).complete(ids, latents, NEW)
    got = engine.complete(ids, latents, NEW)  # one batch: the engine schedules all four together
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.prompt_positions for g in got] == [w.prompt_positions for w in want]
    # the latents are really read: the first prompt's positions count its latents, not three placeholders
    assert got[0].prompt_positions == len(ids[0]) - 3 + sum(x.shape[0] for x in latents[0])
    assert len({tuple(g.token_ids) for g in got}) > 1  # the prompts do not all collapse to one answer
    assert all(g.ttft_s is not None and 0 < g.ttft_s <= g.total_s for g in got)


def test_each_prompt_alone_equals_the_batch(vllm_compressor, engine):
    ids, latents = _prompts(vllm_compressor)
    batch = engine.complete(ids, latents, NEW)
    alone = [engine.complete([i], [lat], NEW)[0] for i, lat in zip(ids, latents)]
    assert [a.token_ids for a in alone] == [b.token_ids for b in batch]


def test_concurrent_requests_from_threads_are_answered_alike(vllm_compressor, engine):
    ids, latents = _prompts(vllm_compressor)
    want = [c.token_ids for c in engine.complete(ids, latents, NEW)]
    got: dict[int, list[int]] = {}

    def ask(i):
        got[i] = engine.complete([ids[i]], [latents[i]], NEW)[0].token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(ids))] == want


def test_stream_and_async_give_the_same_text(vllm_compressor, engine):
    ids, latents = _prompts(vllm_compressor)
    want = engine.complete([ids[0]], [latents[0]], NEW)[0].text
    pieces = list(engine.stream(ids[0], latents[0], NEW))
    assert "".join(pieces) == want and len(pieces) > 1

    async def run():
        done = await engine.acomplete([ids[0]], [latents[0]], NEW)
        streamed = [p async for p in engine.astream(ids[0], latents[0], NEW)]
        return done[0].text, "".join(streamed)

    assert asyncio.run(run()) == (want, want)
    early = engine.stream(ids[0], latents[0], 200)  # a reader that stops after the first piece
    next(early)
    early.close()
    assert engine.complete([ids[0]], [latents[0]], NEW)[0].text == want
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0  # the abandoned request was aborted


def test_session_answers_through_the_vllm_backend(vllm_compressor, engine):
    prompt = f"Context: {TEXTS[0]}\n{TEXTS[1]}\n\nQuestion: Where is the tower?"
    plain = CompressionSession(vllm_compressor)
    served = CompressionSession(vllm_compressor, backend=engine)
    for s in (plain, served):
        s.compress_chunks(TEXTS[:2])
    want, usage_t = plain.answer(prompt, max_new_tokens=NEW)
    got, usage_v = served.answer(prompt, max_new_tokens=NEW)
    assert got == want and usage_v.to_dict() == usage_t.to_dict() and usage_v.latent_slots > 0
    pieces, _ = served.stream(prompt, max_new_tokens=NEW)
    assert "".join(pieces) == want
    assert asyncio.run(served.aanswer(prompt, max_new_tokens=NEW))[0] == want


def test_prompt_longer_than_max_model_len_is_refused_clearly(vllm_compressor, engine):
    dec = vllm_compressor.decoder
    long_ids = dec.encode_prompts([dec.apply_chat(" ".join(TEXTS) * 12)])
    assert len(long_ids[0]) > MAX_MODEL_LEN
    with pytest.raises(PromptTooLongError, match=f"max_model_len is {MAX_MODEL_LEN}"):
        engine.complete(long_ids, [[]], NEW)
    # new tokens are cut to what fits, as vLLM would
    near = long_ids[0][: MAX_MODEL_LEN - 3]
    (c,) = engine.complete([near], [[]], NEW)
    assert len(c.token_ids) <= 3
    assert engine.complete([long_ids[0][:20]], [[]], 2)[0].token_ids  # the engine still serves


def test_decoder_of_another_width_is_refused(vllm_compressor, served_dir, tmp_path):
    from semidyn_rag.serving.vllm_engine import VLLMBackend

    other = build_vllm_tiny_decoder(tmp_path / "wide", hidden_size=128)
    with pytest.raises(HiddenSizeMismatchError, match="hidden size 128.*96-d"):
        VLLMBackend(vllm_compressor.decoder, other, max_model_len=128, dtype="float32")
