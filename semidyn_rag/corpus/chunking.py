"""Sentence-aware chunking with a budget counted in encoder tokens, and optional overlap.

Documents are split at paragraph breaks, Markdown block starts and sentence ends; the pieces
are normalised (the store's normal form) and packed greedily into chunks of at most
``chunk_tokens`` encoder tokens, each chunk's count checked on its joined text. A sentence
longer than the budget is cut at word boundaries (a word longer than the budget at token
boundaries). With ``overlap`` > 0 a chunk starts with the trailing sentences of the previous
one, up to that many tokens. The budget is in the compressor's encoder tokens because that is
what the encoder reads and what the compression factor divides.
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


def tokenizer_counter(tokenizer) -> TokenCounter:
    """A counter of tokens (no special tokens) for a Hugging Face tokenizer."""

    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return count


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
        counts = self.count(words)
        pieces, pc = [], []
        for w, c in zip(words, counts):
            if c <= self.chunk_tokens:
                pieces.append(w)
                pc.append(c)
            else:
                for p in self._cut_tokens(w):
                    pieces.append(p)
                    pc.append(self.count([p])[0])
        return self._pack(pieces, pc, 0)  # overlap applies between sentences, not inside one

    def _cut_tokens(self, word: str) -> list[str]:
        """A single over-long word cut into character runs of at most the budget in tokens."""
        out, start = [], 0
        while start < len(word):
            lo, hi = start + 1, len(word)
            while lo < hi:  # longest prefix within the budget (binary search on characters)
                mid = (lo + hi + 1) // 2
                if self.count([word[start:mid]])[0] <= self.chunk_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            out.append(word[start:lo])
            start = lo
        return out
