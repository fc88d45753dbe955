"""What a RAG framework talks to: compress retrieved chunks through the cache, answer text prompts.

Frameworks such as LlamaIndex hand the LLM a *text* prompt with the retrieved chunks pasted in;
latents cannot travel inside it. A ``CompressionSession`` bridges that: ``compress_chunks``
(called by a node postprocessor) reads each chunk's features from the latent store (encoding
only the misses, in one batch), derives latents at the query's scale and registers them under
the chunk's text; ``answer``/``stream`` (called by the LLM) find registered chunk texts inside
the prompt, replace each with one placeholder, and let the decoder read the latents there.
Chunks it does not know stay text. Everything here is framework-free.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from .compressor import SemiDynamicCompressor
from .store import LatentStore, chunk_key, normalize_text
from .store.memory import MemoryStore
from .types import CompressedContext, ContextFeatures


@dataclass
class ChunkCompression:
    """How one retrieved chunk was handled: compressed (with its figures) or passed as text."""

    key: str
    n_tokens: int
    compressed: bool
    n_latents: int | None = None
    factor: int | None = None
    y_hat: float | None = None
    cache_hit: bool = False
    reason: str | None = None  # why it stayed text

    def to_metadata(self) -> dict:
        """Plain JSON-able values for node metadata (never a tensor)."""
        return {f"semidyn_{k}": v for k, v in asdict(self).items() if v is not None}


@dataclass
class PromptUsage:
    """Token accounting of one answer: what the decoder prefilled against the plain-text prompt."""

    text_tokens: int  # prompt tokens that stayed text (template, question, uncompressed chunks)
    latent_slots: int  # positions filled by latents
    uncompressed_tokens: int  # the same prompt with every chunk as text
    chunks: list[dict] = field(default_factory=list)  # per spliced chunk: key, n_tokens, n_latents, factor

    @property
    def prefill_positions(self) -> int:
        return self.text_tokens + self.latent_slots

    @property
    def saved_tokens(self) -> int:
        return self.uncompressed_tokens - self.prefill_positions

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_positions": self.prefill_positions, "saved_tokens": self.saved_tokens}


class CompressionSession:
    """Shared state between a postprocessor and an LLM: compressor, feature store, registered chunks.

    Features are always read through one :class:`~semidyn_rag.store.MemoryStore` (an LRU of
    ``max_registered`` entries) in front of ``store`` when one is given. ``max_registered``
    also bounds the registry of recently compressed chunks. Thread-safe.
    """

    def __init__(self, compressor: SemiDynamicCompressor, store: LatentStore | None = None,
                 *, max_registered: int = 4096, batch_size: int = 16, backend=None):
        self.compressor = compressor
        self.store = store
        self.features = MemoryStore(max_registered, backing=store)
        self.batch_size = batch_size
        self.max_registered = max_registered
        # chunk text -> (key, latents, the chunk's decoder token count for the plain-prompt figure)
        self._latents: OrderedDict[str, tuple[str, CompressedContext, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.encoder_calls = 0
        # chunk text -> how progressive mode read it (semidyn_rag.progressive.session)
        self._progress: OrderedDict[str, tuple[dict, CompressedContext | None]] = OrderedDict()
        # who decodes answers (semidyn_rag.serving): the compressor's decoder unless a backend is given
        from .serving import TransformersBackend

        self.backend = backend if backend is not None else TransformersBackend(compressor.decoder, self._lock)

    # -- compression ----------------------------------------------------------------------------

    def compress_chunks(self, texts: Sequence[str], *, scale: float = 0.0, max_latents: int | None = None,
                        min_tokens: int = 0) -> list[ChunkCompression]:
        """Compress each chunk separately and register it for ``answer``.

        Features come from memory, then the store, then the encoder (misses in one batch,
        written back). Each chunk is normalised, hashed and tokenized once. Chunks under
        ``min_tokens`` stay text. With ``max_latents``, the scale is raised in steps of 0.5
        until the chunks fit; if even the coarsest size does not fit, the trailing chunks
        (lowest ranked) stay text.
        """
        with self._lock:
            enc = self.compressor.encoder
            norm = [normalize_text(t) for t in texts]
            keys = [chunk_key(t) for t in norm]
            ids = enc.tokenizer(norm, add_special_tokens=False)["input_ids"] if texts else []
            results: list[ChunkCompression | None] = [None] * len(texts)
            todo = []
            for i, (t, row) in enumerate(zip(norm, ids)):
                n = len(row)
                reason = ("empty" if not t else f"under {min_tokens} tokens" if n < min_tokens
                          else f"over the encoder limit of {enc.max_tokens} tokens"
                          if n > enc.max_tokens and enc.on_overflow == "error" else None)
                if reason:
                    results[i] = ChunkCompression(keys[i], n, False, reason=reason)
                else:
                    todo.append(i)
            res = self.features.fetch_or_encode(
                self.compressor, [norm[i] for i in todo], batch_size=self.batch_size,
                keys=[keys[i] for i in todo], token_ids=[ids[i][: enc.max_tokens] for i in todo])
            self.encoder_calls += bool(res.encoded)
            ctx = self._fit_budget(res.features, scale, max_latents)
            dec_counts = self._decoder_counts([texts[i] for i in todo])
            for j, i in enumerate(todo):
                key, c = keys[i], ctx[j]
                if c is None:
                    results[i] = ChunkCompression(key, res.features[j].n_tokens, False, reason="over the latent budget")
                    continue
                self._register(texts[i], key, c, dec_counts[j])
                results[i] = ChunkCompression(key, c.n_tokens, True, c.n_latents, c.factor, round(c.y_hat, 4),
                                              key not in res.encoded_keys)
            return results  # type: ignore[return-value]

    def _decoder_counts(self, texts: list[str]) -> list[int]:
        """Decoder tokens of each chunk as text (for the uncompressed-prompt figure)."""
        if not texts:
            return []
        return [len(r) for r in self.compressor.decoder.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _fit_budget(self, feats: list[ContextFeatures], scale: float,
                    max_latents: int | None) -> list[CompressedContext | None]:
        comp = self.compressor
        if not feats:
            return []
        ctx = comp.compress_features(feats, scale=scale)
        if max_latents is None:
            return list(ctx)
        s = scale
        pooling = comp.pooling
        while sum(c.n_latents for c in ctx) > max_latents and not all(
                pooling.is_coarsest(c.factor if c.factor is not None else c.n_latents) for c in ctx):
            s += 0.5
            ctx = comp.compress_features(feats, scale=s)
        out: list[CompressedContext | None] = []
        used = 0
        for c in ctx:
            if used + c.n_latents <= max_latents:
                out.append(c)
                used += c.n_latents
            else:
                out.append(None)
        return out

    def registered(self, text: str) -> CompressedContext | None:
        """The latents ``answer`` will read for this chunk text, if it was compressed recently."""
        with self._lock:
            hit = self._latents.get(text)
        return hit[1] if hit else None

    def read_progressive(self, question: str, texts: Sequence[str], *, max_latents: int,
                         scores: Sequence[float] | None = None, min_tokens: int = 0, **options):
        """Progressive mode: scan ``texts`` coarsely, re-read the relevant ones finely (or as text)
        within ``max_latents`` positions, and register each read for ``answer``/``stream``.

        Returns the ``semidyn_rag.progressive.ReadPlan`` (every chunk's read and why); chunks it
        drops or reads as text are unregistered. ``options`` go to ``ProgressiveReader``.
        """
        from .progressive.session import read_progressive

        return read_progressive(self, question, texts, max_latents=max_latents, scores=scores,
                                min_tokens=min_tokens, **options)

    def progress_notes(self, prompt: str) -> list[dict]:
        """How progressive mode read each chunk found in ``prompt`` (scan and final factor, why)."""
        from .progressive.session import progress_notes

        return progress_notes(self, prompt)

    def _register(self, text: str, key: str, ctx: CompressedContext, decoder_tokens: int) -> None:
        self._latents[text] = (key, ctx, decoder_tokens)
        self._latents.move_to_end(text)
        while len(self._latents) > self.max_registered:
            self._latents.popitem(last=False)

    # -- answering ------------------------------------------------------------------------------

    def splice(self, prompt: str) -> tuple[list[int], list[CompressedContext], PromptUsage]:
        """Replace registered chunk texts in ``prompt`` by placeholders.

        Returns the decoder's token ids of the rendered prompt (tokenized once, here), the
        contexts in order, and the token accounting. The plain-prompt figure adds each
        chunk's own decoder token count (a token more or less where BPE merges across a
        chunk boundary).
        """
        with self._lock:
            found = []
            for text, (key, ctx, n_dec) in self._latents.items():
                start = prompt.find(text)
                if start >= 0:
                    found.append((start, start + len(text), key, ctx, n_dec))
            found.sort(key=lambda f: (f[0], -f[1]))
            kept, end = [], -1
            for item in found:  # drop overlaps: the earlier (then longer) match wins
                if item[0] >= end:
                    kept.append(item)
                    end = item[1]
        dec = self.compressor.decoder
        if dec.placeholder in prompt:
            raise ValueError(f"the prompt already contains the placeholder token {dec.placeholder!r}")
        parts, pos = [], 0
        for s, e, *_ in kept:
            parts += [prompt[pos:s], dec.placeholder]
            pos = e
        spliced = "".join(parts) + prompt[pos:]
        contexts = [k[3] for k in kept]
        ids = dec.encode_prompts([dec.apply_chat(spliced)])[0]
        n_text = len(ids) - len(contexts)
        usage = PromptUsage(n_text, sum(c.n_latents for c in contexts), n_text + sum(k[4] for k in kept),
                            [{"key": k[2], "n_tokens": k[3].n_tokens, "n_latents": k[3].n_latents,
                              "factor": k[3].factor} for k in kept])
        return ids, contexts, usage

    def answer(self, prompt: str, max_new_tokens: int = 128, **generate_kwargs) -> tuple[str, PromptUsage]:
        """Answer a text prompt, reading every registered chunk in it as latents."""
        ids, contexts, usage = self.splice(prompt)
        (text,) = self.backend.generate([ids], self.compressor.context_latents([ids], [contexts]),
                                        max_new_tokens=max_new_tokens, **generate_kwargs)
        return text, usage

    async def aanswer(self, prompt: str, max_new_tokens: int = 128, **generate_kwargs) -> tuple[str, PromptUsage]:
        """``answer`` for asyncio: the decoding waits off the event loop."""
        ids, contexts, usage = self.splice(prompt)
        (c,) = await self.backend.acomplete([ids], self.compressor.context_latents([ids], [contexts]),
                                            max_new_tokens, **generate_kwargs)
        return c.text, usage

    def stream(self, prompt: str, max_new_tokens: int = 128, **generate_kwargs) -> tuple[Iterator[str], PromptUsage]:
        """Like ``answer`` but yields text pieces as they are decoded (decoding starts on first read)."""
        ids, contexts, usage = self.splice(prompt)
        latents = self.compressor.context_latents([ids], [contexts])[0]
        return self.backend.stream(ids, latents, max_new_tokens, **generate_kwargs), usage


def open_session(*, compressor: SemiDynamicCompressor | None = None, compressor_path: str | None = None,
                 store_path: str | None = None, device: str | None = None, backend="transformers",
                 vllm_url: str | None = None, **kwargs) -> CompressionSession:
    """A session from a compressor (object or checkpoint path) and an optional store.

    ``store_path`` is a latent store file, or a corpus directory made by ``precompress`` (its
    store is used, and its recorded compressor when none is given). ``backend`` decodes the
    answers: ``"transformers"``, ``"vllm"`` (an engine here, or the server at ``vllm_url``), or a
    backend object (see :func:`semidyn_rag.serving.make_backend`).
    """
    from pathlib import Path

    store = None
    if store_path is not None:
        p = Path(store_path)
        if p.is_dir():
            from .corpus.directory import STORE_FILE, read_manifest

            if compressor is None and compressor_path is None:
                rec = read_manifest(p).compressor
                compressor_path = getattr(rec, "path", None) if rec is not None else None
            p = p / STORE_FILE
        store = LatentStore.for_reading(p) if p.exists() else LatentStore(p)
    if compressor is None:
        if compressor_path is None:
            raise ValueError("give a compressor, a compressor_path, or a corpus directory that records one")
        overrides = {"device": device} if device else {}
        compressor = SemiDynamicCompressor.from_pretrained(compressor_path, **overrides)
    if backend != "transformers" or vllm_url:
        from .serving import make_backend

        kwargs["backend"] = make_backend(compressor, backend, vllm_url=vllm_url)
    return CompressionSession(compressor, store, **kwargs)


def messages_to_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The text prompt ``answer``/``stream`` take for a chat of ``(role, text)`` messages.

    The decoder reads one user turn (it was trained on ``Context: ...`` then ``Question: ...``),
    so a lone user message is returned as written; otherwise each message becomes a paragraph
    prefixed by its role (``System: ...``). Chunk texts inside any message are still found by
    ``splice``. Raises ValueError for an empty list.
    """
    if not messages:
        raise ValueError("no messages to answer")
    if len(messages) == 1 and messages[0][0] == "user":
        return messages[0][1]
    return "\n\n".join(f"{role.capitalize()}: {text}" for role, text in messages)
