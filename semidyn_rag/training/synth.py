"""Two-phase data synthesis with a teacher LLM (Section 3.4), resumable and validated.

Phase 1 asks the teacher, per seed context, for question-answer pairs and a summary (the
tasks that give the LM loss). Phase 2 asks for an ultra-concise summary that omits every
redundant word; its length is the density label's denominator. Each phase appends one JSON
line per seed to its own file in the output folder (``phase1.jsonl``, ``phase2.jsonl``) as
soon as a batch is answered, so an interrupted run picks up at the first unfinished seed;
``assemble`` then joins both into ``records.jsonl`` (training records; see ``records``).

Seeds are deduplicated by normalized text, QA pairs by normalized question per context.
Teacher output is validated before it is kept (the prompts and the checks live in ``prompts``);
rejections are recorded with their reason and not asked again unless ``retry_rejected``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..jsonl import iter_json_lines
from .data import context_key
from .prompts import (
    PHASE1_PROMPT,
    PHASE2_PROMPT,
    Limits,
    check_qa,
    check_summary,
    clean_concise,
    normalize,
    parse_phase1,
)
from .records import DEFAULT_SUMMARY_INSTRUCTION, TrainingRecord, iter_records, write_records
from .teachers import Teacher

logger = logging.getLogger(__name__)

_SEED_EXTS = {".txt", ".md", ".jsonl", ".json", ".parquet"}


# -- seeds -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seed:
    """A seed context: its dedup key (also its id), the text, and where it came from."""

    id: str
    text: str
    source: str


def chunk_text(text: str, max_words: int) -> list[str]:
    """Pack paragraphs (blank-line separated) into chunks of at most ``max_words`` words.

    A paragraph longer than that is cut at sentence ends where it can be, else at words.
    """
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        if len(para.split()) <= max_words:
            pieces.append(para)
            continue
        sentences = re.split(r"(?<=[.!?])\s+", para)
        for s in sentences:
            words = s.split()
            for i in range(0, len(words), max_words):
                pieces.append(" ".join(words[i : i + max_words]))
    chunks, cur, n = [], [], 0
    for p in pieces:
        w = len(p.split())
        if cur and n + w > max_words:
            chunks.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(p)
        n += w
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def load_seeds(paths: Sequence[str | Path], *, text_field: str = "context", min_words: int = 50,
               max_words: int = 700, limit: int | None = None) -> list[Seed]:
    """Seed contexts from text files (chunked), JSONL/JSON lines or parquet files, or folders.

    JSON records give their text in ``text_field`` (then ``context`` or ``text``); a list value
    gives one seed per element. Texts over ``max_words`` are chunked; chunks under
    ``min_words`` dropped; duplicates (after normalizing case and spaces) dropped.
    """
    seeds: list[Seed] = []
    seen: set[str] = set()
    for path in _expand(paths):
        for source, text in _read_seed_file(path, text_field):
            for j, chunk in enumerate(chunk_text(text, max_words)):
                if len(chunk.split()) < min_words:
                    continue
                key = context_key(chunk)
                if key in seen:
                    continue
                seen.add(key)
                seeds.append(Seed(key, chunk, source if j == 0 else f"{source}#{j}"))
                if limit is not None and len(seeds) >= limit:
                    return seeds
    return seeds


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in _SEED_EXTS and f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no seed file or folder at {p}")
    return out


def _read_seed_file(path: Path, text_field: str) -> Iterable[tuple[str, str]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = next((c for c in (text_field, "context", "text") if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{path} has no column {text_field!r}, 'context' or 'text'")
        for i, v in enumerate(table.column(col).to_pylist()):
            yield from _texts(v, f"{path}:{i}")
    elif path.suffix in (".jsonl", ".json"):
        def bad(lineno: int, problem: str):
            raise ValueError(f"{path}:{lineno}: {problem}")

        with path.open(encoding="utf-8") as fh:
            for lineno, obj in iter_json_lines(fh, bad):
                key = next((k for k in (text_field, "context", "text") if isinstance(obj, dict) and k in obj), None)
                if key is None:
                    raise ValueError(f"{path}:{lineno}: no field {text_field!r}, 'context' or 'text'")
                src = obj.get("source") or obj.get("id") or f"{path}:{lineno}"
                yield from _texts(obj[key], str(src))
    else:
        yield str(path), path.read_text(encoding="utf-8", errors="replace")


def _texts(value, source: str) -> Iterable[tuple[str, str]]:
    if isinstance(value, list):
        for j, v in enumerate(value):
            if isinstance(v, str):
                yield f"{source}[{j}]", v
    elif isinstance(value, str):
        yield source, value


# -- the phases --------------------------------------------------------------------------------

@dataclass
class SynthStats:
    """Counts of one synthesis run, per phase."""

    seeds: int = 0
    done_before: dict = field(default_factory=lambda: {1: 0, 2: 0})
    asked: dict = field(default_factory=lambda: {1: 0, 2: 0})
    kept_qa: int = 0
    rejected: dict = field(default_factory=dict)
    records: int = 0


def _read_state(path: Path, retry_rejected: bool) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    # a line cut by a crash mid-write is skipped: its seed is asked again
    for _, row in iter_json_lines(path.read_text(encoding="utf-8").splitlines(), lambda n, problem: None):
        if retry_rejected and row.get("failed"):
            continue
        done[row["seed_id"]] = row
    return done


def _append(path: Path, rows: list[dict]) -> None:
    """Append rows as JSON lines, first ending a line a crash may have left unfinished."""
    cut = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
    with path.open("a", encoding="utf-8") as fh:
        if cut:
            fh.write("\n")
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1)


def run_phase1(seeds: Sequence[Seed], teacher: Teacher, out_dir: str | Path, *, n_questions: int = 3,
               limits: Limits | None = None, batch_size: int = 8, retry_rejected: bool = False,
               progress: bool = True, stats: SynthStats | None = None) -> SynthStats:
    """Ask the teacher for QA pairs and a summary of every seed not yet in ``phase1.jsonl``."""
    limits = limits or Limits()
    stats = stats or SynthStats(seeds=len(seeds))
    path = Path(out_dir) / "phase1.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_state(path, retry_rejected)
    todo = [s for s in seeds if s.id not in done]
    stats.done_before[1] = len(seeds) - len(todo)
    for s in tqdm(range(0, len(todo), batch_size), desc="phase 1: QA + summaries", disable=not progress,
                  total=-(-len(todo) // batch_size)):
        batch = todo[s : s + batch_size]
        replies = teacher.complete([PHASE1_PROMPT.format(n=n_questions, context=x.text) for x in batch])
        rows = [_phase1_row(seed, reply, limits, stats) for seed, reply in zip(batch, replies)]
        stats.asked[1] += len(batch)
        _append(path, rows)
    return stats


def _phase1_row(seed: Seed, reply: str, limits: Limits, stats: SynthStats) -> dict:
    qa, summary = parse_phase1(reply)
    kept, reasons, seen = [], [], set()
    for q, a in qa:
        why = check_qa(q, a, seed.text, limits)
        if why is None and normalize(q) in seen:
            why = "duplicate question"
        if why:
            reasons.append(why)
            stats.rejected[why] = stats.rejected.get(why, 0) + 1
            continue
        seen.add(normalize(q))
        kept.append({"question": q, "answer": a})
    why = check_summary(summary, seed.text, limits, concise=False)
    if why:
        reasons.append(why)
        stats.rejected[why] = stats.rejected.get(why, 0) + 1
        summary = None
    if not qa and summary is None:
        reasons.append("unparseable reply")
    stats.kept_qa += len(kept)
    return {"seed_id": seed.id, "source": seed.source, "context": seed.text, "qa": kept, "summary": summary,
            "rejected": reasons, "failed": not kept and summary is None}


def run_phase2(seeds: Sequence[Seed], teacher: Teacher, out_dir: str | Path, *, limits: Limits | None = None,
               batch_size: int = 8, retry_rejected: bool = False, progress: bool = True,
               stats: SynthStats | None = None, state_file: str = "phase2.jsonl") -> SynthStats:
    """Ask the teacher for an ultra-concise summary of every seed not yet in ``phase2.jsonl``."""
    limits = limits or Limits()
    stats = stats or SynthStats(seeds=len(seeds))
    path = Path(out_dir) / state_file
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_state(path, retry_rejected)
    todo = [s for s in seeds if s.id not in done]
    stats.done_before[2] = len(seeds) - len(todo)
    for s in tqdm(range(0, len(todo), batch_size), desc="phase 2: ultra-concise summaries",
                  disable=not progress, total=-(-len(todo) // batch_size)):
        batch = todo[s : s + batch_size]
        replies = teacher.complete([PHASE2_PROMPT.format(context=x.text) for x in batch])
        rows = []
        for seed, reply in zip(batch, replies):
            concise = clean_concise(reply)
            why = check_summary(concise, seed.text, limits, concise=True)
            if why:
                stats.rejected[why] = stats.rejected.get(why, 0) + 1
            rows.append({"seed_id": seed.id, "concise_summary": None if why else concise,
                         "rejected": [why] if why else [], "failed": bool(why)})
        stats.asked[2] += len(batch)
        _append(path, rows)
    return stats


def assemble(out_dir: str | Path, *, multi_doc_fraction: float = 0.0, multi_doc_contexts: int = 3,
             seed: int = 0, file: str = "records.jsonl") -> int:
    """Join ``phase1.jsonl`` and ``phase2.jsonl`` into training records; returns how many.

    Every kept QA pair becomes a ``qa`` record and every kept summary a ``summary`` record,
    each carrying the context's ultra-concise summary when phase 2 produced one. With
    ``multi_doc_fraction`` > 0, that share of QA pairs also becomes a ``multi_doc_qa`` record
    with ``multi_doc_contexts - 1`` other seeds as distractors, in shuffled order.
    """
    out_dir = Path(out_dir)
    p1 = _read_state(out_dir / "phase1.jsonl", retry_rejected=False)
    p2 = _read_state(out_dir / "phase2.jsonl", retry_rejected=False)
    concise = {k: v.get("concise_summary") for k, v in p2.items()}
    rng = random.Random(seed)
    ids = list(p1)
    records: list[TrainingRecord] = []
    seen_pairs: set[tuple[str, str]] = set()
    for sid in ids:
        row = p1[sid]
        ctx, cs, src = row["context"], concise.get(sid), row.get("source")
        for qa in row.get("qa", []):
            pair = (sid, normalize(qa["question"]))
            if pair in seen_pairs:
                continue
            seen_pairs.add(pair)
            records.append(TrainingRecord(context=ctx, task="qa", question=qa["question"], answer=qa["answer"],
                                          concise_summary=cs, source=src, meta={"seed_id": sid}))
            if multi_doc_fraction > 0 and len(ids) >= multi_doc_contexts and rng.random() < multi_doc_fraction:
                others = rng.sample([i for i in ids if i != sid], multi_doc_contexts - 1)
                group = [sid, *others]
                rng.shuffle(group)
                records.append(TrainingRecord(
                    context=[p1[g]["context"] for g in group], task="multi_doc_qa", question=qa["question"],
                    answer=qa["answer"], concise_summary=[concise.get(g) for g in group], source=src,
                    meta={"seed_id": sid, "seed_ids": group}))
        if row.get("summary"):
            records.append(TrainingRecord(context=ctx, task="summary", question=DEFAULT_SUMMARY_INSTRUCTION,
                                          answer=row["summary"], concise_summary=cs, source=src,
                                          meta={"seed_id": sid}))
    return write_records(out_dir / file, records)


def synthesize(seeds: Sequence[Seed], teacher: Teacher, out_dir: str | Path, *, phases: Sequence[int] = (1, 2),
               n_questions: int = 3, limits: Limits | None = None, batch_size: int = 8,
               retry_rejected: bool = False, multi_doc_fraction: float = 0.0, multi_doc_contexts: int = 3,
               seed: int = 0, progress: bool = True) -> SynthStats:
    """Run the requested phases (resuming), then assemble ``records.jsonl``; returns counts.

    Phase 2 is asked only for seeds that phase 1 kept something from (when phase 1 ran).
    """
    stats = SynthStats(seeds=len(seeds))
    if 1 in phases:
        run_phase1(seeds, teacher, out_dir, n_questions=n_questions, limits=limits, batch_size=batch_size,
                   retry_rejected=retry_rejected, progress=progress, stats=stats)
    if 2 in phases:
        p1 = _read_state(Path(out_dir) / "phase1.jsonl", retry_rejected=False)
        useful = [s for s in seeds if s.id in p1 and not p1[s.id].get("failed")] if p1 else list(seeds)
        run_phase2(useful, teacher, out_dir, limits=limits, batch_size=batch_size,
                   retry_rejected=retry_rejected, progress=progress, stats=stats)
    stats.records = assemble(out_dir, multi_doc_fraction=multi_doc_fraction,
                             multi_doc_contexts=multi_doc_contexts, seed=seed)
    return stats


def summarize_records(records_path: str | Path, teacher: Teacher, out_path: str | Path, *,
                      limits: Limits | None = None, batch_size: int = 8, retry_rejected: bool = False,
                      progress: bool = True) -> SynthStats:
    """Phase 2 alone for existing records: add the teacher's ultra-concise summary to each context.

    Resumable through ``<out_path>.phase2.jsonl``; records keep any summary they already have.
    """
    out_path = Path(out_path)
    records = [r for _, r in iter_records(records_path)]
    contexts: dict[str, str] = {}
    for r in records:
        for c in r.contexts:
            contexts.setdefault(context_key(c), c)
    seeds = [Seed(k, t, "") for k, t in contexts.items()]
    state = out_path.name + ".phase2.jsonl"
    stats = run_phase2(seeds, teacher, out_path.parent, limits=limits, batch_size=batch_size,
                       retry_rejected=retry_rejected, progress=progress, state_file=state)
    concise = {k: v.get("concise_summary") for k, v in _read_state(out_path.parent / state, False).items()}
    out = []
    for r in records:
        have = r.summaries
        new = [h if h is not None else concise.get(context_key(c)) for h, c in zip(have, r.contexts)]
        value = new if isinstance(r.context, list) else new[0]
        out.append(r.model_copy(update={"concise_summary": value}))
    stats.records = write_records(out_path, out)
    return stats
