"""Loading a corpus: a folder of .txt/.md files, JSONL (text + metadata) or parquet (a text column).

Inputs that hold no usable text are skipped, never guessed at: empty or whitespace-only
documents, binary files (NUL bytes or mostly control characters), files that are not valid
UTF-8, unsupported file types, JSONL lines that are not objects with a string text field.
Each skip is logged with its reason and counted, so precompress can report them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..jsonl import iter_json_lines

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_SNIFF = 8192  # bytes inspected for binary content


@dataclass(frozen=True)
class Document:
    """One source document: a stable id, its text and metadata (JSON-serialisable values)."""

    doc_id: str
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedInput:
    """An input that was not loaded, and why (``reason`` is a short category)."""

    source: str
    reason: str  # empty | binary | not-utf8 | unsupported | bad-record | unreadable
    detail: str

    def message(self) -> str:
        return f"skipped {self.source}: {self.detail}"


@dataclass
class LoadReport:
    """Skipped inputs of one load, with counts by reason."""

    skipped: list[SkippedInput] = field(default_factory=list)
    documents: int = 0

    def skip(self, source: str, reason: str, detail: str) -> None:
        item = SkippedInput(source, reason, detail)
        self.skipped.append(item)
        logger.warning("%s", item.message())

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))


def load_documents(path: str | os.PathLike, report: LoadReport | None = None, *,
                   text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Yield the documents under ``path`` (a folder, searched recursively, or one file).

    Skipped inputs go into ``report``. Raises FileNotFoundError when ``path`` does not exist.
    """
    root = Path(path)
    report = report if report is not None else LoadReport()
    if not root.exists():
        raise FileNotFoundError(f"corpus path {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        rel = file.relative_to(root).as_posix() if root.is_dir() else file.name
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # hidden files and folders (.git, .DS_Store) are not corpus content
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            docs = _load_text_file(file, rel, report)
        elif suffix in JSONL_SUFFIXES:
            docs = _load_jsonl(file, rel, report, text_field, id_field)
        elif suffix in PARQUET_SUFFIXES:
            docs = _load_parquet(file, rel, report, text_field, id_field)
        else:
            report.skip(rel, "unsupported", f"unsupported file type {suffix or '(none)'!r} "
                        f"(supported: {', '.join(SUPPORTED_SUFFIXES)})")
            continue
        for doc in docs:
            report.documents += 1
            yield doc


def decode_text(data: bytes) -> tuple[str | None, str, str]:
    """``(text, reason, detail)``: the UTF-8 text, or None with why it is not usable text."""
    head = data[:_SNIFF]
    if b"\x00" in head:
        return None, "binary", "binary content (NUL bytes)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, "not-utf8", f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
    sample = text[:_SNIFF]
    control = sum(1 for c in sample if ord(c) < 32 and c not in "\t\n\r\f\v")
    if sample and control / len(sample) > 0.1:
        return None, "binary", f"binary content ({control} control characters in the first {len(sample)})"
    if not text.strip():
        return None, "empty", "empty or whitespace only"
    return text, "", ""


def _load_text_file(file: Path, rel: str, report: LoadReport) -> Iterator[Document]:
    try:
        data = file.read_bytes()
    except OSError as e:
        report.skip(rel, "unreadable", f"cannot read: {e}")
        return
    text, reason, detail = decode_text(data)
    if text is None:
        report.skip(rel, reason, detail)
        return
    yield Document(rel, text, {"source": rel})


def _load_jsonl(file: Path, rel: str, report: LoadReport, text_field: str, id_field: str) -> Iterator[Document]:
    try:
        data = file.read_bytes()
    except OSError as e:
        report.skip(rel, "unreadable", f"cannot read: {e}")
        return
    content, reason, detail = decode_text(data) if data.strip() else (None, "empty", "empty file")
    if content is None:
        report.skip(rel, reason, detail)
        return
    for n, obj in iter_json_lines(content.splitlines(), lambda n, problem: report.skip(f"{rel}:{n}", "bad-record",
                                                                                      problem)):
        doc = _record_document(obj, f"{rel}:{n}", report, text_field, id_field, source=rel)
        if doc is not None:
            yield doc


def _load_parquet(file: Path, rel: str, report: LoadReport, text_field: str, id_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
        report.skip(rel, "unreadable", f"not a readable parquet file ({e})")
        return
    if text_field not in pf.schema_arrow.names:
        report.skip(rel, "bad-record", f"no {text_field!r} column (columns: {', '.join(pf.schema_arrow.names)})")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            doc = _record_document(obj, f"{rel}:{row}", report, text_field, id_field, source=rel)
            if doc is not None:
                yield doc


def _record_document(obj, where: str, report: LoadReport, text_field: str, id_field: str,
                     source: str) -> Document | None:
    """A Document from a JSONL/parquet record, or None (reported) when it has no usable text."""
    if not isinstance(obj, dict):
        report.skip(where, "bad-record", f"a {type(obj).__name__}, not an object")
        return None
    text = obj.get(text_field)
    if isinstance(text, bytes):
        text, reason, detail = decode_text(text)
        if text is None:
            report.skip(where, reason, detail)
            return None
    if not isinstance(text, str):
        report.skip(where, "bad-record", f"no string {text_field!r} field")
        return None
    if "\x00" in text:
        report.skip(where, "binary", "binary content (NUL characters)")
        return None
    if not text.strip():
        report.skip(where, "empty", "empty or whitespace only")
        return None
    doc_id = obj.get(id_field)
    meta = {k: _jsonable(v) for k, v in obj.items() if k not in (text_field,)}
    meta.setdefault("source", source)
    return Document(str(doc_id) if doc_id is not None else where, text, meta)


def _jsonable(v):
    """Metadata values as JSON-serialisable ones (anything else becomes its string)."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)
