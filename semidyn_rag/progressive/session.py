"""Progressive reading for frameworks that pass text prompts, through a ``CompressionSession``.

``read_progressive`` is what ``CompressionSession.read_progressive`` runs: it reads the
chunks' features through the session's feature path (memory, then store; only misses are
encoded, once), plans with a ``ProgressiveReader`` and registers each chunk's planned read, so
the session's ``answer``/``stream`` find it in the prompt: latents at the planned size for
chunks read as latents; chunks read as text or dropped are unregistered, so a latent read of
an earlier query can never stand in for them. Each chunk's read (scan factor, final factor,
why) is noted under its text for ``progress_notes``. It works on the session's registry under
the session's lock, which is why it lives beside the session.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..store import chunk_key, normalize_text
from .plan import ChunkRead, ReadPlan
from .reader import ProgressiveReader

_NOTE_FIELDS = ("read", "factor", "scan_factor", "positions", "expanded", "relevance_rank", "reason")


def read_progressive(session, question: str, texts: Sequence[str], *, max_latents: int,
                     scores: Sequence[float] | None = None, min_tokens: int = 0, **options) -> ReadPlan:
    """Plan and register the progressive read of ``texts`` (retrieval order) for ``question``.

    ``options`` go to ``ProgressiveReader`` (``signal``, ``max_expand``, ``expand_share``,
    ``coarse``, ``fine``, ``allow_text``). Chunks that cannot be compressed (empty, under
    ``min_tokens``, over the encoder limit) are dropped with that reason. Returns the plan,
    one ``ChunkRead`` per text in order. Raises ValueError for mismatched scores.
    """
    if scores is not None and len(scores) != len(texts):
        raise ValueError(f"{len(scores)} scores for {len(texts)} texts")
    reader = ProgressiveReader(session.compressor, **options)
    with session._lock:
        enc = session.compressor.encoder
        norm = [normalize_text(t) for t in texts]
        keys = [chunk_key(t) for t in norm]
        ids = enc.tokenizer(norm, add_special_tokens=False)["input_ids"] if texts else []
        usable, refused = [], {}
        for i, (t, row) in enumerate(zip(norm, ids)):
            n = len(row)
            if not t:
                refused[i] = "empty"
            elif n < min_tokens:
                refused[i] = f"under {min_tokens} tokens"
            elif n > enc.max_tokens and enc.on_overflow == "error":
                refused[i] = f"over the encoder limit of {enc.max_tokens} tokens"
            else:
                usable.append(i)
        res = session.features.fetch_or_encode(
            session.compressor, [norm[i] for i in usable], batch_size=session.batch_size,
            keys=[keys[i] for i in usable], token_ids=[ids[i][: enc.max_tokens] for i in usable])
        session.encoder_calls += bool(res.encoded)
        sub_texts = [texts[i] for i in usable]
        plan = reader.plan(question, res.features, max_latents=max_latents, texts=sub_texts,
                           scores=None if scores is None else [scores[i] for i in usable])
        latents = reader.latents(plan, res.features)
        reads: list[ChunkRead | None] = [None] * len(texts)
        registered = {}
        for j, (i, c) in enumerate(zip(usable, plan.chunks)):
            c.index = i
            reads[i] = c
            if c.read == "latents":
                registered[i] = latents[j]
                session._register(texts[i], keys[i], latents[j], c.text_tokens)
            else:
                session._latents.pop(texts[i], None)
        for i, why in refused.items():
            session._latents.pop(texts[i], None)
            reads[i] = ChunkRead(i, len(ids[i]), 0, "dropped", None, None, 0, None, None, len(texts),
                                 False, f"dropped: cannot be compressed ({why})")
        plan.chunks = reads  # type: ignore[assignment]
        plan.notes.update(store_hits=res.hits, encoded=res.encoded)
        notes = session._progress
        for i, c in enumerate(reads):  # kept with the latents registered now, to tell a stale note
            notes[texts[i]] = ({"key": keys[i], **{f: getattr(c, f) for f in _NOTE_FIELDS}}, registered.get(i))
            notes.move_to_end(texts[i])
        while len(notes) > session.max_registered:
            notes.popitem(last=False)
    return plan


def progress_notes(session, prompt: str) -> list[dict]:
    """The progressive reads noted for chunk texts found in ``prompt``, in prompt order.

    A note whose chunk was registered again since (by ``compress_chunks``) is stale and left out.
    """
    with session._lock:
        found = []
        for text, (note, lat) in session._progress.items():
            reg = session._latents.get(text)
            if text and text in prompt and (reg[1] is lat if reg is not None else lat is None):
                found.append((prompt.find(text), note))
    return [dict(note) for _, note in sorted(found, key=lambda f: f[0])]
