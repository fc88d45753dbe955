"""Density labels: y = log2(L_ctx / L_summary), counted with the encoder's tokenizer (Eq. 6).

L_ctx is the number of tokens the encoder reads for the context *including* the appended end
marker (the authors count the eos too); L_summary is the token count of the ultra-concise
summary, without an end marker. A record given an offline proxy instead of a summary has
L_summary = max(1, fraction * L_ctx). A context with neither has no label: it is masked out
of the MSE term (mask 0), never given the value 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from .records import TrainingRecord


def density_label(n_context_tokens: int, n_summary_tokens: float) -> float:
    """log2 of context tokens (eos included) over summary tokens; raises ValueError if either < 1."""
    if n_context_tokens < 1 or n_summary_tokens <= 0:
        raise ValueError(f"token counts must be positive (context {n_context_tokens}, summary {n_summary_tokens})")
    return math.log2(n_context_tokens / n_summary_tokens)


class DensityLabeler:
    """Computes each context's label from its encoder token ids and the record's summary."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, count_eos: bool = True):
        self.tokenizer = tokenizer
        self.count_eos = count_eos

    def count(self, text: str) -> int:
        """Encoder tokens of ``text`` (no special tokens, no eos)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def labels(self, record: TrainingRecord, context_lengths: Sequence[int] | None = None) -> list[float | None]:
        """One label per context of ``record`` (None = no label; excluded from the MSE).

        ``context_lengths`` are the encoder token counts of the contexts as the encoder reads
        them (after any truncation), eos not counted; computed here when not given.
        """
        contexts = record.contexts
        lengths = list(context_lengths) if context_lengths is not None else [self.count(c) for c in contexts]
        if len(lengths) != len(contexts):
            raise ValueError(f"{len(lengths)} lengths for {len(contexts)} contexts")
        out: list[float | None] = []
        for n, summary, fraction in zip(lengths, record.summaries, record.summary_fractions):
            n_ctx = n + (1 if self.count_eos else 0)
            if summary is not None:
                n_sum = self.count(summary)
                out.append(density_label(n_ctx, n_sum) if n_sum else None)
            elif fraction is not None:
                out.append(density_label(n_ctx, max(1.0, fraction * n_ctx)))
            else:
                out.append(None)
        return out
