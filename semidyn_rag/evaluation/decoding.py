"""Timed greedy decoding of one prepared prompt, with the base or the tuned decoder.

Prefill and decode are timed inside a single ``generate`` call: a streamer notes when the
first new token comes out (the prefill forward over the expanded ``inputs_embeds`` plus its
first sampling step); the rest is decode. Running a separate prefill forward would only time
the same work twice.

The baselines (uncompressed text, no context) read with the BASE decoder by default: when
the decoder is a PEFT model, its adapters are disabled for the call (``disable_adapter()``),
so "uncompressed" means the plain LLM a user would otherwise run, not one tuned to read
latents. A fully fine-tuned decoder has no base weights left; it is then used as is.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from ..decoder import LatentDecoder


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
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
    model = decoder.model
    device = model.get_input_embeddings().weight.device
    clock = _FirstTokenClock()
    kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
              "pad_token_id": decoder.tokenizer.pad_token_id}
    with decoder_mode(model, base):
        _sync(device)
        t0 = time.perf_counter()
        inp = decoder.expand([prompt_ids], [[x.to(device) for x in latents]])
        out = model.generate(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
                             max_new_tokens=max_new_tokens, streamer=clock, **kwargs)
        _sync(device)
        t1 = time.perf_counter()
    first = clock.first if clock.first is not None else t1
    text = decoder.tokenizer.decode(out[0], skip_special_tokens=True)
    return Generation(text, int(out.shape[1]), int(inp.inputs_embeds.shape[1]), first - t0, t1 - first)
