"""The corpus directory: chunk table, FAISS index and latent store side by side.

Layout::

    corpus.json      manifest: embedder, index and chunking settings, digests, the compressor
                     it was precompressed with (path + fingerprints), default scale
    chunks.parquet   one row per unique chunk: chunk_id (= FAISS id), key, doc_id, position,
                     n_tokens, copies, text, metadata (JSON)
    index.faiss      chunk embeddings (inner product on unit vectors)
    latents.sqlite   LatentStore of encoder features, keyed by chunk key + feature fingerprint
    stats.json       what the last precompress run reported

``CorpusDirectory`` opens one for reading: ``search`` retrieves chunks, ``contexts`` turns hits
into latents at any scale from the store (encoding and writing back what is missing). Damage
never ends a read with a traceback: a folder it cannot write gets a read-only store (no
write-back), a damaged store is bypassed by encoding the chunks (with a warning naming
``semidyn-rag repair``), and an unreadable index or manifest raises CorpusError saying what to run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..store import CorruptStoreError, FetchResult, LatentStore, StoreError, encode_without_store
from ..types import CompressedContext
from .embedding import Embedder
from .index import IndexParams, faiss_reason, index_mismatch, load_index
from .index import search as index_search

logger = logging.getLogger(__name__)

MANIFEST_FILE = "corpus.json"
CHUNKS_FILE = "chunks.parquet"
INDEX_FILE = "index.faiss"
STORE_FILE = "latents.sqlite"
STATS_FILE = "stats.json"
FORMAT = "semidyn-rag-corpus"
FORMAT_VERSION = 1
DIGEST_KEY = b"semidyn_rag.chunks_digest"


class CorpusError(RuntimeError):
    """A corpus directory is missing, incomplete or inconsistent."""


class CompressorRecord(BaseModel):
    """Which compressor a corpus was precompressed with."""

    model_config = ConfigDict(extra="forbid")

    path: str | None
    fingerprint: str
    feature_fingerprint: str


class CorpusManifest(BaseModel):
    """``corpus.json``: what a reader needs to use the directory consistently."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["semidyn-rag-corpus"] = FORMAT
    format_version: int = FORMAT_VERSION
    embedder: str
    embedding_dim: int
    index: IndexParams = IndexParams()
    chunk_tokens: int
    overlap: int
    documents: int
    chunks: int
    chunks_digest: str  # over every column of the chunk table
    texts_digest: str  # over the chunk keys in order (what the index depends on)
    store_dtype: str = "float16"
    scale: float = Field(0.0, allow_inf_nan=False)
    compressor: CompressorRecord | None = None


@dataclass(frozen=True)
class ChunkRecord:
    """One row of the chunk table."""

    chunk_id: int
    key: str
    doc_id: str
    position: int
    n_tokens: int
    copies: int
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SearchHit:
    """A retrieved chunk and its similarity to the query (cosine)."""

    chunk: ChunkRecord
    score: float
    rank: int


def read_manifest(path: str | os.PathLike) -> CorpusManifest:
    """The manifest of the corpus directory at ``path``; raises CorpusError if there is none."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise CorpusError(f"{path} is not a corpus directory (no {MANIFEST_FILE}); build it with "
                          "`semidyn-rag precompress CORPUS --out DIR`")
    rebuild = "rerun the precompress command that built it to rewrite it"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{file} is not valid JSON ({e}); {rebuild}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CorpusError(f"{file} is not a semidyn-rag corpus manifest")
    if not isinstance(raw.get("format_version", 0), int):
        raise CorpusError(f"{file}: format_version must be an integer, got {raw['format_version']!r}; {rebuild}")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise CorpusError(f"{path} was written by a newer semidyn-rag (format {raw['format_version']})")
    try:
        return CorpusManifest.model_validate(raw)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']} (got {err.get('input')!r})"
                        for err in e.errors()[:5])
        raise CorpusError(f"{file} has invalid fields: {bad}; {rebuild}") from None


def read_chunk_table(path: str | os.PathLike, manifest: CorpusManifest):
    """The chunk table of the directory at ``path`` (pyarrow, memory-mapped), checked against
    ``manifest``. Raises CorpusError when it cannot be read or belongs to another build."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = Path(path) / CHUNKS_FILE
    try:
        table = pq.read_table(file, memory_map=True)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{file} cannot be read ({e}); it is what the rest of the directory is rebuilt "
                          "from, so rerun precompress on the original documents") from None
    digest = (table.schema.metadata or {}).get(DIGEST_KEY, b"").decode()
    if digest != manifest.chunks_digest or table.num_rows != manifest.chunks:
        raise CorpusError(f"{file} does not match {MANIFEST_FILE} (interrupted rebuild?); rerun precompress")
    return table


class CorpusDirectory:
    """A built corpus directory, opened for retrieval and latent reads. A context manager.

    The index, chunk table and embedder are loaded on first use. Raises CorpusError when the
    directory is incomplete or its parts do not belong together (e.g. a rebuild in progress).
    ``readonly_store``: True opens the store read-only, False read-write, None (default) read-write
    when this process can write the folder, else read-only with a warning.
    """

    def __init__(self, path: str | os.PathLike, *, embedder: Embedder | None = None,
                 readonly_store: bool | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        for name in (CHUNKS_FILE, INDEX_FILE):
            if not (self.path / name).is_file():
                raise CorpusError(f"{self.path} lacks {name}; rerun precompress to complete it")
        self._embedder = embedder
        self._readonly_store = readonly_store
        self._table = None
        self._index = None
        self._store: LatentStore | None = None

    def __len__(self) -> int:
        return self.manifest.chunks

    def __enter__(self) -> CorpusDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- parts --------------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.manifest.embedder)
        return self._embedder

    @property
    def store(self) -> LatentStore:
        """The latent store. Raises CorruptStoreError when its file is damaged."""
        if self._store is None:
            file, dtype = self.path / STORE_FILE, self.manifest.store_dtype
            if self._readonly_store is None and file.exists():
                self._store = LatentStore.for_reading(file, dtype=dtype)
            else:
                self._store = LatentStore(file, dtype=dtype, readonly=bool(self._readonly_store))
        return self._store

    @property
    def table(self):
        """The chunk table as a pyarrow Table (memory-mapped)."""
        if self._table is None:
            self._table = read_chunk_table(self.path, self.manifest)
        return self._table

    @property
    def index(self):
        """The FAISS index. Raises CorpusError when it cannot be read or does not fit the chunk table."""
        if self._index is None:
            file = self.path / INDEX_FILE
            try:
                index = load_index(file, self.manifest.index)
            except RuntimeError as e:
                raise CorpusError(f"{file} cannot be read ({faiss_reason(e)}); rebuild it with "
                                  f"`semidyn-rag repair {self.path}` or by rerunning precompress") from None
            problem = index_mismatch(index, self.manifest.chunks, self.manifest.embedding_dim)
            if problem:
                raise CorpusError(f"{file} {problem}; rebuild it with `semidyn-rag repair {self.path}` "
                                  "or by rerunning precompress")
            self._index = index
        return self._index

    # -- reading ------------------------------------------------------------------------------

    def chunks(self, ids: Sequence[int]) -> list[ChunkRecord]:
        """Chunk table rows by chunk id (in the given order). Raises IndexError for unknown ids."""
        n = self.manifest.chunks
        bad = [i for i in ids if not 0 <= int(i) < n]
        if bad:
            raise IndexError(f"chunk ids {bad[:5]} are out of range (the corpus has {n} chunks)")
        rows = self.table.take([int(i) for i in ids]).to_pylist()
        return [ChunkRecord(r["chunk_id"], r["key"], r["doc_id"], r["position"], r["n_tokens"], r["copies"],
                            r["text"], json.loads(r["metadata"]) if r["metadata"] else {}) for r in rows]

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """The ``k`` chunks most similar to ``query``, best first."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if not query.strip():
            raise ValueError("the question is empty")
        if not self.manifest.chunks:
            return []
        vec = self.embedder.embed([query])
        if vec.shape[1] != self.manifest.embedding_dim:
            raise CorpusError(f"the embedder gives {vec.shape[1]}-d vectors but the index holds "
                              f"{self.manifest.embedding_dim}-d ones (built with {self.manifest.embedder})")
        scores, ids = index_search(self.index, vec, k)
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        records = self.chunks([i for i, _ in pairs])
        return [SearchHit(c, s, r) for r, (c, (_, s)) in enumerate(zip(records, pairs))]

    def features(self, chunks: Sequence[ChunkRecord | SearchHit], compressor, *, batch_size: int = 16,
                 write_back: bool = True) -> FetchResult:
        """Encoder features of ``chunks`` for ``compressor``: from the store, misses encoded.

        Misses (and corrupt entries) are encoded in one pass and written back unless
        ``write_back`` is False or the store was opened read-only. A damaged or unusable store
        is bypassed: every chunk is encoded, with a warning (naming ``semidyn-rag repair``).
        """
        texts = [(c.chunk if isinstance(c, SearchHit) else c).text for c in chunks]
        try:
            return self.store.fetch_or_encode(compressor, texts, batch_size=batch_size, write_back=write_back)
        except CorruptStoreError as e:
            logger.warning("%s is damaged (%s): encoding the %d chunks instead; run `semidyn-rag repair %s` "
                           "to rebuild it", e.path, e.detail, len(texts), self.path)
        except StoreError as e:  # e.g. no store yet in a folder this process cannot write
            logger.warning("%s: encoding the %d chunks instead", e, len(texts))
        self.close()
        return encode_without_store(compressor, texts, batch_size=batch_size)

    def contexts(self, chunks: Sequence[ChunkRecord | SearchHit], compressor, *, scale: float | None = None,
                 factor: int | None = None, length: int | None = None,
                 batch_size: int = 16) -> tuple[list[CompressedContext], FetchResult]:
        """Latents of ``chunks`` at ``scale`` (default: the corpus's) or a forced factor/length.

        Returns the contexts (in order) and the store read report (hits, encoded misses).
        """
        fetched = self.features(chunks, compressor, batch_size=batch_size)
        scale = self.manifest.scale if scale is None else scale
        ctxs = compressor.compress_features(fetched.features, scale=scale, factor=factor, length=length)
        return ctxs, fetched
