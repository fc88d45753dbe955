"""Decoder backends without vLLM: the transformers backend, prompt embeddings, export, errors, routing."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from semidyn_rag.cli import main
from semidyn_rag.evaluation.decoding import decoding_backends, timed_generate_batch
from semidyn_rag.serving import (
    PromptTooLongError,
    ServingError,
    TransformersBackend,
    VLLMNotInstalledError,
    export_decoder,
    make_backend,
    prompt_embeddings,
    served_decoder_path,
)
from semidyn_rag.serving.base import fit_new_tokens
from semidyn_rag.serving.export import INFO_FILE, read_export_info
from semidyn_rag.serving.sampling import sampling_fields
from semidyn_rag.serving.vllm_remote import RemoteVLLMBackend
from tests.conftest import TEXTS
from tests.vllm.conftest import randomize_lora


def _prompts(comp):
    dec = comp.decoder
    ctx = comp.compress(TEXTS[:3])
    rendered = [dec.render("Where is the tower?", 3), dec.render("What is high?", 1), dec.apply_chat("Hello there")]
    return dec.encode_prompts(rendered), [[c.latents for c in ctx], [ctx[1].latents], []]


def test_transformers_backend_is_the_decoders_generate(compressor):
    ids, latents = _prompts(compressor)
    backend = TransformersBackend(compressor.decoder)
    done = backend.complete(ids, latents, 6)
    assert [c.text for c in done] == compressor.decoder.generate_ids(ids, latents, 6)
    tok = compressor.decoder.tokenizer
    assert [tok.decode(c.token_ids, skip_special_tokens=True) for c in done] == [c.text for c in done]
    assert done[0].prompt_positions == len(ids[0]) - 3 + sum(x.shape[0] for x in latents[0])
    assert done[2].prompt_positions == len(ids[2])
    assert "".join(backend.stream(ids[0], latents[0], 6)) == done[0].text


def test_prompt_embeddings_are_the_transformers_inputs_row_by_row(compressor):
    ids, latents = _prompts(compressor)
    rows = prompt_embeddings(compressor.decoder, ids, latents)
    left = compressor.decoder.expand(ids, latents)  # what generate reads, left-padded
    for b, r in enumerate(rows):
        assert not r.is_inference()
        n = int(left.attention_mask[b].sum())
        assert r.shape == (n, compressor.decoder.hidden_size)
        assert torch.equal(r, left.inputs_embeds[b, -n:])


def test_sampling_fields_are_greedy_unless_asked_and_refuse_unknown_arguments():
    f = sampling_fields(8, {})
    assert f["temperature"] == 0.0 and f["repetition_penalty"] == 1.0 and f["max_tokens"] == 8
    assert sampling_fields(8, {"do_sample": True, "top_p": 0.9})["temperature"] == 1.0
    assert sampling_fields(8, {"stop": "\n"})["stop"] == ["\n"]
    with pytest.raises(ServingError, match="num_beams"):
        sampling_fields(8, {"num_beams": 4})


def test_new_tokens_are_fitted_to_max_model_len():
    assert fit_new_tokens(10, 64, 50) == 40 and fit_new_tokens(10, 64, None) == 64
    with pytest.raises(PromptTooLongError, match="takes 50 positions .* max_model_len is 50"):
        fit_new_tokens(50, 8, 50)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install_it(compressor, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIDYN_RAG_CACHE", str(tmp_path))
    with pytest.raises(VLLMNotInstalledError, match=r"make \.venv-vllm"):
        make_backend(compressor, "vllm")
    assert not (tmp_path / "decoders").exists()  # nothing exported for an engine that cannot start
    with pytest.raises(ValueError, match="unknown decoder backend"):
        make_backend(compressor, "tgi")


def test_unreachable_server_is_named(compressor):
    with pytest.raises(ServingError, match="cannot reach the vLLM server at http://127.0.0.1:9/v1"):
        RemoteVLLMBackend(compressor.decoder, "http://127.0.0.1:9", timeout=5)


def test_export_merges_the_adapter_and_checks_greedy_answers(compressor, tmp_path):
    randomize_lora(compressor.decoder.model)
    info = export_decoder(compressor, tmp_path / "merged")
    assert info.merged_adapters and not info.base and info.answers_equal and info.probes == 4
    assert read_export_info(tmp_path / "merged")["compressor_fingerprint"] == compressor.fingerprint
    base = export_decoder(compressor, tmp_path / "base", base=True)
    assert base.base and base.answers_equal
    from safetensors.torch import load_file

    merged_w, base_w = (load_file(tmp_path / d / "model.safetensors") for d in ("merged", "base"))
    assert set(merged_w) == set(base_w) and not any("lora" in k for k in merged_w)
    assert any(not torch.equal(merged_w[k], base_w[k]) for k in merged_w)  # the adapter is in the weights
    assert hasattr(compressor.decoder.model, "peft_config")  # the compressor's own model kept its adapter
    with pytest.raises(FileExistsError):
        export_decoder(compressor, tmp_path / "merged")


def test_served_decoder_path_exports_once_into_the_cache(compressor, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIDYN_RAG_CACHE", str(tmp_path))
    first = served_decoder_path(compressor)
    stamp = (first / INFO_FILE).stat().st_mtime_ns
    assert served_decoder_path(compressor) == first and (first / INFO_FILE).stat().st_mtime_ns == stamp
    assert served_decoder_path(compressor, base=True) != first


def test_export_decoder_command(ckpt, tmp_path, capsys):
    out = tmp_path / "served"
    assert main(["export-decoder", str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "greedy answers identical" in printed and "--enable-prompt-embeds" in printed
    assert json.loads((out / INFO_FILE).read_text())["answers_equal"] is True
    assert main(["export-decoder", str(ckpt), str(out)]) == 2  # exists, no --overwrite


def test_evaluation_decoding_routes_through_a_backend(compressor):
    ids, latents = _prompts(compressor)
    plain = timed_generate_batch(compressor.decoder, ids, latents, max_new_tokens=5)
    with decoding_backends(TransformersBackend(compressor.decoder)):
        routed = timed_generate_batch(compressor.decoder, ids, latents, max_new_tokens=5)
        with pytest.raises(ValueError, match="base LLM"):  # a baseline with adapters needs a base backend
            timed_generate_batch(compressor.decoder, ids[2:], latents[2:], max_new_tokens=5, base=True)
    made = []
    with decoding_backends(None, lambda: made.append(1) or TransformersBackend(compressor.decoder)):
        timed_generate_batch(compressor.decoder, ids[2:], latents[2:], max_new_tokens=5, base=True)
        timed_generate_batch(compressor.decoder, ids[2:], latents[2:], max_new_tokens=5, base=True)
    assert made == [1]  # the base backend is made once, on first use
    assert [g.text for g in routed] == [g.text for g in plain]
    assert [g.prefill_tokens for g in routed] == [g.prefill_tokens for g in plain]
    assert [g.new_tokens for g in routed] == [g.new_tokens for g in plain]
