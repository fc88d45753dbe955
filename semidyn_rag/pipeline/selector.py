"""The Discrete Ratio Selector: a scalar quantizer from predicted density to a fixed candidate.

The density head predicts y_hat = log2(compression factor). The selector adds the user's
``scale`` (Eq. 1), exponentiates (Eq. 2) and snaps the result to the nearest member of a small,
fixed candidate set (Eq. 3 for factors, Eqs. 4-5 for token counts). Keeping the set finite is
the paper's whole point: the decoder only ever sees operations it was trained on.

"Nearest" is measured between compression factors in linear space by default (the authors'
trained configuration), or between their log2 values (``space="log"``). ``mode="ceil"`` takes
the smallest candidate at or above the prediction, ``"floor"`` the largest at or below; all
modes clamp to the ends of the set. Ties go to the smaller value (more fidelity).

``scale`` must be finite (``check_scale``): a NaN or infinite scale is refused rather than
quietly mapped to some factor. Any finite scale is accepted; predictions are clamped in log2
space to one step beyond the candidate set before exponentiating, so ``2^(y + 60)`` neither
overflows nor loses the comparison to float rounding: it simply selects the coarsest factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import overload

import torch

from ..config import CompareSpace, RoundingMode


class DiscreteRatioSelector:
    """Maps predicted log2 densities to discrete compression factors or latent counts. Pure."""

    def __init__(
        self,
        ratios: Sequence[int] = (2, 4, 8, 16, 32),
        mode: RoundingMode = "round",
        space: CompareSpace = "linear",
    ) -> None:
        if not ratios or any(r < 1 for r in ratios):
            raise ValueError(f"ratios must be positive integers, got {tuple(ratios)}")
        if mode not in ("round", "ceil", "floor"):
            raise ValueError(f"mode must be round, ceil or floor, got {mode!r}")
        if space not in ("linear", "log"):
            raise ValueError(f"space must be linear or log, got {space!r}")
        self.ratios = tuple(sorted(set(int(r) for r in ratios)))
        self.mode = mode
        self.space = space

    def __repr__(self) -> str:
        return f"DiscreteRatioSelector(ratios={self.ratios}, mode={self.mode!r}, space={self.space!r})"

    @overload
    def select(self, y_hat: float, scale: float = 0.0) -> int: ...
    @overload
    def select(self, y_hat: torch.Tensor, scale: float = 0.0) -> torch.Tensor: ...

    def select(self, y_hat, scale: float = 0.0):
        """Return the compression factor for ``y_hat`` (an int, or a LongTensor of factors).

        Raises ValueError for a non-finite ``scale`` or ``y_hat``.
        """
        y = _as_tensor(y_hat) + check_scale(scale)
        out = _quantize(torch.exp2(_clamp_log2(y, self.ratios)), self.ratios, self.mode, self.space)
        return int(out) if _is_scalar(y_hat) else out

    @overload
    def select_length(
        self, y_hat: float, n_tokens: int, lengths: Sequence[int] = ..., scale: float = 0.0
    ) -> int: ...
    @overload
    def select_length(
        self, y_hat: torch.Tensor, n_tokens: torch.Tensor, lengths: Sequence[int] = ..., scale: float = 0.0
    ) -> torch.Tensor: ...

    def select_length(self, y_hat, n_tokens, lengths: Sequence[int] = (16, 32, 64, 128), scale: float = 0.0):
        """Return the number of latent tokens M for a context of ``n_tokens`` (Eqs. 4 and 5).

        The continuous target is m_hat = n_tokens / 2^(y_hat + scale); it is snapped to the
        nearest of ``lengths`` with this selector's mode and comparison space. Raises
        ValueError for a non-finite ``scale`` or ``y_hat`` and for non-positive ``n_tokens``.
        """
        if not lengths or any(m < 1 for m in lengths):
            raise ValueError(f"lengths must be positive integers, got {tuple(lengths)}")
        y = _as_tensor(y_hat) + check_scale(scale)
        n = _as_tensor(n_tokens)
        if bool((n <= 0).any()):
            raise ValueError("n_tokens must be positive")
        cands = tuple(sorted(set(int(m) for m in lengths)))
        m_hat = torch.exp2(_clamp_log2(torch.log2(n) - y, cands))
        out = _quantize(m_hat, cands, self.mode, self.space)
        return int(out) if _is_scalar(y_hat) and _is_scalar(n_tokens) else out


def check_scale(scale) -> float:
    """``scale`` as a float; raises ValueError when it is not a finite real number.

    Finite values of any size are fine (they clamp to the ends of the candidate set); NaN
    and infinity have no meaning as a shift of log2 factors, so they are refused.
    """
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be one number, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, got {value}: NaN and infinity select no factor")
    return value


def _clamp_log2(y: torch.Tensor, candidates: Sequence[int]) -> torch.Tensor:
    """``y`` (log2 of a factor or length) limited to one step beyond the candidates' range.

    Every mode and space picks the same end candidate for any value past that step, so the
    clamp changes no choice; it keeps ``exp2`` finite and the linear distances exact.
    """
    return y.clamp(math.log2(min(candidates)) - 1, math.log2(max(candidates)) + 1)


def _is_scalar(x) -> bool:
    return not isinstance(x, torch.Tensor) or x.dim() == 0


def _as_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"non-finite density prediction: {x}")
    return t


def _quantize(value: torch.Tensor, candidates: tuple[int, ...], mode: str, space: str) -> torch.Tensor:
    """Snap positive ``value`` (any shape) to ``candidates`` (sorted ascending)."""
    cand = torch.tensor(candidates, dtype=torch.float64)
    v = value.unsqueeze(-1)
    if mode == "ceil":
        # smallest candidate >= value; values above the top clamp to it
        idx = (v > cand).sum(-1).clamp(max=len(candidates) - 1)
    elif mode == "floor":
        # largest candidate <= value; values below the bottom clamp to it
        idx = ((v >= cand).sum(-1) - 1).clamp(min=0)
    else:
        if space == "log":
            dist = (torch.log2(v) - torch.log2(cand)).abs()
        else:
            dist = (v - cand).abs()
        idx = dist.argmin(-1)  # argmin returns the first minimum: ties go to the smaller one
    return torch.tensor(candidates, dtype=torch.long)[idx]


def authors_length(y_hat, n_tokens, candidates: Sequence[int], scale: float = 0.0):
    """Latent counts by the authors' int rule: M = candidate nearest floor(L * 2^-(y + scale)), min(M, L).

    ``L = n_tokens + 1`` (their eval appends the end marker and counts it); computed in fp32
    as their code does; ties go to the smaller candidate (their config lists ascend).
    """
    y = torch.as_tensor(y_hat, dtype=torch.float32) + check_scale(scale)
    length = torch.as_tensor(n_tokens).long() + 1
    raw = (length.float() * torch.exp2(-y).clamp(1e-9, 1.0)).long()
    cand = torch.tensor(sorted(candidates), dtype=torch.long)
    m = cand[(raw.unsqueeze(-1) - cand).abs().argmin(-1)]
    m = torch.minimum(m, length).clamp(min=1)
    return int(m) if m.dim() == 0 else m
