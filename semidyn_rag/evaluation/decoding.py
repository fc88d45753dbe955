"""Timed greedy decoding of one prepared prompt, with the base or the tuned decoder.

Prefill and decode are timed inside a single ``generate`` call: a streamer notes when the
first new token comes out (the prefill forward over the expanded ``inputs_embeds`` plus its
first sampling step); the rest is decode. Running a separate prefill forward would only time
the same work twice.

The baselines (uncompressed text, no context) read with the BASE decoder by default: when
the decoder is a PEFT model, its adapters are disabled for the call (``disable_adapter()``),
so "uncompressed" means the plain LLM a user would otherwise run, not one tuned to read
latents. A fully fine-tuned decoder has no base weights left; it is then used as is.

Inside ``decoding_backends(tuned, base)`` the same calls go to decoder backends instead
(:mod:`semidyn_rag.serving`, e.g. vLLM): ``tuned`` for the compressed systems, ``base`` (a
backend, or a function making one on first use) for the baselines that read with the base LLM.
Times then come from the backend: each request's own first token and end.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from ..pipeline.decoder import LatentDecoder


@dataclass(frozen=True)
class Generation:
    """The answer text and what producing it cost."""

    text: str
    new_tokens: int
    prefill_tokens: int
    prefill_s: float  # generate() start -> first new token (expansion + prefill forward)
    decode_s: float  # first new token -> last


class _FirstTokenClock(BaseStreamer):
    """Records when ``generate`` hands out its first new token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def has_adapters(model: torch.nn.Module) -> bool:
    """True when ``model`` is a PEFT model whose adapters can be switched off."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def decoder_mode(model: torch.nn.Module, base: bool):
    """A context manager that runs ``model`` as its base model when ``base`` (and it has adapters)."""
    return model.disable_adapter() if base and has_adapters(model) else contextlib.nullcontext()


_ROUTED: ContextVar[dict | None] = ContextVar("semidyn_decoding_backends", default=None)


@contextlib.contextmanager
def decoding_backends(tuned, base=None):
    """Route ``timed_generate``/``timed_generate_batch`` through decoder backends while inside.

    ``base`` serves the baselines when they read with the base LLM: a backend, or a zero-argument
    function that makes one the first time a baseline is decoded; None refuses such baselines.
    """
    routes = {"tuned": tuned, "base": base}
    token = _ROUTED.set(routes)
    try:
        yield routes
    finally:
        _ROUTED.reset(token)


def routed_backend() -> str | None:
    """The name of the backend answers are decoded with inside ``decoding_backends``; None outside."""
    routes = _ROUTED.get()
    return None if routes is None else getattr(routes["tuned"], "name", type(routes["tuned"]).__name__)


def _routed_generate(routes: dict, decoder: LatentDecoder, prompt_ids, latents, max_new_tokens: int,
                     base: bool) -> list[Generation]:
    """``timed_generate_batch`` on a backend: per-question shares of the batch's first-token and end times."""
    which = "base" if base and has_adapters(decoder.model) else "tuned"
    backend = routes[which]
    if backend is None:
        raise ValueError("the baselines read with the base LLM, which no backend serves here: serve "
                         "`semidyn-rag export-decoder CKPT OUT --base` or pass --baseline-decoder tuned")
    if callable(backend) and not hasattr(backend, "complete"):
        backend = routes[which] = backend()
    done = backend.complete(prompt_ids, latents, max_new_tokens)
    n = len(done)
    first = max((c.ttft_s if c.ttft_s is not None else c.total_s) for c in done)
    end = max(c.total_s for c in done)
    return [Generation(c.text, len(c.token_ids), c.prompt_positions, first / n, (end - first) / n) for c in done]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(
    decoder: LatentDecoder,
    prompt_ids: list[int],
    latents: list[torch.Tensor],
    *,
    max_new_tokens: int,
    base: bool = False,
) -> Generation:
    """Greedy-decode one prompt (placeholders replaced by ``latents``); return text and timings.

    Uses exactly the generation settings of ``LatentDecoder.generate`` (greedy, the
    tokenizer's pad token), so answers equal ``SemiDynamicCompressor.generate`` for batch 1.
    """
    return timed_generate_batch(decoder, [prompt_ids], [latents], max_new_tokens=max_new_tokens, base=base)[0]


@torch.inference_mode()
def timed_generate_batch(
    decoder: LatentDecoder,
    prompt_ids: list[list[int]],
    latents: list[list[torch.Tensor]],
    *,
    max_new_tokens: int,
    base: bool = False,
) -> list[Generation]:
    """Greedy-decode several prompts as one left-padded batch.

    Each answer's ``prefill_s`` and ``decode_s`` are the batch's times divided by its size
    (a per-question share of the throughput, not the latency one question would see alone);
    with one prompt they are that prompt's own times.
    """
    routes = _ROUTED.get()
    if routes is not None:
        return _routed_generate(routes, decoder, prompt_ids, latents, max_new_tokens, base)
    model = decoder.model
    device = model.get_input_embeddings().weight.device
    clock = _FirstTokenClock()
    pad = decoder.tokenizer.pad_token_id
    kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "pad_token_id": pad}
    with decoder_mode(model, base):
        _sync(device)
        t0 = time.perf_counter()
        inp = decoder.expand(prompt_ids, [[x.to(device) for x in lat] for lat in latents])
        out = model.generate(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
                             max_new_tokens=max_new_tokens, streamer=clock, **kwargs)
        _sync(device)
        t1 = time.perf_counter()
    first = clock.first if clock.first is not None else t1
    n = len(prompt_ids)
    prefill = inp.attention_mask.sum(1).tolist()
    return [Generation(decoder.tokenizer.decode(row, skip_special_tokens=True), _new_tokens(row, decoder.tokenizer),
                       int(prefill[i]), (first - t0) / n, (t1 - first) / n) for i, row in enumerate(out)]


def _new_tokens(row: torch.Tensor, tokenizer) -> int:
    """Tokens generated for one row of a batch: up to and including its first end token."""
    ends = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    for i, t in enumerate(row.tolist()):
        if t in ends:
            return i + 1
    return int(row.shape[0])
