"""The fully dynamic baseline: continuous (any integer) pool sizes taken straight from the head.

The paper's ablation (Section 3.2) lets the head's prediction set the structure directly:
pool size S = round(2^y_hat) for mean pooling, M = round(L / 2^y_hat) latents for the token
backbones, with no snapping to a small candidate set. It trains badly, which is the point;
it is kept so the ablation can be rerun. ``mean_pool_windows`` pools with any window per row,
which the nested finest-window features of :class:`~semidyn_rag.backbones.MeanPooling` cannot;
``fully_dynamic_compress`` is the matching inference path (for evaluating such a model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backbones import CompressionTokens
from ..types import CompressedContext


def dynamic_pool_sizes(y_hat: torch.Tensor, lo: int, hi: int) -> list[int]:
    """Pool sizes round(2^y_hat) clamped to [lo, hi] (no gradient flows through the choice)."""
    return torch.exp2(y_hat.detach().float()).round().clamp(lo, hi).long().tolist()


def dynamic_lengths(y_hat: torch.Tensor, n_tokens: torch.Tensor, hi: int) -> list[int]:
    """Latent counts round(L / 2^y_hat) clamped to [1, hi] (token backbones)."""
    m = (n_tokens.float() / torch.exp2(y_hat.detach().float())).round()
    return m.clamp(1, hi).long().tolist()


def mean_pool_windows(hidden: torch.Tensor, text_start: int, n_tokens: torch.Tensor,
                      windows: list[int]) -> list[torch.Tensor]:
    """Per row, means of non-overlapping windows of ``windows[b]`` text tokens (last one partial).

    Windows start at the first text token (``text_start``) and cover ``n_tokens[b]`` tokens, as
    in the discrete backbone, so a window that is a candidate factor gives the same latents.
    """
    b, length, d = hidden.shape
    if len(windows) != b:
        raise ValueError(f"{len(windows)} window sizes for {b} rows")
    w = torch.tensor(windows, device=hidden.device)
    if bool((w < 1).any()):
        raise ValueError(f"window sizes must be positive, got {windows}")
    sizes = torch.div(n_tokens + w - 1, w, rounding_mode="floor")  # latents per row
    width = int(sizes.max())
    pos = torch.arange(length, device=hidden.device) - text_start
    valid = (pos[None, :] >= 0) & (pos[None, :] < n_tokens[:, None])
    window = torch.where(valid, pos[None, :].clamp(min=0) // w[:, None], width)
    sums = hidden.new_zeros((b, width + 1, d)).scatter_add(
        1, window[..., None].expand(-1, -1, d), hidden * valid[..., None].to(hidden.dtype))[:, :width]
    counts = torch.zeros((b, width + 1), dtype=hidden.dtype, device=hidden.device).scatter_add(
        1, window, valid.to(hidden.dtype))[:, :width]
    return [sums[i, : int(sizes[i])] / counts[i, : int(sizes[i]), None] for i in range(b)]


@torch.inference_mode()
def fully_dynamic_compress(comp, texts: Sequence[str], scale: float = 0.0) -> list[CompressedContext]:
    """Compress ``texts`` the fully dynamic way: sizes straight from ``y_hat + scale``, no selector.

    Returns contexts ``comp.generate`` accepts; ``factor`` is the continuous pool size (mean
    pooling) or None (token backbones, where the latent count is the size).
    """
    ids = comp.encoder.tokenize(list(texts))
    extra = comp.backbone.memory if isinstance(comp.backbone, CompressionTokens) else None
    enc = comp.encoder(ids, extra=extra)
    y_hat = comp.density_head(enc.eos_state).float()
    y = y_hat + scale
    cfg = comp.config
    if cfg.backbone == "mean_pool":
        sizes = dynamic_pool_sizes(y, cfg.factors[0], cfg.factors[-1])
        pooled = mean_pool_windows(enc.hidden, enc.text_start, enc.n_tokens, sizes)
    else:
        sizes = dynamic_lengths(y, enc.n_tokens, comp.backbone.max_len)
        feats = comp.backbone.extract(enc)
        pooled = comp.backbone.derive([f for f, _ in feats], None, sizes)
    latents = comp._project(pooled)
    fp = comp.fingerprint
    return [CompressedContext(lat, len(i), s if cfg.backbone == "mean_pool" else None, float(yh), fp)
            for lat, i, s, yh in zip(latents, ids, sizes, y_hat.tolist())]
