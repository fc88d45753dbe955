"""Prompt embeddings for a served decoder: the rendered prompt's token embeddings, latents at the placeholders.

vLLM reads a prompt as a ``(positions, hidden)`` tensor when prompt embeddings are enabled.
The rows are built exactly as the transformers path builds its ``inputs_embeds``
(:func:`semidyn_rag.pipeline.placeholder.expand_placeholders`, through ``LatentDecoder.expand``),
right-padded and cut back to each prompt's own length, so both backends prefill the same vectors.
Over the wire they travel as vLLM's Completions API expects: ``torch.save`` bytes in base64.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import torch

from .base import HiddenSizeMismatchError


def prompt_embeddings(decoder, prompt_ids: Sequence[Sequence[int]], latents: Sequence[Sequence[torch.Tensor]],
                      dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """One ``(positions, hidden)`` CPU tensor per prompt: token embeddings, each placeholder's latents in place.

    Raises PlaceholderCountError when a prompt's placeholders and contexts differ in number.
    """
    if not prompt_ids:
        return []
    device = decoder.model.get_input_embeddings().weight.device
    # plain tensors even when called under inference mode: the engine casts and copies them in its own thread
    with torch.inference_mode(False), torch.no_grad():
        inp = decoder.expand([list(r) for r in prompt_ids], [[x.to(device) for x in lat] for lat in latents],
                             padding_side="right")
        lengths = inp.attention_mask.sum(1).tolist()
        rows = inp.inputs_embeds.to("cpu", dtype or inp.inputs_embeds.dtype)
        return [rows[b, :n].clone() for b, n in enumerate(lengths)]


def check_hidden_size(decoder, served: int, where: str) -> None:
    """Raise HiddenSizeMismatchError when the served decoder is not as wide as this compressor's decoder."""
    ours = decoder.hidden_size
    if served != ours:
        raise HiddenSizeMismatchError(
            f"{where} serves a decoder with hidden size {served}, but this compressor's latents and token "
            f"embeddings are {ours}-d: serve the compressor's own decoder (`semidyn-rag export-decoder CKPT OUT`, "
            f"then `vllm serve OUT --enable-prompt-embeds`)")


def embeds_to_base64(embeds: torch.Tensor) -> str:
    """The wire form vLLM's Completions API decodes (``torch.load(weights_only=True)`` of base64 bytes)."""
    buf = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")
