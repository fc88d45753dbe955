"""Records that travel between the stages and out to callers (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContextFeatures:
    """One context after the encoder pass, before any factor is chosen.

    ``features`` hold what every candidate can be derived from without re-encoding: for mean
    pooling the window means at the finest factor (with ``counts`` tokens per window), for
    last tokens the last ``max(lengths)`` states, for compression tokens the memory states.
    This is what the latent store keeps.
    """

    features: torch.Tensor  # (F, d_encoder)
    counts: torch.Tensor | None  # (F,) tokens per finest window; mean pooling only
    y_hat: float  # predicted log2 compression factor, before scale
    n_tokens: int  # source tokens of the context (eos not counted)
    fingerprint: str  # of the encoder side that produced the features


@dataclass(frozen=True)
class CompressedContext:
    """A context as the decoder reads it: ``latents`` replace its placeholder in the prompt."""

    latents: torch.Tensor  # (M, d_decoder)
    n_tokens: int  # source tokens of the context
    factor: int | None  # the chosen pooling factor (mean pooling), else None
    y_hat: float  # predicted log2 compression factor, before scale
    fingerprint: str  # of the whole compressor that produced the latents

    @property
    def n_latents(self) -> int:
        """M, the decoder positions this context occupies."""
        return int(self.latents.shape[0])

    @property
    def ratio(self) -> float:
        """The achieved compression ratio, source tokens per latent."""
        return self.n_tokens / self.n_latents
