"""Cloze questions from any text: blank out a name, date or number in one sentence and ask for it.

No teacher and no labels: every chunk of text yields QA-shaped training records that ask for
exactly the kind of detail (who, when, how many) that substring accuracy rewards and that a
compressor most easily loses. Generation is deterministic: the sentence and the span are drawn
from a generator seeded by ``(seed, text)``, so a chunk gives the same question whatever else
is in the file and in whatever order. Every answer is checked to occur in the chunk (under the
evaluation's normalisation) and not to occur in the blanked sentence itself, so the question
cannot be answered from the question.

Spans are found with regular expressions (English): dates (``5 March 1999``, ``March 1999``,
years), numbers (``7,088``, ``2.5``, ``45%``) and names (runs of capitalised words, not a lone
sentence-initial word). Exposed as ``semidyn-rag synth cloze``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .prompts import normalize
from .records import TrainingRecord

BLANK = "____"
QUESTION = 'In the context, which {kind} goes in the blank? "{sentence}"'

_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December")
_DATE = re.compile(rf"\b(?:\d{{1,2}} (?:{_MONTHS})(?:,? \d{{4}})?|(?:{_MONTHS}) \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}"
                   rf"|(?:{_MONTHS}) \d{{4}})\b")
_YEAR = re.compile(r"(?<![\w.,])(?:1[0-9]{3}|20[0-9]{2})(?!\w|[.,]\d)")
_NUMBER = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?%?|(?<![\w.,])\d+(?:\.\d+)?%?(?!\w|[.,]\d)")
_NAME = re.compile(r"\b[A-Z][\w'’-]*[a-z][\w'’-]*(?:\s+(?:(?:of|de|da|di|van|von|der|del|la|le|du|al|bin)\s+)?"
                   r"[A-Z][\w'’-]*[a-z][\w'’-]*)*")
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# Capitalised words that start sentences or are not names on their own.
_NOT_NAMES = {
    "the", "a", "an", "in", "on", "at", "it", "its", "he", "she", "they", "this", "that", "these", "those",
    "his", "her", "their", "there", "after", "before", "during", "however", "although", "while", "when",
    "since", "from", "for", "with", "by", "as", "of", "to", "and", "but", "or", "if", "some", "many", "most",
    "other", "one", "two", "both", "each", "all", "according", "today", "also", "we", "i", "you",
    *(m.lower() for m in _MONTHS.split("|")),
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
}
_ABBREVIATIONS = {"st.", "mr.", "mrs.", "ms.", "dr.", "jr.", "sr.", "mt.", "no.", "inc.", "co.", "vs.", "ft.", "gen."}


@dataclass(frozen=True)
class Span:
    """A blankable span of a sentence: character offsets and what kind of detail it is."""

    start: int
    end: int
    kind: str  # "name", "date", "year" or "number"


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (English punctuation; initials and common abbreviations kept inside)."""
    out: list[str] = []
    for piece in _SENT_END.split(" ".join(text.split())):
        if out and _joins_next(out[-1]):
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return [s for s in out if s]


def _joins_next(sentence: str) -> bool:
    last = sentence.rsplit(" ", 1)[-1]
    return last.lower() in _ABBREVIATIONS or bool(re.fullmatch(r"(?:[A-Z]\.)+", last))


def find_spans(sentence: str) -> list[Span]:
    """Blankable spans of one sentence, non-overlapping (dates, then years, numbers, names)."""
    spans: list[Span] = []

    def free(s: int, e: int) -> bool:
        return all(e <= x.start or s >= x.end for x in spans)

    for pattern, kind in ((_DATE, "date"), (_YEAR, "year"), (_NUMBER, "number")):
        for m in pattern.finditer(sentence):
            if free(m.start(), m.end()):
                spans.append(Span(m.start(), m.end(), kind))
    for m in _NAME.finditer(sentence):
        words = [(m.start() + w.start(), m.start() + w.end()) for w in re.finditer(r"\S+", m.group())]
        while words and sentence[words[0][0] : words[0][1]].lower() in _NOT_NAMES:
            words = words[1:]  # "The Pacific Ocean" -> "Pacific Ocean"
        if not words or (len(words) == 1 and words[0][0] == 0):
            continue  # nothing left, or a lone sentence-initial word (usually not a name)
        s, e = words[0][0], words[-1][1]
        if sentence[e - 2 : e] in ("'s", "’s"):  # "Einstein's" -> "Einstein"
            e -= 2
        if free(s, e):
            spans.append(Span(s, e, "name"))
    return sorted(spans, key=lambda x: x.start)


def cloze_questions(text: str, *, n: int = 1, seed: int = 0, min_sentence_words: int = 5,
                    max_sentence_words: int = 40) -> list[tuple[str, str, str]]:
    """Up to ``n`` cloze questions on distinct sentences of ``text``: (question, answer, kind).

    Deterministic in ``(seed, text)``. Sentences shorter or longer than the limits are skipped,
    as are spans whose answer also occurs in the blanked sentence or not in ``text``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    norm_text = normalize(text)
    options: list[tuple[int, list[tuple[str, str, str]]]] = []
    for i, sent in enumerate(split_sentences(text)):
        if not min_sentence_words <= len(sent.split()) <= max_sentence_words:
            continue
        found = []
        for sp in find_spans(sent):
            answer = sent[sp.start : sp.end]
            blanked = sent[: sp.start] + BLANK + sent[sp.end :]
            key = normalize(answer)
            if key and key in norm_text and key not in normalize(blanked):
                found.append((QUESTION.format(kind=sp.kind, sentence=blanked), answer, sp.kind))
        if found:
            options.append((i, found))
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:8], "big"))
    chosen = rng.sample(options, min(n, len(options)))
    return [rng.choice(found) for _, found in sorted(chosen)]


def cloze_records(texts: Iterable[tuple[str, str]], *, per_chunk: int = 1, seed: int = 0,
                  min_sentence_words: int = 5, max_sentence_words: int = 40) -> tuple[list[TrainingRecord], int]:
    """QA training records from ``(source, text)`` chunks; returns (records, chunks with no question)."""
    records, empty = [], 0
    for source, text in texts:
        qs = cloze_questions(text, n=per_chunk, seed=seed, min_sentence_words=min_sentence_words,
                             max_sentence_words=max_sentence_words)
        if not qs:
            empty += 1
        key = hashlib.sha1(text.encode()).hexdigest()[:12]
        for j, (question, answer, kind) in enumerate(qs):
            records.append(TrainingRecord(context=text, task="qa", question=question, answer=answer,
                                          source=f"cloze:{source}", id=f"cloze-{key}-{j}",
                                          meta={"cloze": {"kind": kind, "seed": seed}}))
    return records, empty
