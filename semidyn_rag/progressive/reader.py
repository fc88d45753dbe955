"""Coarse-to-fine reading: scan many chunks coarsely, re-read the relevant ones finely, answer.

The latent store keeps each chunk's finest-window features, from which every size is derived
exactly, so both passes start from the same ``ContextFeatures`` and neither calls the encoder:
the coarse scan (when the signal needs one) reads every chunk at the coarse size, the planner
(``plan.plan_reads``) spends ``max_latents`` decoder positions on them, and the answering read
takes each chunk at its planned size, as plain text, or not at all. Same question, features
and scores give the same plan: every step is deterministic, ties go to the retrieval order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..types import CompressedContext, ContextFeatures
from .plan import ReadPlan, Sizes, flat_reads, plan_reads
from .signals import RelevanceSignal, make_signal

DEFAULT_SIGNAL = "retriever"  # the best of the measured signals (README: progressive reading)


class ProgressiveReader:
    """Reads retrieved chunks coarse-to-fine within a latent budget with one compressor.

    ``signal``: ``retriever`` (default), ``attention`` or ``likelihood`` (see ``signals``).
    ``coarse``/``fine``: the scan's size and the finest latent size a chunk may be re-read at
    (defaults: the compressor's coarsest and finest candidates); ``allow_text``: a chunk may be
    re-read as plain text when its text fits; ``max_expand``: at most this many chunks are
    re-read finer; ``expand_share``: the share of the budget they may take before the other
    chunks are placed at the coarse size. Raises ValueError for sizes the pooling cannot take.
    """

    def __init__(self, compressor, *, signal: str | RelevanceSignal = DEFAULT_SIGNAL, max_expand: int = 2,
                 expand_share: float = 0.5, coarse: int | None = None, fine: int | None = None,
                 allow_text: bool = True):
        self.comp = compressor
        self.signal = make_signal(signal)
        if max_expand < 0:
            raise ValueError(f"max_expand must be >= 0, got {max_expand}")
        if not 0.0 <= expand_share <= 1.0:
            raise ValueError(f"expand_share must be within [0, 1], got {expand_share}")
        self.max_expand, self.expand_share, self.allow_text = int(max_expand), float(expand_share), bool(allow_text)
        pooling = compressor.pooling
        extra = [pooling.check_size(v) for v in (coarse, fine) if v is not None]
        # finest first: the size giving the most latents for a long context leads
        ordered = sorted(set(pooling.candidates) | set(extra), key=lambda v: (-pooling.n_latents(1 << 16, v), v))
        lo = ordered.index(fine) if fine is not None else 0
        hi = ordered.index(coarse) if coarse is not None else len(ordered) - 1
        if lo > hi:
            raise ValueError(f"the fine size {fine} must read more latents than the coarse size {coarse}")
        self.sizes = Sizes(tuple(ordered[lo : hi + 1]), pooling.n_latents, pooling.factor_of, self.allow_text)

    @property
    def coarse(self) -> int:
        return self.sizes.coarse

    def _text_tokens(self, texts: Sequence[str] | None, n: int) -> tuple[list[int], Sizes]:
        if texts is None:  # without the texts, no chunk can be pasted as text
            return [0] * n, Sizes(self.sizes.sizes, self.sizes.latents, self.sizes.factor, False)
        if len(texts) != n:
            raise ValueError(f"{len(texts)} texts for {n} chunks")
        ids = self.comp.decoder.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if n else []
        return [len(r) for r in ids], self.sizes

    def plan(self, question: str, features: Sequence[ContextFeatures], *, max_latents: int,
             texts: Sequence[str] | None = None, scores: Sequence[float] | None = None) -> ReadPlan:
        """Scan (if the signal needs it), rank and plan every chunk's read under ``max_latents``.

        ``texts`` (the chunks' texts) allow plain-text re-reads; ``scores`` are the retriever's.
        Raises ValueError for an empty question or mismatched lists.
        """
        if not question.strip():
            raise ValueError("the question is empty")
        n = len(features)
        text_tokens, sizes = self._text_tokens(texts, n)
        t0 = time.perf_counter()
        contexts = None
        if self.signal.needs_scan and n:
            contexts = self.comp.compress_features(list(features), **{self.comp.pooling.takes: self.coarse})
        relevance, positions = self.signal.relevance(self.comp, question, contexts, scores, n) if n else ([], 0)
        scan_s = time.perf_counter() - t0
        scan_factor = self.comp.pooling.factor_of(self.coarse) if contexts is not None else None
        reads = plan_reads([f.n_tokens for f in features], text_tokens, relevance, sizes, max_latents=max_latents,
                           max_expand=self.max_expand, expand_share=self.expand_share, signal=self.signal.name,
                           scan_factor=scan_factor)
        return ReadPlan(self.signal.name, max_latents, reads, positions, scan_s)

    def flat_plan(self, features: Sequence[ContextFeatures], *, max_latents: int) -> ReadPlan:
        """The flat baseline at the same budget: every chunk at the finest size that fits (no scan)."""
        n = len(features)
        reads = flat_reads([f.n_tokens for f in features], [0] * n, self.sizes, max_latents=max_latents)
        return ReadPlan("flat", max_latents, reads)

    def latents(self, plan: ReadPlan, features: Sequence[ContextFeatures]) -> list[CompressedContext | None]:
        """Each chunk's latents at its planned size (None for text and dropped chunks), derived
        from ``features`` in one ``compress_features`` call per size (no encoder)."""
        out: list[CompressedContext | None] = [None] * len(plan.chunks)
        by_size: dict[int, list[int]] = {}
        for c in plan.chunks:
            if c.read == "latents":
                by_size.setdefault(c.size, []).append(c.index)
        takes = self.comp.pooling.takes
        for size, idx in sorted(by_size.items()):
            for i, ctx in zip(idx, self.comp.compress_features([features[i] for i in idx], **{takes: size})):
                out[i] = ctx
        return out

    def inputs(self, question: str, plan: ReadPlan, features: Sequence[ContextFeatures],
               texts: Sequence[str] | None = None) -> tuple[list[int], list[CompressedContext]]:
        """The answering read: decoder token ids of the prompt (one placeholder per latent chunk,
        text chunks pasted in) and the latent contexts in order. Chunks keep the retrieval order."""
        latents = self.latents(plan, features)
        dec = self.comp.decoder
        read = plan.read_chunks
        parts = dec.render(question, len(read)).split(dec.placeholder)
        pieces, contexts = [parts[0]], []
        for c, rest in zip(read, parts[1:]):
            if c.read == "text":
                if texts is None:
                    raise ValueError("the plan reads a chunk as text but no texts were given")
                if dec.placeholder in texts[c.index]:
                    raise ValueError(f"chunk {c.index} contains the decoder's placeholder token {dec.placeholder!r}")
                pieces.append(texts[c.index])
            else:
                pieces.append(dec.placeholder)
                contexts.append(latents[c.index])
            pieces.append(rest)
        return dec.encode_prompts(["".join(pieces)])[0], contexts

    def answer(self, question: str, features: Sequence[ContextFeatures], *, max_latents: int,
               texts: Sequence[str] | None = None, scores: Sequence[float] | None = None,
               max_new_tokens: int = 64, backend=None, **generate_kwargs) -> tuple[str, ReadPlan]:
        """Plan, read and answer; returns the answer text and the plan.

        The plan (scan, signal, expansions) always runs on the compressor; ``backend`` (a
        ``semidyn_rag.serving`` decoder backend, e.g. vLLM) decodes the answer when given.
        """
        plan = self.plan(question, features, max_latents=max_latents, texts=texts, scores=scores)
        ids, contexts = self.inputs(question, plan, features, texts)
        if backend is None:
            (text,) = self.comp.generate_ids([ids], [contexts], max_new_tokens=max_new_tokens, **generate_kwargs)
        else:
            (text,) = backend.generate([ids], self.comp.context_latents([ids], [contexts]),
                                       max_new_tokens=max_new_tokens, **generate_kwargs)
        return text, plan
