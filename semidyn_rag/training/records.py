"""Training records: the JSONL schema every training file follows, and its line-numbered loader.

One record is one supervised sample: one or more contexts (several for multi-document QA),
the task, the question or instruction, the target answer, and optionally what the density
label is computed from: the teacher's ultra-concise summary of each context (Section 3.4), or
an offline proxy's pseudo summary fraction. A record without either still trains the LM loss
and is left out of the MSE term; it is never labelled 0.

Example line::

    {"context": "The Eiffel Tower ...", "task": "qa", "question": "Where is it?",
     "answer": "Paris", "concise_summary": "Eiffel Tower: Paris.", "source": "wiki/42"}
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..atomic import atomic_path
from ..jsonl import iter_json_lines

Task = Literal["qa", "summary", "multi_doc_qa"]
DEFAULT_SUMMARY_INSTRUCTION = "Summarize the context."


class RecordError(ValueError):
    """A training record is malformed; the message names the file and line."""


class TrainingRecord(BaseModel):
    """One training sample (a line of a JSONL training file)."""

    model_config = ConfigDict(extra="forbid")

    context: str | list[str] = Field(description="The context, or a list of them (multi-document QA).")
    task: Task = "qa"
    question: str | None = Field(None, description="The question or instruction the answer responds to.")
    answer: str
    concise_summary: str | list[str | None] | None = Field(
        None, description="Teacher's ultra-concise summary of each context (the density label source).")
    pseudo_summary_fraction: float | list[float | None] | None = Field(
        None, description="Offline proxy: estimated L_summary / L_context per context, in (0, 1].")
    source: str | None = None
    id: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("context")
    @classmethod
    def _contexts_not_empty(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("context list is empty")
        for i, c in enumerate(items):
            if not c.strip():
                raise ValueError("context is empty" if isinstance(v, str) else f"context {i} is empty")
        return v

    @field_validator("answer")
    @classmethod
    def _answer_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("answer is empty")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainingRecord:
        n = len(self.contexts)
        if self.task in ("qa", "multi_doc_qa") and not (self.question and self.question.strip()):
            raise ValueError(f"task {self.task!r} needs a question")
        if self.task == "multi_doc_qa" and isinstance(self.context, str):
            raise ValueError("task 'multi_doc_qa' needs a list of contexts")
        for name in ("concise_summary", "pseudo_summary_fraction"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but the record has {n} context(s)")
            if value is not None and not isinstance(value, list) and n != 1:
                raise ValueError(f"{name} must be a list with one entry per context ({n})")
        for s in self.summaries:
            if s is not None and not s.strip():
                raise ValueError("concise_summary is empty (leave it out instead)")
        for f in self.summary_fractions:
            if f is not None and not 0.0 < f <= 1.0:
                raise ValueError(f"pseudo_summary_fraction must be in (0, 1], got {f}")
        return self

    @property
    def contexts(self) -> list[str]:
        """The record's contexts as a list (one entry for single-context tasks)."""
        return [self.context] if isinstance(self.context, str) else list(self.context)

    @property
    def summaries(self) -> list[str | None]:
        """The ultra-concise summary of each context (None where there is none)."""
        return _per_context(self.concise_summary, len(self.contexts))

    @property
    def summary_fractions(self) -> list[float | None]:
        """The proxy's pseudo summary fraction of each context (None where there is none)."""
        return _per_context(self.pseudo_summary_fraction, len(self.contexts))

    @property
    def prompt(self) -> str:
        """What the decoder is asked: the question, or the default summary instruction."""
        return self.question if self.question and self.question.strip() else DEFAULT_SUMMARY_INSTRUCTION


def _per_context(value, n: int) -> list:
    if value is None:
        return [None] * n
    return list(value) if isinstance(value, list) else [value]


def parse_record(obj: Any, where: str = "record") -> TrainingRecord:
    """Validate one decoded JSON value; raises RecordError naming ``where`` and the bad fields."""
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    try:
        return TrainingRecord.model_validate(obj)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise RecordError(f"{where}: {problems}") from None


def iter_records(path: str | Path) -> Iterator[tuple[int, TrainingRecord]]:
    """Yield ``(line_number, record)`` from a JSONL file, skipping blank lines.

    Raises RecordError on the first invalid line, naming the file, the line and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training file at {path}")

    def bad(lineno: int, problem: str):
        raise RecordError(f"{path}:{lineno}: {problem}")

    with path.open(encoding="utf-8") as fh:
        for lineno, obj in iter_json_lines(fh, bad):
            yield lineno, parse_record(obj, f"{path}:{lineno}")


def load_records(paths: str | Path | Iterable[str | Path]) -> list[TrainingRecord]:
    """All records of one or more JSONL files, in order; raises RecordError on a bad line."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return [rec for p in paths for _, rec in iter_records(p)]


def write_records(path: str | Path, records: Iterable[TrainingRecord]) -> int:
    """Write records as JSONL (fields left at their defaults are omitted); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(rec.model_dump_json(exclude_defaults=True) + "\n")
            n += 1
    return n
