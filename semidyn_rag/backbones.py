"""Feature extraction backbones: from encoder hidden states to latents of a chosen size.

Each backbone splits its work in two so that a corpus is encoded once and any ``scale`` can be
applied later without re-encoding:

* ``extract`` keeps, per context, the features every candidate can be derived from;
* ``derive`` turns those features into the M latent rows for one candidate.

Mean pooling keeps window means at the finest factor: a window of factor 2S is the union of
two windows of S (windows start at the first text token; the last one may be partial), so
count-weighted means of fine windows give every coarser window exactly. Last tokens keep the
last ``max(lengths)`` states (a shorter suffix is a suffix of it). Compression tokens append
``max(lengths)`` learned memory embeddings after the end marker of a causal encoder, so the
first M memory states do not depend on the later ones.
"""

from __future__ import annotations

import torch
from torch import nn

from .encoder import EncoderOutput


def _cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else like.new_zeros((0,) + tuple(like.shape[1:]))


class MeanPooling(nn.Module):
    """Non-overlapping window means; the factor is the window size S."""

    def __init__(self, factors: tuple[int, ...]):
        super().__init__()
        self.factors = tuple(sorted(factors))
        self.finest = self.factors[0]

    def extract(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per context: (means of the finest windows (W x d), token counts per window (W,))."""
        hidden, n = enc.hidden, enc.n_tokens
        b, length, d = hidden.shape
        s = self.finest
        width = int(torch.div(n.max() + s - 1, s, rounding_mode="floor"))
        pos = torch.arange(length, device=hidden.device) - enc.text_start  # text position
        valid = (pos[None, :] >= 0) & (pos[None, :] < n[:, None])  # (B, L)
        window = torch.where(valid, pos[None, :].clamp(min=0) // s, width)  # invalid -> spill bin
        sums = hidden.new_zeros((b, width + 1, d)).scatter_add_(
            1, window[..., None].expand(-1, -1, d), hidden * valid[..., None].to(hidden.dtype)
        )[:, :width]
        counts = torch.zeros((b, width + 1), dtype=torch.long, device=hidden.device).scatter_add_(
            1, window, valid.long()
        )[:, :width]
        out = []
        for i in range(b):
            w = int(torch.div(n[i] + s - 1, s, rounding_mode="floor"))
            c = counts[i, :w]
            out.append((sums[i, :w] / c[:, None].to(sums.dtype), c))
        return out

    def derive(
        self, features: list[torch.Tensor], counts: list[torch.Tensor], factors: list[int]
    ) -> list[torch.Tensor]:
        """Window means at each context's factor, from its finest-window means and counts."""
        for f in factors:
            if f % self.finest:
                raise ValueError(f"factor {f} is not a multiple of the finest factor {self.finest}")
        if not features:
            return []
        device = features[0].device
        group_parts, offset, sizes = [], 0, []
        for feat, f in zip(features, factors):
            k = f // self.finest
            g = torch.arange(feat.shape[0], device=device) // k
            m = int(g[-1]) + 1 if feat.shape[0] else 0
            group_parts.append(g + offset)
            sizes.append(m)
            offset += m
        group = torch.cat(group_parts)
        feats = _cat(features, features[0])
        cnt = torch.cat(counts).to(feats.dtype)
        sums = feats.new_zeros((offset, feats.shape[1])).index_add_(0, group, feats * cnt[:, None])
        tot = feats.new_zeros((offset,)).index_add_(0, group, cnt)
        return list(torch.split(sums / tot[:, None], sizes))


class LastTokens(nn.Module):
    """The hidden states of the last M positions (the end marker included)."""

    def __init__(self, lengths: tuple[int, ...]):
        super().__init__()
        self.max_len = max(lengths)

    def extract(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, None]]:
        out = []
        for i in range(enc.hidden.shape[0]):
            end = int(enc.n_tokens[i]) + enc.text_start + 1  # one past the end marker
            start = max(enc.text_start, end - self.max_len)
            out.append((enc.hidden[i, start:end], None))
        return out

    def derive(self, features: list[torch.Tensor], counts, lengths: list[int]) -> list[torch.Tensor]:
        return [feat[-min(m, feat.shape[0]) :] for feat, m in zip(features, lengths)]


class CompressionTokens(nn.Module):
    """Learned memory tokens appended after the end marker; latents are their states."""

    def __init__(self, lengths: tuple[int, ...], d: int, init: torch.Tensor | None = None):
        super().__init__()
        self.max_len = max(lengths)
        emb = torch.randn(self.max_len, d) * 0.02 if init is None else init.clone()
        self.memory = nn.Parameter(emb)

    def extract(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, None]]:
        out = []
        for i in range(enc.hidden.shape[0]):
            s = int(enc.extra_start[i])
            out.append((enc.hidden[i, s : s + self.max_len], None))
        return out

    def derive(self, features: list[torch.Tensor], counts, lengths: list[int]) -> list[torch.Tensor]:
        return [feat[:m] for feat, m in zip(features, lengths)]
