"""The contexts an evaluation run reads: which ones each question gets, and their features.

Every context is planned once and encoded (or read from a corpus store) once, however many
questions and systems read it: each fixed factor and semi-dynamic scale then derives its latents
from the same features. A context the encoder refuses is reported by the questions reading it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..pipeline.encoder import ContextTooLongError
from .datasets import QASample
from .errors import EvalError
from .retrieval import CorpusRetriever, DenseRetriever
from .systems import ContextItem

if TYPE_CHECKING:
    from .runner import EvalConfig


@dataclass
class _Question:
    """One question's plan: the contexts it reads, what retrieving them took, whether gold was hit."""

    sample: QASample
    corpus_ids: list[int]  # indices into the run's context list
    retrieve_s: float = 0.0
    gold_retrieved: bool | None = None


@dataclass
class Contexts:
    """The texts questions read, which ones each reads, and how their features are obtained."""

    texts: list[str]
    plan: dict[str, _Question]
    features: Callable[[list[str]], list]
    retriever: object | None = None


def plan_contexts(config: EvalConfig, comp, all_samples: Sequence[QASample], questions: list[QASample],
                  out: Path) -> Contexts:
    """Which contexts each question reads: its own (gold), or top-k retrieved from the dataset's
    contexts or a corpus folder (rag). Raises EvalError for a gold question without a context, or
    a rag run with nothing to retrieve from."""

    def encode(texts: list[str]) -> list:
        return comp.encode(texts, batch_size=len(texts))

    if config.setting == "gold":
        texts, index = _unique_contexts(questions)
        plan = {}
        for q in questions:
            if q.context is None:
                raise EvalError(f"question {q.id!r} has no context: the gold setting needs one "
                                "(use --setting rag --corpus DIR for open-domain questions)")
            plan[q.id] = _Question(q, [index[q.context]])
        return Contexts(texts, plan, encode)
    if config.corpus:
        return _plan_from_corpus(config, comp, questions)
    texts, index = _unique_contexts(all_samples)
    if not texts:
        raise EvalError(f"{config.dataset} has no contexts to retrieve from; pass --corpus DIR "
                        "(a corpus folder made by `semidyn-rag precompress`)")
    retriever = DenseRetriever(texts, config.retriever, cache_dir=out)
    plan = {}
    for q in tqdm(questions, desc="retrieving", unit="q", disable=not config.progress):
        hit = retriever.search(q.question, config.k)
        gold = index.get(q.context) if q.context is not None else None
        plan[q.id] = _Question(q, hit.indices, hit.seconds, None if gold is None else gold in hit.indices)
    return Contexts(texts, plan, encode, retriever)


def _plan_from_corpus(config: EvalConfig, comp, questions: list[QASample]) -> Contexts:
    """Retrieve from a corpus folder; features come from its store (misses encoded, not stored)."""
    retriever = CorpusRetriever(config.corpus)
    texts: list[str] = []
    local: dict[int, int] = {}  # corpus chunk id -> index into texts
    plan = {}
    for q in tqdm(questions, desc="retrieving", unit="q", disable=not config.progress):
        hit = retriever.search(q.question, config.k)
        ids = []
        for cid, text in zip(hit.indices, hit.texts):
            if cid not in local:
                local[cid] = len(texts)
                texts.append(text)
            ids.append(local[cid])
        # A chunk of the question's own context counts as the gold one (chunking splits contexts).
        gold = None
        if q.context is not None:
            own = " ".join(q.context.split())
            gold = any(" ".join(t.split()) in own for t in hit.texts)
        plan[q.id] = _Question(q, ids, hit.seconds, gold)
    return Contexts(texts, plan, lambda t: retriever.features(comp, t, len(t)), retriever)


def _unique_contexts(samples: Sequence[QASample]) -> tuple[list[str], dict[str, int]]:
    index: dict[str, int] = {}
    for s in samples:
        if s.context is not None and s.context not in index:
            index[s.context] = len(index)
    return list(index), index


def encode_contexts(config: EvalConfig, comp, items: dict[int, ContextItem], ids: list[int],
                    plan: dict[str, _Question], features: Callable[[list[str]], list]) -> None:
    """Encode (or read) each context once, in batches; give each its share of its batch's time."""
    if not ids:
        return
    ids = sorted(ids, key=lambda i: len(items[i].text))  # similar lengths pad less
    bar = tqdm(total=len(ids), desc="encoding contexts", unit="ctx", disable=not config.progress)
    for s in range(0, len(ids), config.batch_size):
        batch = ids[s : s + config.batch_size]
        if comp.device.type == "cuda":
            torch.cuda.synchronize(comp.device)
        t0 = time.perf_counter()
        try:
            feats = features([items[i].text for i in batch])
        except (ContextTooLongError, ValueError):
            _raise_for_bad_context(comp, items, batch, plan)
            raise
        if comp.device.type == "cuda":
            torch.cuda.synchronize(comp.device)
        share = (time.perf_counter() - t0) / len(batch)
        for i, f in zip(batch, feats):
            items[i].features, items[i].encode_s = f, share
        bar.update(len(batch))
    bar.close()


def _raise_for_bad_context(comp, items: dict[int, ContextItem], batch: list[int], plan: dict[str, _Question]):
    """Find the context of ``batch`` the encoder refuses and raise naming the questions reading it."""
    for i in batch:
        try:
            comp.encoder.tokenize([items[i].text])
        except (ContextTooLongError, ValueError) as e:
            users = sorted(q.sample.id for q in plan.values() if i in q.corpus_ids)
            more = f" and {len(users) - 5} more" if len(users) > 5 else ""
            raise EvalError(f"the context of question(s) {', '.join(map(repr, users[:5]))}{more} cannot be "
                            f"encoded: {str(e).replace('context 0', 'it')}") from e
