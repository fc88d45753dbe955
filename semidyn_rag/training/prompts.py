"""What the synthesis asks the teacher, and which of its replies it keeps.

The two phase prompts and the checks on their replies are one contract: phase 1 asks for
JSON QA pairs and a summary (``parse_phase1`` also takes ``Q:``/``A:`` lines), phase 2 for an
ultra-concise summary. A reply is kept only if it passes ``Limits``: answers grounded in the
context (a normalized substring, or mostly context words), and questions, answers and
summaries within their length limits. Kept apart from the driver in ``synth`` so the
contract can be read, and tested, without the resumable state files around it.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PHASE1_PROMPT = """Read the text below. Write {n} question-answer pairs about it and a summary of it.
Each answer must be a short span copied exactly from the text. The summary has 2 to 4 sentences.
Reply with JSON only, in exactly this form:
{{"qa": [{{"question": "...", "answer": "..."}}], "summary": "..."}}

Text:
{context}"""

PHASE2_PROMPT = """Write an ultra-concise summary of the text below. Keep every distinct fact and omit \
all redundant words: no filler, no repetition, telegraphic style is fine. Reply with the summary only.

Text:
{context}"""


class Limits(BaseModel):
    """What teacher output must satisfy to be kept (word counts)."""

    model_config = ConfigDict(extra="forbid")

    max_question_words: int = Field(40, ge=1)
    max_answer_words: int = Field(30, ge=1)
    min_summary_words: int = Field(5, ge=1)
    max_summary_ratio: float = Field(0.6, gt=0, le=1, description="Summary words / context words, at most.")
    max_concise_ratio: float = Field(0.5, gt=0, le=1, description="Ultra-concise summary words / context words.")
    grounding: Literal["substring", "overlap"] = "substring"
    min_overlap: float = Field(0.8, gt=0, le=1, description="Share of answer words found in the context (overlap).")


def normalize(text: str) -> str:
    """Lower case, word characters only (the evaluation's normalization, spaces dropped)."""
    return re.sub(r"\W+", "", text.lower())


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def parse_phase1(reply: str) -> tuple[list[tuple[str, str]], str | None]:
    """QA pairs and summary from a phase-1 reply: JSON, or ``Q:``/``A:`` lines as a fallback."""
    obj = _first_json_object(reply)
    if isinstance(obj, dict):
        qa = []
        for item in obj.get("qa") or obj.get("questions") or []:
            if isinstance(item, dict):
                q, a = item.get("question"), item.get("answer")
                if isinstance(q, str) and isinstance(a, str):
                    qa.append((q.strip(), a.strip()))
        summary = obj.get("summary")
        return qa, summary.strip() if isinstance(summary, str) else None
    qa, q = [], None
    summary = None
    for line in reply.splitlines():
        m = re.match(r"\s*(?:\d+[.)]\s*)?(Q|Question|A|Answer|Summary)\s*\d*\s*[:.-]\s*(.+)", line, re.I)
        if not m:
            continue
        tag, text = m.group(1).lower(), m.group(2).strip()
        if tag in ("q", "question"):
            q = text
        elif tag in ("a", "answer") and q:
            qa.append((q, text))
            q = None
        elif tag == "summary":
            summary = text
    return qa, summary


def _first_json_object(text: str):
    """The first parseable JSON object in ``text`` (replies often wrap it in prose or fences)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def check_qa(question: str, answer: str, context: str, limits: Limits) -> str | None:
    """Why a QA pair is rejected (None = kept): empty, too long, or not grounded in the context."""
    if not question.strip() or not answer.strip():
        return "empty question or answer"
    if len(question.split()) > limits.max_question_words:
        return "question too long"
    if len(answer.split()) > limits.max_answer_words:
        return "answer too long"
    if not normalize(answer):
        return "answer has no words"
    if limits.grounding == "substring":
        if normalize(answer) not in normalize(context):
            return "answer not found in the context"
    else:
        ctx = set(_words(context))
        words = _words(answer)
        if sum(w in ctx for w in words) < limits.min_overlap * len(words):
            return "answer not grounded in the context"
    return None


def check_summary(summary: str | None, context: str, limits: Limits, *, concise: bool) -> str | None:
    """Why a summary is rejected (None = kept): missing, too short or long, or a copy of the text."""
    if not summary or not summary.strip():
        return "no summary"
    n, n_ctx = len(summary.split()), len(context.split())
    if normalize(summary) == normalize(context):
        return "summary copies the context"
    ratio = limits.max_concise_ratio if concise else limits.max_summary_ratio
    if n > ratio * n_ctx:
        return f"summary too long ({n} words for a {n_ctx}-word context)"
    if not concise and n < limits.min_summary_words:
        return "summary too short"
    return None


def clean_concise(reply: str) -> str:
    """The concise summary without a leading label or quotes."""
    text = reply.strip()
    text = re.sub(r"^(ultra[- ]concise\s+)?summary\s*:\s*", "", text, flags=re.I)
    return text.strip().strip('"').strip()
