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
    """Shared state between a postprocessor and an LLM: compressor, store, registered chunks.

    ``store`` is optional (without it features live only in memory). ``max_registered`` bounds
    the in-memory registry of recently compressed chunks (an LRU). Thread-safe.
    """

    def __init__(self, compressor: SemiDynamicCompressor, store: LatentStore | None = None,
                 *, max_registered: int = 4096, batch_size: int = 16):
        self.compressor = compressor
        self.store = store
        self.batch_size = batch_size
        self.max_registered = max_registered
        self._features: OrderedDict[str, ContextFeatures] = OrderedDict()
        self._latents: OrderedDict[str, tuple[str, CompressedContext]] = OrderedDict()  # text -> (key, ctx)
        self._lock = threading.RLock()
        self.encoder_calls = 0

    # -- compression ----------------------------------------------------------------------------

    def compress_chunks(self, texts: Sequence[str], *, scale: float = 0.0, max_latents: int | None = None,
                        min_tokens: int = 0) -> list[ChunkCompression]:
        """Compress each chunk separately and register it for ``answer``.

        Features come from memory, then the store, then the encoder (misses in one batch,
        written back). Chunks under ``min_tokens`` stay text. With ``max_latents``, the scale is
        raised in steps of 0.5 until the chunks fit; if even the coarsest factor does not fit,
        the trailing chunks (lowest ranked) stay text.
        """
        with self._lock:
            enc = self.compressor.encoder
            counts = [len(ids) for ids in enc.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
            results: list[ChunkCompression | None] = [None] * len(texts)
            todo = []
            for i, (t, n) in enumerate(zip(texts, counts)):
                reason = ("empty" if not t.strip() else f"under {min_tokens} tokens" if n < min_tokens
                          else f"over the encoder limit of {enc.max_tokens} tokens"
                          if n > enc.max_tokens and enc.on_overflow == "error" else None)
                if reason:
                    results[i] = ChunkCompression(chunk_key(t), n, False, reason=reason)
                else:
                    todo.append(i)
            feats, hits = self._features_for([texts[i] for i in todo])
            ctx = self._fit_budget(feats, scale, max_latents)
            for j, i in enumerate(todo):
                key = chunk_key(texts[i])
                if ctx[j] is None:
                    results[i] = ChunkCompression(key, feats[j].n_tokens, False, reason="over the latent budget")
                    continue
                c = ctx[j]
                self._register(texts[i], key, c)
                results[i] = ChunkCompression(key, c.n_tokens, True, c.n_latents, c.factor, round(c.y_hat, 4), hits[j])
            return results  # type: ignore[return-value]

    def _features_for(self, texts: list[str]) -> tuple[list[ContextFeatures], list[bool]]:
        keys = [chunk_key(t) for t in texts]
        fp = self.compressor.feature_fingerprint
        known = {k: f for k in keys if (f := self._features.get(k)) is not None and f.fingerprint == fp}
        need = [t for t, k in zip(texts, keys) if k not in known]
        hits = {k: True for k in known}
        if need:
            if self.store is not None:
                res = self.store.fetch_or_encode(self.compressor, need, batch_size=self.batch_size)
                got = dict(zip(res.keys, res.features))
                hits.update({k: k not in res.encoded_keys for k in got})
                self.encoder_calls += bool(res.encoded)
            else:
                norm = [normalize_text(t) for t in need]
                got = dict(zip([chunk_key(t) for t in norm], self.compressor.encode(norm, self.batch_size)))
                hits.update({k: False for k in got})
                self.encoder_calls += 1
            for k, f in got.items():
                self._features[k] = f
            known.update(got)
        for k in keys:
            self._features.move_to_end(k)
        while len(self._features) > self.max_registered:
            self._features.popitem(last=False)
        return [known[k] for k in keys], [hits.get(k, False) for k in keys]

    def _fit_budget(self, feats: list[ContextFeatures], scale: float,
                    max_latents: int | None) -> list[CompressedContext | None]:
        comp = self.compressor
        if not feats:
            return []
        ctx = comp.compress_features(feats, scale=scale)
        if max_latents is None:
            return list(ctx)
        s = scale
        top = max(comp.config.candidates)
        while sum(c.n_latents for c in ctx) > max_latents and any(
                (c.factor or 0) < top if comp.config.backbone == "mean_pool" else c.n_latents > min(comp.config.lengths)
                for c in ctx):
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

    def _register(self, text: str, key: str, ctx: CompressedContext) -> None:
        self._latents[text] = (key, ctx)
        self._latents.move_to_end(text)
        while len(self._latents) > self.max_registered:
            self._latents.popitem(last=False)

    # -- answering ------------------------------------------------------------------------------

    def splice(self, prompt: str) -> tuple[str, list[CompressedContext], PromptUsage]:
        """Replace registered chunk texts in ``prompt`` by placeholders; return the contexts in order."""
        with self._lock:
            found = []
            for text, (key, ctx) in self._latents.items():
                start = prompt.find(text)
                if start >= 0:
                    found.append((start, start + len(text), text, key, ctx))
            found.sort()
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
        contexts = [k[4] for k in kept]
        tok = dec.tokenizer
        n_text = len(tok(dec.apply_chat(spliced), add_special_tokens=False)["input_ids"]) - len(contexts)
        n_plain = len(tok(dec.apply_chat(prompt), add_special_tokens=False)["input_ids"])
        usage = PromptUsage(n_text, sum(c.n_latents for c in contexts), n_plain,
                            [{"key": k[3], "n_tokens": k[4].n_tokens, "n_latents": k[4].n_latents,
                              "factor": k[4].factor} for k in kept])
        return spliced, contexts, usage

    def answer(self, prompt: str, max_new_tokens: int = 128, **generate_kwargs) -> tuple[str, PromptUsage]:
        """Answer a text prompt, reading every registered chunk in it as latents."""
        spliced, contexts, usage = self.splice(prompt)
        with self._lock:
            text = self.compressor.generate(spliced, contexts, max_new_tokens=max_new_tokens, **generate_kwargs)
        return text, usage

    def stream(self, prompt: str, max_new_tokens: int = 128, **generate_kwargs) -> tuple[Iterator[str], PromptUsage]:
        """Like ``answer`` but yields text pieces as they are decoded (generation runs in a thread)."""
        from transformers import TextIteratorStreamer

        spliced, contexts, usage = self.splice(prompt)
        streamer = TextIteratorStreamer(self.compressor.decoder.tokenizer, skip_prompt=False,
                                        skip_special_tokens=True)
        errors: list[BaseException] = []

        def run():
            try:
                with self._lock:
                    self.compressor.generate(spliced, contexts, max_new_tokens=max_new_tokens,
                                             streamer=streamer, **generate_kwargs)
            except BaseException as e:  # surfaced to the consumer below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def pieces() -> Iterator[str]:
            for piece in streamer:
                if piece:
                    yield piece
            thread.join()
            if errors:
                raise errors[0]

        return pieces(), usage


def open_session(*, compressor: SemiDynamicCompressor | None = None, compressor_path: str | None = None,
                 store_path: str | None = None, device: str | None = None, **kwargs) -> CompressionSession:
    """A session from a compressor (object or checkpoint path) and an optional store.

    ``store_path`` is a latent store file, or a corpus directory made by ``precompress`` (its
    store is used, and its recorded compressor when none is given).
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
        store = LatentStore(p)
    if compressor is None:
        if compressor_path is None:
            raise ValueError("give a compressor, a compressor_path, or a corpus directory that records one")
        overrides = {"device": device} if device else {}
        compressor = SemiDynamicCompressor.from_pretrained(compressor_path, **overrides)
    return CompressionSession(compressor, store, **kwargs)
