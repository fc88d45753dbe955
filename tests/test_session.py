"""CompressionSession: one feature path (memory in front of the store), chunks and prompts processed once."""

from __future__ import annotations

import torch

import semidyn_rag.session as session_mod
import semidyn_rag.store.memory as memory_mod
from semidyn_rag import CompressionSession, LatentStore
from semidyn_rag.store.memory import MemoryStore
from tests.conftest import TEXTS


def _count_calls(monkeypatch, obj, name):
    calls = []
    real = getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


def test_memory_only_session_encodes_once(compressor):
    s = CompressionSession(compressor)
    first = s.compress_chunks(TEXTS[:2])
    second = s.compress_chunks(TEXTS[:2])
    assert [r.cache_hit for r in first] == [False, False]
    assert [r.cache_hit for r in second] == [True, True]
    assert s.encoder_calls == 1 and isinstance(s.features, MemoryStore) and len(s.features) == 2


def test_store_backed_session_reads_through_memory(compressor, tmp_path, monkeypatch):
    with LatentStore(tmp_path / "s.sqlite") as store:
        CompressionSession(compressor, store).compress_chunks(TEXTS)
        fresh = CompressionSession(compressor, store)
        gets = _count_calls(monkeypatch, store, "get_many")
        res = fresh.compress_chunks(TEXTS)
        assert all(r.cache_hit for r in res) and fresh.encoder_calls == 0 and len(gets) == 1
        fresh.compress_chunks(TEXTS)  # now served from memory: the store is not read again
        assert len(gets) == 1


def test_each_chunk_and_prompt_is_tokenized_and_hashed_once(compressor, monkeypatch):
    s = CompressionSession(compressor)
    enc_tok = _count_calls(monkeypatch, type(compressor.encoder.tokenizer), "__call__")
    keys_s = _count_calls(monkeypatch, session_mod, "chunk_key")
    keys_m = _count_calls(monkeypatch, memory_mod, "chunk_key")
    s.compress_chunks(TEXTS[:3])
    assert len(keys_s) == 3 and not keys_m  # hashed once, in the session; the store gets the keys
    # one tokenizer call for the three chunks' encoder ids, one for their decoder counts
    # (encoder and decoder tokenizers share a class here), none inside the encoder pass
    assert len(enc_tok) == 2
    prompt = f"Context: {TEXTS[0]}\n{TEXTS[1]}\n\nQuestion: Where is the tower?"
    enc_tok.clear()
    s.answer(prompt, max_new_tokens=2)
    assert len(enc_tok) == 1  # the rendered prompt, once


def test_decoder_reads_the_registered_latents_in_place(compressor, monkeypatch):
    s = CompressionSession(compressor)
    s.compress_chunks(TEXTS[:2], scale=0.0)
    seen = {}
    real = compressor.decoder.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(compressor.decoder.model, "generate", spy)
    prompt = f"Context: {TEXTS[0]} and {TEXTS[1]}\n\nQuestion: Where?"
    _, usage = s.answer(prompt, max_new_tokens=2)
    emb = seen["inputs_embeds"][0]
    ctx = [s.registered(TEXTS[0]), s.registered(TEXTS[1])]
    ids, _, _ = s.splice(prompt)
    ph = [i for i, t in enumerate(ids) if t == compressor.decoder.placeholder_id]
    pos = ph[0]
    torch.testing.assert_close(emb[pos : pos + ctx[0].n_latents], ctx[0].latents.to(emb.dtype))
    pos = ph[1] + ctx[0].n_latents - 1
    torch.testing.assert_close(emb[pos : pos + ctx[1].n_latents], ctx[1].latents.to(emb.dtype))
    assert usage.latent_slots == sum(c.n_latents for c in ctx)
    plain = len(compressor.decoder.encode_prompts([compressor.decoder.apply_chat(prompt)])[0])
    assert abs(usage.uncompressed_tokens - plain) <= 2  # chunk counts summed; BPE may merge at a boundary


def test_latent_budget_is_never_exceeded(compressor):
    s = CompressionSession(compressor)
    for budget in (3, 6, 12, 40):
        res = s.compress_chunks(TEXTS, max_latents=budget)
        assert sum(r.n_latents or 0 for r in res if r.compressed) <= budget


def test_features_of_another_pooling_rule_are_never_served(make_compressor, tmp_path):
    torch.manual_seed(0)
    a = make_compressor()
    b = make_compressor(pool_end_marker=False)
    b.load_state_dict(a.state_dict())  # the same weights; only the rule differs
    assert a.feature_fingerprint != b.feature_fingerprint
    with LatentStore(tmp_path / "s.sqlite") as store:
        CompressionSession(a, store).compress_chunks(TEXTS[:1])
        sb = CompressionSession(b, store)
        (r,) = sb.compress_chunks(TEXTS[:1], scale=0.0)
        assert not r.cache_hit and sb.encoder_calls == 1
        (ca,) = a.compress(TEXTS[:1], factor=2)
        (cb,) = b.compress(TEXTS[:1], factor=2)
        assert ca.n_latents == -(-(cb.n_tokens + 1) // 2) and cb.n_latents == -(-cb.n_tokens // 2)
