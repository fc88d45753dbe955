"""What one evaluation run records: a line per (system, question), a summary per system.

``SampleResult`` is one JSONL line of ``samples.jsonl`` (the resumable part of a run, kept by
``ResultLog``); ``SystemSummary`` is what ``metrics.summarize`` makes of a system's lines and
what the report tables and plots show. Both are plain dataclasses that round-trip through JSON.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..jsonl import iter_json_lines

logger = logging.getLogger(__name__)


@dataclass
class SampleResult:
    """One question answered by one system, with its scores, sizes and timings."""

    system: str
    sample_id: str
    prediction: str
    answers: list[str]
    correct: bool  # substring accuracy (the paper's metric)
    exact_match: float
    f1: float
    # Per context the decoder read (empty for no context): source tokens and decoder positions
    # it occupied (latents, or text tokens for text systems), and the chosen factor if any.
    chunk_tokens: list[int] = field(default_factory=list)
    chunk_positions: list[int] = field(default_factory=list)
    factors: list[int | None] = field(default_factory=list)
    prefill_tokens: int = 0  # decoder input length, prompt template included
    new_tokens: int = 0
    retrieve_s: float = 0.0
    compress_s: float = 0.0  # encoder share + selection/pooling/projection, or cache read
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0  # retrieve + compress + prefill: question in, first token out
    gold_retrieved: bool | None = None  # rag setting: was the question's own context retrieved
    # Latent systems: what compress_s would be with the features in a latent store (a read)
    # and without (an encoder pass); compress_s is whichever this run did.
    compress_cached_s: float | None = None
    compress_uncached_s: float | None = None
    extra: dict | None = None  # system-specific figures (progressive: budget, scan, each chunk's read)

    @property
    def source_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def context_positions(self) -> int:
        return sum(self.chunk_positions)

    @property
    def ratio(self) -> float | None:
        """Source tokens per decoder position over all contexts; None without context."""
        return self.source_tokens / self.context_positions if self.context_positions else None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SampleResult:
        names = {f.name for f in fields(cls)}
        missing = {"system", "sample_id", "prediction", "answers", "correct", "exact_match", "f1"} - d.keys()
        if missing:
            raise ValueError(f"result line lacks {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SystemSummary:
    """Aggregate scores of one system over the evaluated questions."""

    system: str
    family: str  # uncompressed | no_context | fixed | semi_dynamic | llmlingua2
    param: float | None  # the factor, scale or rate the system was run at
    n: int
    n_correct: int
    accuracy: float  # substring accuracy
    exact_match: float
    f1: float
    # Average compression ratio over CORRECTLY answered questions only (the paper's filter),
    # as the mean of per-question ratios and as sum(source tokens) / sum(positions).
    mean_ratio: float | None
    ratio_of_sums: float | None
    ratio_all: float | None  # sum(source) / sum(positions) over ALL questions with context
    # Over all questions (what the selector chose, right or wrong):
    positions_per_chunk: float | None  # latents per chunk (text tokens for text systems)
    log2_factor_var: float | None  # the paper's Figure 5 x-axis
    factor_histogram: dict[str, int]
    prefill_tokens: float
    new_tokens: float
    retrieve_s: float
    compress_s: float
    prefill_s: float
    decode_s: float
    ttft_s: float
    total_s: float
    gold_recall: float | None = None  # rag: share of questions whose own context was retrieved
    gain_over_fixed: float | None = None  # semi-dynamic: accuracy minus fixed-factor curve there
    accuracy_ci95: tuple[float, float] | None = None  # Wilson interval of the substring accuracy
    compress_cached_s: float | None = None  # latent systems: derive + latent-store read
    compress_uncached_s: float | None = None  # latent systems: derive + encoder pass

    def to_json(self) -> dict:
        d = asdict(self)
        if d["accuracy_ci95"] is not None:
            d["accuracy_ci95"] = list(d["accuracy_ci95"])  # as it reads back from JSON
        return d


class ResultLog:
    """``samples.jsonl``: one ``SampleResult`` per line, appended and flushed as each finishes.

    Reopening reads what an earlier (possibly killed) run wrote; a last line cut off by a kill
    is dropped (the file is truncated back to its last complete line) and recomputed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.results: dict[tuple[str, str], SampleResult] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            logger.warning("%s: dropping an incomplete last line (interrupted run)", self.path)
            with self.path.open("r+b") as f:
                f.truncate(end)
        def bad(lineno: int, problem: str):
            raise ValueError(f"{self.path} line {lineno}: not a result line ({problem}); "
                             "delete the file or use another output directory")

        for lineno, row in iter_json_lines(raw[:end].decode("utf-8").splitlines(), bad):
            try:
                r = SampleResult.from_json(row)
            except (ValueError, TypeError) as e:
                bad(lineno, str(e))
            self.results[(r.system, r.sample_id)] = r

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.results

    def append(self, result: SampleResult) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.results[(result.system, result.sample_id)] = result
