"""Decoder backends: who decodes a prompt whose placeholders read latents.

``transformers`` (the default) runs the compressor's own decoder with Hugging Face
``generate``. ``vllm`` hands the same prompt positions to vLLM as prompt embeddings: an engine
in this process, or, with ``vllm_url``, a ``vllm serve MODEL --enable-prompt-embeds`` server.
``make_backend`` picks one from configuration; sessions, the CLI, the evaluation and the
LlamaIndex LLM all go through it. vLLM itself is imported only when an in-process engine is made.
"""

from __future__ import annotations

from .base import (
    Completion,
    DecoderBackend,
    HiddenSizeMismatchError,
    PromptEmbedsUnsupportedError,
    PromptTooLongError,
    ServingError,
    VLLMNotInstalledError,
)
from .embeds import prompt_embeddings
from .export import DecoderExport, export_decoder, served_decoder_path
from .transformers_backend import TransformersBackend

BACKENDS = ("transformers", "vllm")


def make_backend(compressor, backend: str | DecoderBackend = "transformers", *, vllm_url: str | None = None,
                 base: bool = False, lock=None, **kwargs) -> DecoderBackend:
    """A decoder backend for ``compressor`` by name (a backend object is returned as is).

    ``vllm`` with ``vllm_url`` talks to that server (``kwargs`` go to RemoteVLLMBackend: model,
    api_key, timeout); without, it starts an engine here (``kwargs`` go to ``vllm.LLM``) on the
    decoder's merged weights, or on its base weights with ``base``. Raises ValueError for an
    unknown name, VLLMNotInstalledError when vLLM is missing for an in-process engine.
    """
    if isinstance(backend, DecoderBackend):
        return backend
    if backend == "transformers":
        if vllm_url:
            raise ValueError("vllm_url applies to backend='vllm' only")
        if base:
            raise ValueError("the transformers backend reads with the compressor's decoder; switch its adapters "
                             "off with evaluation.decoding.decoder_mode for the base LLM")
        return TransformersBackend(compressor.decoder, lock)
    if backend == "vllm":
        if vllm_url:
            if base:
                raise ValueError("a remote server serves one decoder; serve the base LLM on another server and "
                                 "pass its URL")
            from .vllm_remote import RemoteVLLMBackend

            return RemoteVLLMBackend(compressor.decoder, vllm_url, **kwargs)
        from .vllm_engine import VLLMBackend

        return VLLMBackend.for_compressor(compressor, base=base, **kwargs)
    raise ValueError(f"unknown decoder backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "Completion",
    "DecoderBackend",
    "DecoderExport",
    "HiddenSizeMismatchError",
    "PromptEmbedsUnsupportedError",
    "PromptTooLongError",
    "ServingError",
    "TransformersBackend",
    "VLLMNotInstalledError",
    "export_decoder",
    "make_backend",
    "prompt_embeddings",
    "served_decoder_path",
]
