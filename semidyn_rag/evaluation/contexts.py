"""The contexts an evaluation run reads: which ones each question gets, and their features.

Every context is planned once and encoded (or read from a corpus store) once, however many
questions and systems read it: each fixed factor and semi-dynamic scale then derives its latents
from the same features. A context the encoder refuses is reported by the questions reading it;
one over the encoder's limit is handled by ``--on-overflow`` for every system alike (``error``,
``truncate`` to the limit, or ``skip`` the questions reading it), so comparisons stay fair.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    encoded: bool = True  # features come from the encoder (False: from a corpus store)


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
    return Contexts(texts, plan, lambda t: retriever.features(comp, t, len(t)), retriever, encoded=False)


def _unique_contexts(samples: Sequence[QASample]) -> tuple[list[str], dict[str, int]]:
    index: dict[str, int] = {}
    for s in samples:
        if s.context is not None and s.context not in index:
            index[s.context] = len(index)
    return list(index), index


@dataclass
class Overflow:
    """Contexts over the encoder limit and what ``on_overflow`` did about them (kept across resumes)."""

    mode: str
    limit: int
    contexts: set[str] = field(default_factory=set)  # sha256 of each over-limit context
    skipped_questions: set[str] = field(default_factory=set)

    def to_json(self) -> dict:
        return {"mode": self.mode, "limit": self.limit, "contexts_over_limit": len(self.contexts),
                "questions_skipped": len(self.skipped_questions),
                "contexts_truncated": len(self.contexts) if self.mode == "truncate" else 0,
                "skipped_ids": sorted(self.skipped_questions), "context_digests": sorted(self.contexts)}

    @classmethod
    def from_json(cls, d: dict) -> Overflow:
        return cls(d["mode"], int(d["limit"]), set(d.get("context_digests", ())), set(d.get("skipped_ids", ())))


def handle_overflow(config: EvalConfig, comp, ctx: Contexts, overflow: Overflow) -> None:
    """Apply ``config.on_overflow`` to the planned contexts over the encoder limit, in place.

    ``truncate`` cuts them to the limit (every system then reads the cut text), ``skip`` drops
    the questions reading them from the plan (and records them in ``overflow``), ``error``
    raises EvalError naming those questions.
    """
    tok, limit = comp.encoder.tokenizer, comp.encoder.max_tokens
    used = sorted({i for q in ctx.plan.values() for i in q.corpus_ids})
    over = {}
    for i in used:
        ids = tok(ctx.texts[i], add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            over[i] = ids
    if not over:
        return
    readers = {i: sorted(q.sample.id for q in ctx.plan.values() if i in q.corpus_ids) for i in over}
    overflow.contexts.update(hashlib.sha256(ctx.texts[i].encode()).hexdigest() for i in over)
    if config.on_overflow == "error":
        i, ids = next(iter(over.items()))
        users = readers[i]
        more = f" and {len(users) - 5} more" if len(users) > 5 else ""
        raise EvalError(f"{len(over)} context(s) exceed the encoder limit of {limit} tokens; the first "
                        f"({len(ids)} tokens) is read by question(s) {', '.join(map(repr, users[:5]))}{more}; "
                        "pass --on-overflow skip or truncate")
    if config.on_overflow == "truncate":
        for i, ids in over.items():
            keep = limit
            while keep > 0:  # decoding and re-tokenizing may merge differently: make sure it fits
                text = tok.decode(ids[:keep], skip_special_tokens=True)
                if len(tok(text, add_special_tokens=False)["input_ids"]) <= limit:
                    break
                keep -= 1
            ctx.texts[i] = text
        return
    skip = {qid for users in readers.values() for qid in users}
    overflow.skipped_questions.update(skip)
    for qid in skip:
        ctx.plan.pop(qid, None)


def encode_contexts(config: EvalConfig, comp, items: dict[int, ContextItem], ids: list[int],
                    plan: dict[str, _Question], features: Callable[[list[str]], list], *,
                    encoded: bool = True) -> None:
    """Encode (or read) each context once, in batches; give each its share of its batch's time.

    Each context also gets both query-time costs of the soft compressor: an encoder pass
    (``encoded`` features are timed as they are made; store-read features are encoded once
    more to time it) and a read from a latent store (the features are written to a temporary
    ``LatentStore`` and read back).
    """
    if not ids:
        return
    from ..store import LatentStore
    from ..store.keys import chunk_key

    ids = sorted(ids, key=lambda i: len(items[i].text))  # similar lengths pad less
    bar = tqdm(total=len(ids), desc="encoding contexts", unit="ctx", disable=not config.progress)
    with tempfile.TemporaryDirectory(prefix="semidyn-eval-store-") as tmp, LatentStore(Path(tmp) / "l.sqlite") as store:
        for s in range(0, len(ids), config.batch_size):
            batch = ids[s : s + config.batch_size]
            texts = [items[i].text for i in batch]
            try:
                share, feats = _timed(comp, lambda: features(texts), len(batch))
            except (ContextTooLongError, ValueError):
                _raise_for_bad_context(comp, items, batch, plan)
                raise
            pass_share = share if encoded else _timed(comp, lambda: comp.encode(texts, batch_size=len(texts)),
                                                      len(batch))[0]
            keys = [chunk_key(t) for t in texts]
            store.put_many(zip(keys, feats))
            read_share = _timed(comp, lambda: store.get_many(keys, comp.feature_fingerprint), len(batch))[0]
            for i, f in zip(batch, feats):
                items[i].features, items[i].encode_s = f, share
                items[i].encode_pass_s, items[i].store_read_s = pass_share, read_share
            bar.update(len(batch))
    bar.close()


def _timed(comp, fn: Callable, n: int):
    """(per-item share of the seconds ``fn`` took, its result)."""
    if comp.device.type == "cuda":
        torch.cuda.synchronize(comp.device)
    t0 = time.perf_counter()
    out = fn()
    if comp.device.type == "cuda":
        torch.cuda.synchronize(comp.device)
    return (time.perf_counter() - t0) / n, out


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
