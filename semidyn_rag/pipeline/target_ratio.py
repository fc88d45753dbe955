"""The scale that gives a set of contexts a target average compression ratio.

``scale`` shifts every density prediction alike (Eq. 1), but what a deployment is sized by is
the ratio it gets on its own corpus: "about 4x on average, dense chunks kept finer". Each
context's size can only get coarser as the scale grows, so the average ratio is a
non-decreasing step function of the scale, and bisection finds the smallest scale whose
average reaches the target. It reads the head's predictions and token counts only (what a
latent store keeps per chunk): no labels, no decoder, no pooling. The fit holds exactly for
the contexts it saw; on other text of the same kind it lands near the target.

Two averages: ``mean`` (of each context's tokens per latent, the paper's and the eval's
ratio) and ``sums`` (all tokens over all latents, what sets prefill cost and store size).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch

Average = Literal["mean", "sums"]
AVERAGES = ("mean", "sums")


@dataclass(frozen=True)
class ScaleFit:
    """A fitted scale and what it gives on the contexts it was fitted on."""

    scale: float
    target: float
    average: str  # which average reaches the target: "mean" or "sums"
    ratio_mean: float  # mean over contexts of tokens per latent, at ``scale``
    ratio_sums: float  # all tokens / all latents, at ``scale``
    contexts: int
    takes: str  # what the histogram counts: "factor" (mean pooling) or "length" (latent counts)
    histogram: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        hist = "  ".join(f"{k}: {v}" for k, v in self.histogram.items())
        return (f"scale {self.scale:g} gives a {self.average} ratio of at least {self.target:g} on {self.contexts} "
                f"contexts: mean {self.ratio_mean:.2f}x, sums {self.ratio_sums:.2f}x ({self.takes}s  {hist})")


def latent_counts(compressor, y_hat: Sequence[float], n_tokens: Sequence[int],
                  scale: float) -> tuple[list[int], list[int]]:
    """(choice per context, latents per context) at ``scale``, without reading features.

    The choice is what the pooling stage takes (a factor or a latent count); the stage says
    how many latents a context of ``n`` tokens gets at it.
    """
    if not len(y_hat):
        return [], []
    choice = compressor.select(torch.tensor(list(y_hat)), torch.tensor(list(n_tokens)), scale).tolist()
    pooling = compressor.pooling
    return choice, [pooling.n_latents(int(n), c) for n, c in zip(n_tokens, choice)]


def check_target(compressor, target, average: str = "mean") -> float:
    """``target`` as a float, checked before any work: raises ValueError for a compressor without
    a density head (its ratio is the factor it is given), a target that is not a positive
    finite number, or an unknown average."""
    if not compressor.config.density_head:
        raise ValueError("this compressor has no density head: its ratio is set by the factor or length "
                         "you pass, not by a scale")
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {', '.join(AVERAGES)}, got {average!r}")
    if isinstance(target, bool):
        raise ValueError(f"the target ratio must be a number, got {target!r}")
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"the target ratio must be a number, got {target!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the target ratio must be a positive finite number, got {target}")
    return value


def fit_scale(compressor, y_hat: Sequence[float], n_tokens: Sequence[int], target: float, *,
              average: Average = "mean", weights: Sequence[float] | None = None, tol: float = 1e-4) -> ScaleFit:
    """The smallest scale (to ``tol``, rounded up) at which the contexts' ``average`` ratio is
    at least ``target``.

    ``weights`` count each context as often as it will be read (e.g. how many questions or
    queries retrieve it); by default each counts once.

    Raises ValueError for a compressor without a density head (its ratio is the factor it is
    given), no contexts, a non-finite or non-positive target, an unknown average, and a
    target outside what the candidate set can give these contexts (the message names the
    reachable range).
    """
    target = check_target(compressor, target, average)
    if len(y_hat) != len(n_tokens):
        raise ValueError(f"{len(y_hat)} predictions for {len(n_tokens)} token counts")
    if not len(y_hat):
        raise ValueError("no contexts to fit a scale on")
    if any(int(n) < 1 for n in n_tokens):
        raise ValueError("every context needs at least one token")
    w = [1.0] * len(y_hat) if weights is None else [float(x) for x in weights]
    if len(w) != len(y_hat):
        raise ValueError(f"{len(w)} weights for {len(y_hat)} contexts")
    if not all(math.isfinite(x) and x >= 0 for x in w) or not sum(w) > 0:
        raise ValueError("weights must be finite, non-negative and not all zero")

    def ratios(scale: float) -> tuple[float, float, list[int]]:
        choice, lat = latent_counts(compressor, y_hat, n_tokens, scale)
        mean = sum(x * n / m for x, n, m in zip(w, n_tokens, lat)) / sum(w)
        sums = sum(x * n for x, n in zip(w, n_tokens)) / sum(x * m for x, m in zip(w, lat))
        return mean, sums, choice

    def value(scale: float) -> float:
        return ratios(scale)[0 if average == "mean" else 1]

    # Past these bounds the selector clamps every context to an end of the candidate set.
    bound = max(abs(float(y)) for y in y_hat) + math.log2(max(n_tokens) + 1) + math.log2(
        max(compressor.pooling.candidates) + 1) + 4
    lo, hi = -bound, bound
    lowest, highest = value(lo), value(hi)
    if target > highest:
        raise ValueError(f"a {average} ratio of {target:g} is out of reach: the coarsest choice for every context "
                         f"gives {highest:.2f}x")
    if target <= lowest:
        raise ValueError(f"every context at its finest choice already gives a {average} ratio of {lowest:.2f}x, "
                         f"at least the {target:g} asked for: no scale is needed")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if value(mid) >= target:
            hi = mid
        else:
            lo = mid
    scale = round(math.ceil(hi / tol) * tol, 10)  # a round number that still reaches the target
    mean, sums, choice = ratios(scale)
    if (mean if average == "mean" else sums) < target:  # float rounding above; never observed, cheap to guard
        scale = hi
        mean, sums, choice = ratios(scale)
    hist = {str(k): v for k, v in sorted(Counter(choice).items())}
    return ScaleFit(scale, target, average, mean, sums, len(choice), compressor.pooling.takes, hist)
