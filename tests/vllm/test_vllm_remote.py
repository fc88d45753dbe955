"""The remote vLLM backend against real `vllm serve` processes on localhost."""

from __future__ import annotations

import asyncio

import pytest
import torch

from semidyn_rag.pipeline.decoder import LatentDecoder
from semidyn_rag.serving import (
    HiddenSizeMismatchError,
    PromptEmbedsUnsupportedError,
    PromptTooLongError,
    ServingError,
    TransformersBackend,
    make_backend,
)
from semidyn_rag.serving.vllm_remote import RemoteVLLMBackend
from semidyn_rag.session import open_session
from tests.conftest import TEXTS

from .conftest import MAX_MODEL_LEN, build_vllm_tiny_decoder
from .test_vllm_engine import NEW, _prompts


def test_remote_answers_equal_transformers_batched_and_streamed(vllm_compressor, vllm_servers):
    url, _ = vllm_servers
    remote = make_backend(vllm_compressor, "vllm", vllm_url=url)
    assert isinstance(remote, RemoteVLLMBackend) and remote.model == "tiny-decoder"
    assert remote.max_model_len == MAX_MODEL_LEN
    ids, latents = _prompts(vllm_compressor)
    want = TransformersBackend(vllm_compressor.decoder).complete(ids, latents, NEW)
    got = remote.complete(ids, latents, NEW)  # concurrent requests, batched by the server
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    pieces = list(remote.stream(ids[0], latents[0], NEW))
    assert "".join(pieces) == want[0].text and len(pieces) > 1

    async def run():
        return await asyncio.gather(*(remote.acomplete([i], [lat], NEW) for i, lat in zip(ids, latents)))

    assert [r[0].token_ids for r in asyncio.run(run())] == [w.token_ids for w in want]


def test_session_with_a_vllm_url_answers_as_the_transformers_session(vllm_compressor, vllm_servers):
    url, _ = vllm_servers
    prompt = f"Context: {TEXTS[1]}\n{TEXTS[2]}\n{TEXTS[3]}\n\nQuestion: What converts light?"
    plain = open_session(compressor=vllm_compressor)
    served = open_session(compressor=vllm_compressor, backend="vllm", vllm_url=url)
    for s in (plain, served):
        s.compress_chunks(TEXTS[1:4])
    (want, u1), (got, u2) = plain.answer(prompt, max_new_tokens=NEW), served.answer(prompt, max_new_tokens=NEW)
    assert got == want and len(u2.chunks) == 3 and u2.latent_slots == u1.latent_slots


def test_server_without_prompt_embeds_is_named(vllm_compressor, vllm_servers):
    _, plain_url = vllm_servers
    with pytest.raises(PromptEmbedsUnsupportedError, match="--enable-prompt-embeds"):
        RemoteVLLMBackend(vllm_compressor.decoder, plain_url)


def test_decoder_of_another_width_is_refused_by_the_probe(vllm_servers, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url, _ = vllm_servers
    path = build_vllm_tiny_decoder(tmp_path / "wide", hidden_size=128)
    wide = LatentDecoder(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                         AutoTokenizer.from_pretrained(path), None)
    with pytest.raises(HiddenSizeMismatchError, match="hidden size 96.*128-d"):
        RemoteVLLMBackend(wide, url)


def test_too_long_prompt_and_unreachable_server(vllm_compressor, vllm_servers):
    url, _ = vllm_servers
    remote = RemoteVLLMBackend(vllm_compressor.decoder, url)
    dec = vllm_compressor.decoder
    long_ids = dec.encode_prompts([dec.apply_chat(" ".join(TEXTS) * 12)])
    with pytest.raises(PromptTooLongError, match=f"max_model_len is {MAX_MODEL_LEN}"):
        remote.complete(long_ids, [[]], NEW)
    with pytest.raises(ServingError, match="cannot reach the vLLM server"):
        RemoteVLLMBackend(vllm_compressor.decoder, "http://127.0.0.1:9", timeout=5)
