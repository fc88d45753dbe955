"""The fully dynamic baseline: continuous (any integer) sizes taken straight from the head.

The paper's ablation (Section 3.2) lets the head's prediction set the structure directly:
pool size S = round(2^y_hat) for mean pooling, M = round(L / 2^y_hat) latents for the token
stages, with no snapping to a small candidate set. It trains badly, which is the point; it
is kept so the ablation can be rerun. The pooling stage answers both questions (which sizes,
and rows at any size: ``dynamic_sizes`` and ``pool_dynamic``); ``dynamic_encode`` is the
shared forward pass of training and of ``fully_dynamic_compress`` (evaluating such a model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..types import CompressedContext


def dynamic_encode(comp, token_ids: list[list[int]], scale: float = 0.0):
    """(y_hat (B,), pooled rows per context, size per context); keeps autograd."""
    enc = comp.encoder(token_ids, extra=comp.pooling.extra_inputs())
    y_hat = comp.density_head(enc.eos_state).float()
    sizes = comp.pooling.dynamic_sizes(y_hat + scale, enc.n_tokens)
    return y_hat, comp.pooling.pool_dynamic(enc, sizes), sizes


@torch.inference_mode()
def fully_dynamic_compress(comp, texts: Sequence[str], scale: float = 0.0) -> list[CompressedContext]:
    """Compress ``texts`` the fully dynamic way: sizes straight from ``y_hat + scale``, no selector.

    Returns contexts ``comp.generate`` accepts; ``factor`` is the continuous pool size (mean
    pooling) or None (token stages, where the latent count is the size).
    """
    ids = comp.encoder.tokenize(list(texts))
    y_hat, pooled, sizes = dynamic_encode(comp, ids, scale)
    latents = comp._project(pooled)
    fp = comp.fingerprint
    return [CompressedContext(lat, len(i), comp.pooling.factor_of(s), float(yh), fp)
            for lat, i, s, yh in zip(latents, ids, sizes, y_hat.tolist())]
