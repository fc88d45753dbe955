"""The pooling stage: from encoder hidden states to the latent rows of one chosen size.

Each stage owns its rules, so no caller asks which kind it is: whether it takes a compression
factor or a latent count, how many latents a context gets, whether the appended end marker is
pooled, how windows align, what features the latent store keeps and how every candidate is
derived from them, and what extra encoder input it needs (memory embeddings).

The work is split in two so that a corpus is encoded once and read at any scale later:

* ``extract`` keeps, per context, the features every candidate derives from;
* ``derive`` turns those into the M latent rows for one candidate.

Mean pooling keeps window sums' means at the finest factor with their token counts; windows
of a coarser factor are unions of finest windows (both alignments nest), so any candidate is
derived exactly. Two window rules exist, both from the authors' code:

* ``align="start"`` (their semi-dynamic inference path): windows start at the first pooled
  token, the last one may be partial, each window is a true mean;
* ``align="end"`` (their static and multi-ratio models): the sequence is left-padded with
  zeros to a multiple of the window and every window is divided by the window size.

``pool_end_marker`` says whether the appended end marker is pooled with the text (the
authors' eval appends it to every context, so M = ceil((n + 1) / S)); checkpoints written by
semidyn-rag before format 2 pooled text tokens only and keep that rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .encoder import EncoderOutput
from .selector import authors_length

# The rule of every mean-pooling checkpoint written before the rule was recorded.
LEGACY_MEAN_RULE = {"pool_end_marker": False, "pool_align": "start"}


class PoolingStage(nn.Module):
    """Base of the pooling stages: one candidate set, a size per context, features -> rows."""

    kind: ClassVar[str]
    takes: ClassVar[str]  # "factor" (window size) or "length" (latent count)

    def __init__(self, candidates: Sequence[int], *, length_rule: str = "nearest"):
        super().__init__()
        self.candidates = tuple(sorted(set(int(c) for c in candidates)))
        # How a token stage turns a prediction into a latent count: "nearest" snaps
        # n / 2^(y + scale) with the selector's mode and space; "authors" is their
        # CtxCompSemiDynamicModel int rule: the candidate nearest floor(L * 2^-(y + scale)),
        # L = n + 1 (the end marker counts), then at most L.
        if length_rule not in ("nearest", "authors"):
            raise ValueError(f"length_rule must be 'nearest' or 'authors', got {length_rule!r}")
        self.length_rule = length_rule

    @classmethod
    def from_config(cls, config, d_encoder: int) -> PoolingStage:
        """The stage a ``CompressorConfig`` describes (token stages read ``lengths``)."""
        return cls(config.lengths, length_rule=config.length_rule)

    # -- rules callers ask for ------------------------------------------------------------------

    def get_config_dict(self) -> dict:
        """The stage's settings as saved next to its weights (``pooling/config.json``)."""
        out = {"kind": self.kind, "takes": self.takes, "candidates": list(self.candidates)}
        return out if self.length_rule == "nearest" else {**out, "length_rule": self.length_rule}

    def fingerprint_dict(self) -> dict:
        """Rule settings beyond kind and candidates that change latents ({} = the legacy rules)."""
        return {} if self.length_rule == "nearest" else {"length_rule": self.length_rule}

    def head_init(self) -> float:
        """Initial log2 factor of the density head: a middling choice before training."""
        return 2.0

    def extra_inputs(self) -> torch.Tensor | None:
        """Embeddings the encoder appends after the end marker (memory tokens), else None."""
        return None

    def select(self, selector, y_hat, n_tokens, scale: float = 0.0):
        """Each context's size (factor or latent count) from the head's prediction and ``scale``."""
        if self.length_rule == "authors":
            return authors_length(y_hat, n_tokens, self.candidates, scale)
        return selector.select_length(y_hat, n_tokens, self.candidates, scale)

    def check_size(self, value: int) -> int:
        """Validate a size forced by the caller; returns it or raises ValueError."""
        if int(value) < 1:
            raise ValueError(f"{self.takes} must be positive, got {value}")
        return int(value)

    def forced(self, factor: int | None, length: int | None) -> int | None:
        """The caller's forced size, if any; refuses the keyword this stage does not take."""
        given, other = (factor, length) if self.takes == "factor" else (length, factor)
        if other is not None:
            wrong = "length" if self.takes == "factor" else "factor"
            raise ValueError(f"pooling {self.kind} takes {self.takes}=, not {wrong}=")
        return None if given is None else self.check_size(given)

    def factor_of(self, value: int) -> int | None:
        """The compression factor reported for a chosen size (None when the size is a count)."""
        return value if self.takes == "factor" else None

    def n_latents(self, n_tokens: int, value: int) -> int:
        """Latents a context of ``n_tokens`` text tokens gets at size ``value``."""
        raise NotImplementedError

    def is_coarsest(self, value: int) -> bool:
        """Whether ``value`` already gives the fewest latents this stage can give."""
        return value == (self.candidates[-1] if self.takes == "factor" else self.candidates[0])

    def dynamic_sizes(self, y: torch.Tensor, n_tokens: torch.Tensor) -> list[int]:
        """Continuous sizes straight from ``y = y_hat + scale`` (the fully dynamic ablation)."""
        m = (n_tokens.float() / torch.exp2(y.detach().float())).round()
        return m.clamp(1, max(self.candidates)).long().tolist()

    @property
    def pools_windows(self) -> bool:
        """Whether latents are windows over the context's tokens (so token rows can be pooled alike)."""
        return False

    def pool_ids(self, ids: Sequence[int], end_id: int, table: torch.Tensor, size: int) -> torch.Tensor:
        """This stage's windows applied to rows ``table[id]`` of one context's tokens (window stages only)."""
        raise TypeError(f"pooling {self.kind} does not pool windows of tokens")

    def window_index(self, n_tokens: int, size: int) -> torch.Tensor:
        """The latent row each pooled position falls in at ``size`` (window stages only).

        Positions are the context's text tokens ``0 .. n_tokens - 1``, then the end marker when
        this stage pools it; the result has one entry per position (row ``i`` of the latents is
        the window of the positions holding ``i``).
        """
        raise TypeError(f"pooling {self.kind} does not pool windows of tokens")

    # -- features ---------------------------------------------------------------------------------

    def extract(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        raise NotImplementedError

    def derive(self, features: list[torch.Tensor], counts: list, values: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def pool_dynamic(self, enc: EncoderOutput, sizes: list[int]) -> list[torch.Tensor]:
        """Rows at any (non-candidate) size per context, from the encoder output directly."""
        feats = self.extract(enc)
        return self.derive([f for f, _ in feats], [c for _, c in feats], sizes)

    # -- persistence ------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write ``config.json`` and, for stages with weights, ``model.safetensors``."""
        import json

        from safetensors.torch import save_file

        from ..atomic import atomic_path, atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "config.json", json.dumps(self.get_config_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if state:
            with atomic_path(folder / "model.safetensors") as tmp:
                save_file(state, str(tmp))

    def load(self, folder: Path) -> None:
        """Check ``folder``'s saved rule against this stage and load its weights (if it has any).

        Raises ValueError when the folder holds another kind or candidate set, or its weights
        do not fit (the caller names the checkpoint).
        """
        import json

        from safetensors.torch import load_file

        cfg_file = folder / "config.json"
        if cfg_file.is_file():
            saved = json.loads(cfg_file.read_text())
            mine = self.get_config_dict()
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            if diff:
                raise ValueError(f"{cfg_file} describes another pooling stage ({', '.join(diff)} differ: "
                                 f"saved {[saved.get(k) for k in diff]}, config {[mine.get(k) for k in diff]})")
        if self.has_weights:
            file = folder / "model.safetensors"
            if not file.is_file():
                raise ValueError(f"{file} is missing: the {self.kind} stage has weights")
            self.load_state_dict(load_file(str(file)))

    @property
    def has_weights(self) -> bool:
        return any(True for _ in self.parameters())


class MeanPooling(PoolingStage):
    """Non-overlapping window means; the factor is the window size S."""

    kind = "mean_pool"
    takes = "factor"

    @classmethod
    def from_config(cls, config, d_encoder: int) -> MeanPooling:
        return cls(config.factors, pool_end_marker=config.pool_end_marker, pool_align=config.pool_align)

    def __init__(self, factors: Sequence[int], *, pool_end_marker: bool = True, pool_align: str = "start"):
        super().__init__(factors)
        if pool_align not in ("start", "end"):
            raise ValueError(f"pool_align must be 'start' or 'end', got {pool_align!r}")
        self.finest = self.candidates[0]
        bad = [f for f in self.candidates if f % self.finest]
        if bad:
            raise ValueError(f"mean pooling factors must be multiples of the smallest ({self.finest}); {bad} are not")
        self.pool_end_marker = bool(pool_end_marker)
        self.pool_align = pool_align

    def get_config_dict(self) -> dict:
        return {**super().get_config_dict(), "pool_end_marker": self.pool_end_marker, "pool_align": self.pool_align}

    def fingerprint_dict(self) -> dict:
        rule = {"pool_end_marker": self.pool_end_marker, "pool_align": self.pool_align}
        return {} if rule == LEGACY_MEAN_RULE else rule

    def head_init(self) -> float:
        return math.log2(math.sqrt(self.candidates[0] * self.candidates[-1]))

    def select(self, selector, y_hat, n_tokens, scale: float = 0.0):
        return selector.select(y_hat, scale)

    def check_size(self, value: int) -> int:
        if int(value) < 1 or int(value) % self.finest:
            raise ValueError(f"cannot pool at factor {value}: it is not a positive multiple of the finest "
                             f"factor {self.finest}")
        return int(value)

    def pooled_length(self, n_tokens: int) -> int:
        """Tokens that are pooled: the text, plus the end marker when the rule pools it."""
        return int(n_tokens) + self.pool_end_marker

    def n_latents(self, n_tokens: int, value: int) -> int:
        return max(1, math.ceil(self.pooled_length(n_tokens) / value))

    def dynamic_sizes(self, y: torch.Tensor, n_tokens: torch.Tensor) -> list[int]:
        """Pool sizes round(2^y) clamped to the candidate range (no gradient through the choice)."""
        return torch.exp2(y.detach().float()).round().clamp(self.finest, self.candidates[-1]).long().tolist()

    def _windows(self, length: torch.Tensor, size: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Window index of each position ``pos`` (B, L) for rows of ``length`` pooled tokens."""
        if self.pool_align == "end":
            pad = (-length) % size  # left zero padding up to a multiple of the window
            return (pos + pad[:, None]) // size[:, None]
        return pos // size[:, None]

    def _pool(self, hidden: torch.Tensor, start: int, length: torch.Tensor, size: torch.Tensor):
        """(window sums (B, W, d), real-token counts (B, W), windows per row (B,)) of a batch."""
        b, width_all, d = hidden.shape
        pos = torch.arange(width_all, device=hidden.device)[None, :] - start
        valid = (pos >= 0) & (pos < length[:, None])
        n_win = torch.div(length + size - 1, size, rounding_mode="floor")
        width = int(n_win.max())
        window = torch.where(valid, self._windows(length, size, pos.clamp(min=0)), width)  # spill bin
        sums = hidden.new_zeros((b, width + 1, d)).scatter_add(
            1, window[..., None].expand(-1, -1, d), hidden * valid[..., None].to(hidden.dtype))[:, :width]
        counts = torch.zeros((b, width + 1), dtype=torch.long, device=hidden.device).scatter_add(
            1, window, valid.long())[:, :width]
        return sums, counts, n_win

    def _divisor(self, counts: torch.Tensor, size: int) -> torch.Tensor:
        return counts.new_full(counts.shape, size) if self.pool_align == "end" else counts

    def extract(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per context: (means of the finest windows (W x d), real tokens per window (W,))."""
        length = enc.n_tokens + self.pool_end_marker
        size = torch.full_like(length, self.finest)
        sums, counts, n_win = self._pool(enc.hidden, enc.text_start, length, size)
        out = []
        for i in range(sums.shape[0]):
            w = int(n_win[i])
            c = counts[i, :w]
            out.append((sums[i, :w] / c.clamp(min=1)[:, None].to(sums.dtype), c))
        return out

    def derive(self, features: list[torch.Tensor], counts: list, factors: list[int]) -> list[torch.Tensor]:
        """Window rows at each context's factor, from its finest-window means and counts."""
        for f in factors:
            if f % self.finest:
                raise ValueError(f"factor {f} is not a multiple of the finest factor {self.finest}")
        if not features:
            return []
        device = features[0].device
        group_parts, div_parts, offset, sizes = [], [], 0, []
        for feat, cnt, f in zip(features, counts, factors):
            k = f // self.finest
            j = torch.arange(feat.shape[0], device=device)
            if self.pool_align == "end":  # shift the finest grid onto the coarser grid's padding
                length = int(cnt.sum())
                shift = ((-length) % f - (-length) % self.finest) // self.finest
                j = j + shift
            g = j // k  # the shift is under k, so the first window is group 0
            m = int(g[-1]) + 1 if feat.shape[0] else 0
            group_parts.append(g + offset)
            div_parts.append(f)
            sizes.append(m)
            offset += m
        group = torch.cat(group_parts)
        feats = torch.cat(features)
        cnt = torch.cat(list(counts)).to(feats.dtype)
        sums = feats.new_zeros((offset, feats.shape[1])).index_add_(0, group, feats * cnt[:, None])
        if self.pool_align == "end":
            tot = torch.cat([feats.new_full((m,), float(f)) for m, f in zip(sizes, div_parts)])
        else:
            tot = feats.new_zeros((offset,)).index_add_(0, group, cnt)
        return list(torch.split(sums / tot[:, None], sizes))

    def pool_dynamic(self, enc: EncoderOutput, sizes: list[int]) -> list[torch.Tensor]:
        """Means of windows of any size per row (sizes need not nest in the finest factor)."""
        length = enc.n_tokens + self.pool_end_marker
        size = torch.tensor(sizes, device=enc.hidden.device)
        if len(sizes) != enc.hidden.shape[0] or bool((size < 1).any()):
            raise ValueError(f"need one positive window size per row, got {sizes}")
        sums, counts, n_win = self._pool(enc.hidden, enc.text_start, length, size)
        out = []
        for i in range(sums.shape[0]):
            w = int(n_win[i])
            div = self._divisor(counts[i, :w], sizes[i]).clamp(min=1)
            out.append(sums[i, :w] / div[:, None].to(sums.dtype))
        return out

    @property
    def pools_windows(self) -> bool:
        return True

    def window_index(self, n_tokens: int, size: int) -> torch.Tensor:
        if int(size) < 1:
            raise ValueError(f"window size must be positive, got {size}")
        length = self.pooled_length(n_tokens)
        return self._windows(torch.tensor([length]), torch.tensor([int(size)]), torch.arange(length)[None])[0]

    def pool_ids(self, ids: Sequence[int], end_id: int, table: torch.Tensor, size: int) -> torch.Tensor:
        rows = table[torch.tensor(list(ids) + [end_id] * self.pool_end_marker, device=table.device)]
        length = torch.tensor([rows.shape[0]], device=rows.device)
        s = torch.tensor([size], device=rows.device)
        sums, counts, n_win = self._pool(rows[None], 0, length, s)
        w = int(n_win[0])
        return sums[0, :w] / self._divisor(counts[0, :w], size).clamp(min=1)[:, None].to(rows.dtype)


class LastTokens(PoolingStage):
    """The hidden states of the last M positions (the end marker included)."""

    kind = "last_tokens"
    takes = "length"

    def __init__(self, lengths: Sequence[int], *, length_rule: str = "nearest"):
        super().__init__(lengths, length_rule=length_rule)
        self.max_len = max(self.candidates)

    def n_latents(self, n_tokens: int, value: int) -> int:
        return min(int(value), int(n_tokens) + 1, self.max_len)

    def extract(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, None]]:
        out = []
        for i in range(enc.hidden.shape[0]):
            end = int(enc.n_tokens[i]) + enc.text_start + 1  # one past the end marker
            start = max(enc.text_start, end - self.max_len)
            out.append((enc.hidden[i, start:end], None))
        return out

    def derive(self, features: list[torch.Tensor], counts, lengths: list[int]) -> list[torch.Tensor]:
        return [feat[-min(m, feat.shape[0]) :] for feat, m in zip(features, lengths)]


class MemoryTokens(PoolingStage):
    """Learned memory embeddings appended after the end marker; latents are their states.

    The encoder must be causal so that the first M memory states do not depend on later ones
    (one encoder pass then serves every latent count).
    """

    kind = "compression_tokens"
    takes = "length"

    @classmethod
    def from_config(cls, config, d_encoder: int) -> MemoryTokens:
        return cls(config.lengths, d_encoder, length_rule=config.length_rule)

    def __init__(self, lengths: Sequence[int], d: int, init: torch.Tensor | None = None, *,
                 length_rule: str = "nearest"):
        super().__init__(lengths, length_rule=length_rule)
        self.max_len = max(self.candidates)
        emb = torch.randn(self.max_len, d) * 0.02 if init is None else init.clone()
        self.memory = nn.Parameter(emb)

    def n_latents(self, n_tokens: int, value: int) -> int:
        return min(int(value), self.max_len)

    def extra_inputs(self) -> torch.Tensor:
        return self.memory

    def extract(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, None]]:
        out = []
        for i in range(enc.hidden.shape[0]):
            s = int(enc.extra_start[i])
            out.append((enc.hidden[i, s : s + self.max_len], None))
        return out

    def derive(self, features: list[torch.Tensor], counts, lengths: list[int]) -> list[torch.Tensor]:
        return [feat[: min(m, self.max_len)] for feat, m in zip(features, lengths)]


_KINDS: dict[str, type[PoolingStage]] = {c.kind: c for c in (MeanPooling, LastTokens, MemoryTokens)}


def build_pooling(config, d_encoder: int) -> PoolingStage:
    """The pooling stage a ``CompressorConfig`` describes (the one place a kind name maps to a class)."""
    return _KINDS[config.backbone].from_config(config, d_encoder)
