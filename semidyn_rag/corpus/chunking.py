"""Sentence-aware chunking with a budget counted in encoder tokens, and optional overlap.

Documents are split at paragraph breaks, Markdown block starts and sentence ends; the pieces
are normalised (the store's normal form) and packed greedily into chunks of at most
``chunk_tokens`` encoder tokens, each chunk's count checked on its joined text. A sentence
longer than the budget is cut at word boundaries (a word longer than the budget at token
boundaries). With ``overlap`` > 0 a chunk starts with the trailing sentences of the previous
one, up to that many tokens. The budget is in the compressor's encoder tokens because that is
what the encoder reads and what the compression factor divides.

Cutting an over-long word is linear in its length: the word is tokenized once and cut at the
character offsets of every ``chunk_tokens``-th token (``TokenizerCounter.offsets``); only a
piece that re-tokenizes over the budget, or a counter without offsets, falls back to a search
over prefixes that grows from the budget, so each probe is about one piece long.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..store.keys import chunk_key, normalize_text
from .documents import Document

TokenCounter = Callable[[Sequence[str]], list[int]]

_PARAGRAPH = re.compile(r"\n[ \t]*\n+|\n(?=[ \t]*(?:#{1,6}\s|[-*+>]\s|\d+[.)]\s|\|))")
_SENTENCE = re.compile(r"(?<=[.!?\u2026\u3002])[\"'\u201d\u2019)\]]*\s+")


@dataclass(frozen=True)
class Chunk:
    """A piece of one document that the encoder reads as one context."""

    text: str  # normalised
    n_tokens: int  # encoder tokens of ``text`` (no special tokens)
    doc_id: str
    position: int  # index of the chunk within its document
    key: str  # store key: sha256 of the normalised text


class TokenizerCounter:
    """Counts tokens (no special tokens) with a Hugging Face tokenizer, and gives their offsets."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def offsets(self, text: str) -> list[tuple[int, int]] | None:
        """``(start, end)`` character span of each token of ``text``; None for a slow tokenizer."""
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(span) for span in enc["offset_mapping"]]


def tokenizer_counter(tokenizer) -> TokenCounter:
    """A counter of tokens (no special tokens) for a Hugging Face tokenizer (with ``offsets``)."""
    return TokenizerCounter(tokenizer)


def split_sentences(text: str) -> list[str]:
    """Sentences and blocks of ``text``, normalised, empty ones dropped."""
    out = []
    for block in _PARAGRAPH.split(text):
        for sent in _SENTENCE.split(block):
            s = normalize_text(sent)
            if s:
                out.append(s)
    return out


class Chunker:
    """Packs documents into chunks of at most ``chunk_tokens`` encoder tokens."""

    def __init__(self, count: TokenCounter, chunk_tokens: int = 256, overlap: int = 0):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        if not 0 <= overlap < chunk_tokens:
            raise ValueError(f"overlap must be in [0, chunk_tokens), got {overlap} with chunk_tokens={chunk_tokens}")
        self.count = count
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap

    def chunk(self, documents: Iterable[Document]) -> Iterator[Chunk]:
        """Chunks of every document, in order."""
        for doc in documents:
            for i, (text, n) in enumerate(self.split(doc.text)):
                yield Chunk(text, n, doc.doc_id, i, chunk_key(text))

    def split(self, text: str) -> list[tuple[str, int]]:
        """``(chunk text, tokens)`` pairs covering ``text``."""
        pieces: list[str] = []
        counts: list[int] = []
        sents = split_sentences(text)
        for s, n in zip(sents, self.count(sents)):
            if n <= self.chunk_tokens:
                pieces.append(s)
                counts.append(n)
            else:
                for p, m in self._cut_long(s):
                    pieces.append(p)
                    counts.append(m)
        return self._pack(pieces, counts, self.overlap)

    def _pack(self, pieces: list[str], counts: list[int], overlap: int) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        budget, i, n = self.chunk_tokens, 0, len(pieces)
        while i < n:
            j, total = i, counts[i]
            while j + 1 < n and total + counts[j + 1] <= budget:
                j += 1
                total += counts[j]
            text, exact = self._exact(pieces, i, j)
            while exact > budget and j > i:  # joined text can tokenize longer than the parts
                j -= 1
                text, exact = self._exact(pieces, i, j)
            out.append((text, exact))
            if j + 1 >= n:
                break
            i = self._next_start(counts, i, j, overlap)
        return out

    def _exact(self, pieces: list[str], i: int, j: int) -> tuple[str, int]:
        text = " ".join(pieces[i : j + 1])
        return text, self.count([text])[0]

    def _next_start(self, counts: list[int], i: int, j: int, overlap: int) -> int:
        """First piece of the next chunk: the trailing pieces of [i, j] that fit the overlap
        and still leave room for the next new piece (so every chunk adds new text)."""
        if not overlap:
            return j + 1
        k, tail = j + 1, 0
        while k - 1 > i and tail + counts[k - 1] <= overlap \
                and tail + counts[k - 1] + counts[j + 1] <= self.chunk_tokens:
            k -= 1
            tail += counts[k]
        return k

    def _cut_long(self, sentence: str) -> list[tuple[str, int]]:
        """A sentence over the budget, as pieces within it: whole words where possible."""
        words = sentence.split(" ")
        if len(words) == 1:  # one long word (a URL, a base64 blob): no need to count it again
            return self._pack(*map(list, zip(*self._cut_tokens(sentence))), 0)
        pieces, pc = [], []
        for w, c in zip(words, self.count(words)):
            for p, n in [(w, c)] if c <= self.chunk_tokens else self._cut_tokens(w):
                pieces.append(p)
                pc.append(n)
        return self._pack(pieces, pc, 0)  # overlap applies between sentences, not inside one

    def _cut_tokens(self, word: str) -> list[tuple[str, int]]:
        """A single over-long word as ``(piece, tokens)`` runs of at most the budget in tokens.

        Linear in the word: one tokenization, cuts at token offsets, one count of the pieces.
        """
        offsets = getattr(self.count, "offsets", None)
        spans = offsets(word) if offsets is not None else None
        pieces = cut_at_offsets(word, spans, self.chunk_tokens) if spans else [word]
        out: list[tuple[str, int]] = []
        for p, n in zip(pieces, self.count(pieces)):
            out.extend([(p, n)] if n <= self.chunk_tokens else self._search_cut(p))
        return out

    def _search_cut(self, word: str) -> list[tuple[str, int]]:
        """Fallback: the longest prefixes within the budget, found by a search whose probes grow
        from ``chunk_tokens`` characters, so each costs about one piece (not the whole word)."""
        out, start, budget = [], 0, self.chunk_tokens
        fits = lambda end: self.count([word[start:end]])[0] <= budget  # noqa: E731
        while start < len(word):
            lo, step = start + 1, max(1, budget)  # a prefix of one character always fits
            hi = min(len(word), start + step)
            while hi > lo and fits(hi):  # gallop: double until a prefix is over the budget
                lo = hi
                if hi == len(word):
                    break
                step *= 2
                hi = min(len(word), start + step)
            while lo < hi:  # binary search between the last fit and the first miss
                mid = (lo + hi + 1) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid - 1
            piece = word[start:lo]
            out.append((piece, self.count([piece])[0]))
            start = lo
        return out


def cut_at_offsets(text: str, spans: Sequence[tuple[int, int]], budget: int) -> list[str]:
    """``text`` cut before every ``budget``-th token, at clean character boundaries.

    A boundary is clean when no earlier token reaches past it (byte-level tokenizers split one
    character over several tokens, which then share its span); the cut backs off to the last
    clean boundary within the budget. Pieces may re-tokenize differently: callers count them.
    """
    cuts, i, n = [0], 0, len(spans)
    while n - i > budget:
        j = i + budget
        while j > i and not (spans[j][0] >= spans[j - 1][1] and spans[j][0] > cuts[-1]):
            j -= 1
        if j == i:  # no clean boundary within reach: leave the rest to the caller's search
            break
        cuts.append(spans[j][0])
        i = j
    return [text[a:b] for a, b in zip(cuts, [*cuts[1:], len(text)])]
