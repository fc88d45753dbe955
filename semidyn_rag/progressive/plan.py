"""How a latent budget is spent once the chunks are ranked: which to expand, keep coarse or drop.

Pure integer bookkeeping, no model: given each chunk's cost at every size (latents at each
candidate factor, or its decoder tokens as plain text) and a relevance order, ``plan_reads``
gives every chunk one read and the reason for it, and never spends more than ``max_latents``
decoder positions. The order of work says what matters most:

1. **depth**: the ``max_expand`` most relevant chunks get the finest read (text first, when
   allowed, then the finest factor up) that fits their share of the budget (``expand_share``);
2. **breadth**: every other chunk, most relevant first, is kept at the coarse size while it
   fits; the rest are dropped;
3. **leftover**: positions still free refine the top chunks further.

``flat_reads`` is the baseline at the same budget: every chunk at one size, the finest that
fits, dropping the least relevant ones when even the coarsest does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

TEXT = "text"  # the read level of a chunk pasted as plain text


@dataclass
class ChunkRead:
    """How one retrieved chunk was read in the answering pass, and why."""

    index: int  # position in the retrieved list (0 = the retriever's best)
    n_tokens: int  # encoder tokens of the chunk
    text_tokens: int  # decoder tokens of the chunk as plain text
    read: str  # "latents", "text" or "dropped"
    size: int | None  # pooling size of the answering read (factor or latent count); None for text/dropped
    factor: int | None  # compression factor of the answering read (1 for text, None when dropped or a count)
    positions: int  # decoder positions it occupies in the answering read (0 when dropped)
    scan_factor: int | None  # factor the coarse scan read it at (None: no scan, or the pooling takes counts)
    relevance: float | None  # the signal's score (higher = more relevant); None when not scored
    relevance_rank: int  # 1 = most relevant
    expanded: bool  # read finer than the coarse size
    reason: str

    def to_metadata(self) -> dict:
        """Plain JSON-able values for node metadata, prefixed ``semidyn_`` (never a tensor)."""
        return {f"semidyn_{k}": v for k, v in asdict(self).items() if v is not None and k != "index"}


@dataclass
class ReadPlan:
    """Every chunk's read under one budget, with what the scan that ranked them cost."""

    signal: str
    max_latents: int
    chunks: list[ChunkRead]
    scan_positions: int = 0  # decoder positions the coarse scan prefilled (0 when the signal needs none)
    scan_s: float = 0.0  # wall time of the scan (features to relevance)
    notes: dict = field(default_factory=dict)

    @property
    def used(self) -> int:
        """Decoder positions the answering read gives to chunks (latents plus text tokens)."""
        return sum(c.positions for c in self.chunks)

    @property
    def read_chunks(self) -> list[ChunkRead]:
        """Chunks the answering read contains, in retrieval order."""
        return [c for c in self.chunks if c.read != "dropped"]

    def to_dict(self) -> dict:
        return {"signal": self.signal, "max_latents": self.max_latents, "used": self.used,
                "scan_positions": self.scan_positions, "scan_s": round(self.scan_s, 6),
                "chunks": [asdict(c) for c in self.chunks], **self.notes}


@dataclass(frozen=True)
class Sizes:
    """The read levels a planner may choose from, finest first, and what each costs.

    ``sizes`` are pooling sizes from the finest allowed to the coarse one (the last);
    ``latents(n_tokens, size)`` counts latents; ``factor(size)`` names a size's factor.
    """

    sizes: tuple[int, ...]
    latents: object  # callable (n_tokens, size) -> int
    factor: object  # callable (size) -> int | None
    allow_text: bool = True

    @property
    def coarse(self) -> int:
        return self.sizes[-1]

    def finer_levels(self) -> list:
        """Levels finer than the coarse size, finest first (``TEXT`` leads when allowed)."""
        return ([TEXT] if self.allow_text else []) + list(self.sizes[:-1])

    def cost(self, n_tokens: int, text_tokens: int, level) -> int:
        return text_tokens if level == TEXT else int(self.latents(n_tokens, level))


def relevance_order(relevance: Sequence[float]) -> list[int]:
    """Chunk indices from most to least relevant; ties go to the better retrieval rank."""
    return sorted(range(len(relevance)), key=lambda i: (-relevance[i], i))


def plan_reads(n_tokens: Sequence[int], text_tokens: Sequence[int], relevance: Sequence[float], sizes: Sizes, *,
               max_latents: int, max_expand: int = 2, expand_share: float = 0.5, signal: str = "",
               scan_factor: int | None = None) -> list[ChunkRead]:
    """Each chunk's read under ``max_latents`` positions (see the module docstring).

    Raises ValueError for a negative budget, an ``expand_share`` outside [0, 1] or lists of
    different lengths.
    """
    k = len(n_tokens)
    if len(text_tokens) != k or len(relevance) != k:
        raise ValueError(f"need one token count, text count and relevance per chunk ({k}, {len(text_tokens)}, "
                         f"{len(relevance)})")
    if max_latents < 0:
        raise ValueError(f"max_latents must be >= 0, got {max_latents}")
    if not 0.0 <= expand_share <= 1.0:
        raise ValueError(f"expand_share must be within [0, 1], got {expand_share}")
    order = relevance_order(relevance)
    rank = {i: r + 1 for r, i in enumerate(order)}
    finer = sizes.finer_levels()
    levels = finer + [sizes.coarse]  # finest first
    cost = [{lv: sizes.cost(n_tokens[i], text_tokens[i], lv) for lv in levels} for i in range(k)]
    level: list = [None] * k
    why: list[str] = [""] * k
    top = order[:max(0, max_expand)] if finer else []  # nothing is finer than the coarse size
    allowance = int(expand_share * max_latents)
    spent = 0
    for i in top:  # 1. depth, within the expansion allowance
        for lv in finer:
            if spent + cost[i][lv] <= allowance:
                level[i], spent = lv, spent + cost[i][lv]
                why[i] = f"expanded: relevance rank {rank[i]} of {k}{_by(signal)}"
                break
        else:
            why[i] = (f"kept coarse: relevance rank {rank[i]}, but no finer read fit the expansion share "
                      f"({allowance} of {max_latents} positions)")
    used = spent
    for i in order:  # 2. breadth, at the coarse size
        if level[i] is None:
            c = cost[i][sizes.coarse]
            if used + c <= max_latents:
                level[i], used = sizes.coarse, used + c
                why[i] = why[i] or f"kept coarse: relevance rank {rank[i]} of {k}, outside the top {len(top)}"
            else:
                why[i] = f"dropped: relevance rank {rank[i]} of {k}; the budget of {max_latents} positions was spent"
    for i in top:  # 3. leftover positions refine the top chunks
        cur = levels.index(level[i]) if level[i] is not None else len(levels)
        for lv in levels[:cur]:
            extra = cost[i][lv] - (cost[i][level[i]] if level[i] is not None else 0)
            if used + extra <= max_latents:
                level[i], used = lv, used + extra
                why[i] = (f"expanded with positions left after the coarse reads: relevance rank {rank[i]} of {k}"
                          if lv != sizes.coarse else f"kept coarse: relevance rank {rank[i]} of {k}, with positions "
                          "left after the other coarse reads")
                break
    return [_read(i, n_tokens[i], text_tokens[i], level[i], cost[i], sizes, relevance[i], rank[i], why[i],
                  scan_factor) for i in range(k)]


def flat_reads(n_tokens: Sequence[int], text_tokens: Sequence[int], sizes: Sizes, *,
               max_latents: int) -> list[ChunkRead]:
    """Every chunk at one size, the finest that fits ``max_latents``; when even the coarse size
    does not fit, the chunks at the end of the list (the retriever's worst) are dropped."""
    k = len(n_tokens)
    for lv in sizes.sizes:
        if sum(sizes.cost(n_tokens[i], text_tokens[i], lv) for i in range(k)) <= max_latents:
            return _unexpanded([_read(i, n_tokens[i], text_tokens[i], lv, {lv: sizes.cost(n_tokens[i], 0, lv)}, sizes,
                                      float(-i), i + 1, f"flat: every chunk at the finest size that fits {max_latents}",
                                      None) for i in range(k)])
    out, used, full = [], 0, False
    for i in range(k):
        c = sizes.cost(n_tokens[i], text_tokens[i], sizes.coarse)
        full = full or used + c > max_latents  # keep a prefix of the retrieval order
        lv = None if full else sizes.coarse
        used += 0 if full else c
        why = ("flat: the coarse size, the budget holds only the first chunks" if lv is not None
               else f"dropped: rank {i + 1}; {max_latents} positions hold fewer chunks at the coarse size")
        out.append(_read(i, n_tokens[i], text_tokens[i], lv, {sizes.coarse: c}, sizes, float(-i), i + 1, why, None))
    return _unexpanded(out)


def _unexpanded(reads: list[ChunkRead]) -> list[ChunkRead]:
    """Flat reads re-read nothing: one size for all, whatever it is."""
    for r in reads:
        r.expanded = False
    return reads


def _by(signal: str) -> str:
    return f" by {signal}" if signal else ""


def _read(i: int, n: int, t: int, level, cost: dict, sizes: Sizes, relevance: float, rank: int, why: str,
          scan_factor: int | None) -> ChunkRead:
    if level is None:
        return ChunkRead(i, n, t, "dropped", None, None, 0, scan_factor, relevance, rank, False, why)
    if level == TEXT:
        return ChunkRead(i, n, t, "text", None, 1, cost[TEXT], scan_factor, relevance, rank, True, why)
    return ChunkRead(i, n, t, "latents", level, sizes.factor(level), cost[level], scan_factor, relevance, rank,
                     level != sizes.coarse, why)
