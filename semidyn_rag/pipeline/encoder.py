"""The context encoder: tokenize, append the end marker, run one (bidirectional) forward pass.

Any ``AutoModel`` works: a causal LM's base model (Qwen3, Llama/SmolLM2), an embedding model
built on one (Qwen3-Embedding), or a BERT-style encoder (MiniLM). Causal LMs are made
bidirectional by passing ``is_causal=False`` to their forward call with a 2D padding mask,
which transformers 5 honours for sdpa and eager attention; flipping a flag on the attention
modules does not work (it only takes effect under FlashAttention-2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..loading import is_encoder_only

logger = logging.getLogger(__name__)


class ContextTooLongError(ValueError):
    """A context has more tokens than the encoder accepts (and truncation is off)."""


@dataclass
class EncoderOutput:
    """Hidden states of a padded batch and where each context's tokens sit in it."""

    hidden: torch.Tensor  # (B, L, d)
    text_start: int  # position of each row's first text token (after any [CLS]-style prefix)
    n_tokens: torch.Tensor  # (B,) text tokens per row, the end marker not counted
    eos_state: torch.Tensor  # (B, d) hidden state of the appended end marker
    extra_start: torch.Tensor | None  # (B,) where appended extra embeddings begin


class ContextEncoder(nn.Module):
    """Wraps an encoder model and its tokenizer; returns hidden states for a batch of texts."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        bidirectional: bool,
        max_tokens: int,
        on_overflow: str = "error",
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.native_bidirectional = is_encoder_only(model)
        if self.native_bidirectional and not bidirectional:
            raise ValueError(
                f"the encoder ({model.config.model_type}) is bidirectional by design and cannot be "
                "run causally; use a causal LM as encoder for this backbone"
            )
        self.bidirectional = bidirectional
        limit = getattr(model.config, "max_position_embeddings", None) or max_tokens
        self.max_tokens = min(max_tokens, limit - 2)  # room for the prefix and the end marker
        self.on_overflow = on_overflow
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise ValueError("the encoder tokenizer has neither an eos nor a sep token to append")
        self.eos_id = int(eos)
        # BERT-style encoders expect their [CLS] first; causal LMs get nothing prepended.
        cls = tokenizer.cls_token_id if self.native_bidirectional else None
        self.prefix = [int(cls)] if cls is not None else []
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens.

        Raises ValueError for an empty or whitespace-only text, and ContextTooLongError for one
        over ``max_tokens`` unless ``on_overflow="truncate"`` (then it is cut, with a warning).
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"context {i} is {type(t).__name__}, not str")
            if not t.strip():
                raise ValueError(f"context {i} is empty or whitespace only; nothing to compress")
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out = []
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"context {i} tokenizes to no tokens")
            if len(row) > self.max_tokens:
                if self.on_overflow != "truncate":
                    raise ContextTooLongError(
                        f"context {i} has {len(row)} tokens, over the encoder limit of {self.max_tokens} "
                        "(split it into chunks, or set on_overflow='truncate')"
                    )
                logger.warning("context %d truncated from %d to %d tokens", i, len(row), self.max_tokens)
                row = row[: self.max_tokens]
            out.append(list(row))
        return out

    def forward(self, token_ids: list[list[int]], extra: torch.Tensor | None = None) -> EncoderOutput:
        """Encode rows ``[prefix] text <eos> [extra]``, right-padded into one batch.

        ``extra`` (K x d) are embeddings appended after each row's end marker (compression
        tokens); they need a causal encoder so the end marker and text never see them.
        """
        device = self.input_embeddings().weight.device
        n = torch.tensor([len(r) for r in token_ids], device=device)
        p = len(self.prefix)
        rows = [self.prefix + r + [self.eos_id] for r in token_ids]
        width = max(len(r) for r in rows) + (0 if extra is None else extra.shape[0])
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, device=device)
            mask[b, : len(r)] = 1
        embeds = self.input_embeddings()(ids)
        extra_start = None
        if extra is not None:
            k = extra.shape[0]
            extra_start = n + p + 1
            pos = extra_start[:, None] + torch.arange(k, device=device)[None, :]
            batch = torch.arange(len(rows), device=device)[:, None].expand(-1, k)
            embeds = embeds.index_put((batch, pos), extra.to(embeds.dtype).expand(len(rows), -1, -1))
            mask = mask.index_put((batch, pos), torch.ones_like(pos))
        kwargs = {}
        if not self.native_bidirectional:
            kwargs["is_causal"] = not self.bidirectional
        out = self.model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        eos_state = hidden[torch.arange(len(rows), device=device), n + p]
        return EncoderOutput(hidden=hidden, text_start=p, n_tokens=n, eos_state=eos_state, extra_start=extra_start)
