"""QA datasets for evaluation: local JSONL or parquet files, or a few Hugging Face datasets by name.

Every row becomes a ``QASample``: a question, one or more reference answers, and the context
it was asked about (absent for open-domain sets, which need a corpus to retrieve from). A row
that does not fit is reported by file and row, never skipped in silence: a silently shortened
evaluation set makes numbers incomparable.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..jsonl import iter_json_lines


class DatasetError(ValueError):
    """A dataset cannot be loaded, or one of its rows is malformed (the message names the row)."""


@dataclass(frozen=True)
class QASample:
    """One question with its reference answers and (for reading comprehension) its context."""

    id: str
    question: str
    answers: tuple[str, ...]
    context: str | None = None


# name -> (datasets.load_dataset args, row converter to the plain columns parse_row reads)
def _squad_row(r: dict) -> dict:
    return {"id": r.get("id"), "question": r["question"], "answers": r["answers"], "context": r["context"]}


def _hotpot_row(r: dict) -> dict:
    ctx = r["context"]
    paragraphs = [f"{t}: {''.join(s)}" for t, s in zip(ctx["title"], ctx["sentences"])]
    return {"id": r.get("id"), "question": r["question"], "answer": r["answer"], "context": "\n\n".join(paragraphs)}


def _nq_open_row(r: dict) -> dict:
    return {"question": r["question"], "answers": r["answer"]}


HF_DATASETS: dict[str, tuple[tuple[str, ...], Callable[[dict], dict]]] = {
    "squad": (("squad",), _squad_row),
    "adversarial_qa": (("adversarial_qa", "adversarialQA"), _squad_row),
    "hotpot_qa": (("hotpot_qa", "distractor"), _hotpot_row),
    "nq": (("nq_open",), _nq_open_row),  # open domain: question + answers, no context
}


def load_qa_dataset(
    source: str | Path, *, split: str = "validation", limit: int | None = None, seed: int = 0
) -> list[QASample]:
    """Load ``source`` (a .jsonl/.json/.parquet file, or a name in ``HF_DATASETS``).

    ``limit`` keeps a seeded random subset of that many questions, in file order (the same
    subset for the same seed). Raises DatasetError naming the file and row of a malformed row,
    for duplicate ids, an unknown source, or a Hugging Face dataset that cannot be reached.
    """
    path = Path(source)
    if path.is_file():
        samples = _load_file(path)
    elif str(source) in HF_DATASETS:
        samples = _load_hf(str(source), split)
    elif path.exists():
        raise DatasetError(f"{path} is not a file; pass a .jsonl, .json or .parquet file")
    else:
        raise DatasetError(f"{source!r} is neither an existing file nor one of the dataset names "
                           f"{', '.join(HF_DATASETS)}")
    if not samples:
        raise DatasetError(f"{source} holds no questions")
    return sample_subset(samples, limit, seed)


def sample_subset(samples: list[QASample], limit: int | None, seed: int = 0) -> list[QASample]:
    """A seeded random subset of ``limit`` samples in their original order (all when None)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit < 1:
        raise DatasetError(f"limit must be positive, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]


def parse_row(row: object, where: str, default_id: str) -> QASample:
    """Validate one row (question; answer or answers; optional context, id) into a QASample."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with question/answer(s)/context, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    answers = _answers(row, where)
    context = _context(row.get("context"), where)
    rid = row.get("id")
    if rid is None or rid == "":
        rid = default_id
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DatasetError(f"{where}: 'id' must be a string or integer, got {rid!r}")
    return QASample(str(rid), question.strip(), answers, context)


def _answers(row: dict, where: str) -> tuple[str, ...]:
    if "answers" in row and row["answers"] is not None:
        key, value = "answers", row["answers"]
    elif "answer" in row and row["answer"] is not None:
        key, value = "answer", row["answer"]
    else:
        raise DatasetError(f"{where}: no 'answer' or 'answers' field (columns: {sorted(row)})")
    if isinstance(value, dict):  # SQuAD layout: {"text": [...], "answer_start": [...]}
        value = value.get("text")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise DatasetError(f"{where}: '{key}' must be a string or a non-empty list of strings, got {value!r}")
    bad = [a for a in value if not isinstance(a, str) or not a.strip()]
    if bad:
        raise DatasetError(f"{where}: '{key}' holds non-string or empty answers: {bad!r}")
    return tuple(a.strip() for a in value)


def _context(value: object, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        value = "\n\n".join(value)  # several passages read as one context
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: 'context' must be a non-empty string (or absent), got {value!r:.80}")
    return value


def _load_file(path: Path) -> list[QASample]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise DatasetError(f"{path}: unknown format {suffix!r}; use .jsonl, .json or .parquet")
    return _collect(rows)


def _collect(rows: Iterable[tuple[str, str, object]]) -> list[QASample]:
    out, seen = [], {}
    for where, default_id, row in rows:
        s = parse_row(row, where, default_id)
        if s.id in seen:
            raise DatasetError(f"{where}: id {s.id!r} already used at {seen[s.id]}")
        seen[s.id] = where
        out.append(s)
    return out


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, object]]:
    def bad(lineno: int, problem: str):
        raise DatasetError(f"{path} line {lineno}: {problem}")

    with path.open(encoding="utf-8") as f:
        for n, (lineno, row) in enumerate(iter_json_lines(f, bad)):
            yield f"{path} line {lineno}", str(n), row


def _json_rows(path: Path) -> Iterator[tuple[str, str, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
    for i, row in enumerate(data):
        yield f"{path} row {i}", str(i), row


def _parquet_rows(path: Path) -> Iterator[tuple[str, str, object]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DatasetError(f"{path}: cannot read parquet ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path} row {i}", str(i), row
            i += 1


def _load_hf(name: str, split: str) -> list[QASample]:
    if importlib.util.find_spec("datasets") is None:
        raise DatasetError(f"loading {name!r} by name needs the `datasets` package (pip install datasets); "
                           "or pass a local .jsonl/.parquet file")
    import datasets

    args, convert = HF_DATASETS[name]
    try:
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:  # offline, unreachable hub, unknown split: all end the same way
        raise DatasetError(f"could not load Hugging Face dataset {'/'.join(args)} split {split!r} "
                           f"(is the hub reachable? HF_HUB_OFFLINE set?): {e}") from e
    return _collect((f"{name}[{split}] row {i}", str(i), convert(r)) for i, r in enumerate(ds))
