"""Building a corpus directory: load, chunk, dedup, embed and index, then encode into the store.

Every step is restartable. The chunk table, index and manifest are written atomically and
only when their inputs changed (digests in the manifest); the store step encodes only chunks
without a valid entry for this compressor (missing or failing their checksum) and commits
after every batch, so a run killed at any point (``kill -9`` included) resumes where it
stopped and ends with the same directory as an uninterrupted run.

The store step is pluggable (``engine``): ``encode_locally`` runs the compressor in this
process; ``semidyn_rag.distributed.RayEngine`` runs it on a Ray cluster.

A rerun also repairs damage rather than trusting file names: an index that cannot be read or
does not fit the chunk table is rebuilt, and a damaged store file is moved aside
(``latents.sqlite.corrupt-<time>``) and refilled from the chunk table. A full disk stops the
run with ``DiskFullError`` saying how many chunks were saved; the rerun resumes from there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from ..atomic import DiskFullError, atomic_path, atomic_write_text, remove_stale_temporaries
from ..pipeline.target_ratio import check_target, fit_scale, latent_counts
from ..store import CorruptStoreError, LatentStore, set_aside
from .chunking import Chunk, Chunker, tokenizer_counter
from .directory import (
    CHUNKS_FILE,
    DIGEST_KEY,
    INDEX_FILE,
    MANIFEST_FILE,
    STATS_FILE,
    STORE_FILE,
    CompressorRecord,
    CorpusError,
    CorpusManifest,
    read_manifest,
)
from .documents import LoadReport, load_documents
from .embedding import DEFAULT_EMBEDDER, Embedder
from .index import IndexParams, build_index, index_problem, save_index

logger = logging.getLogger(__name__)


@dataclass
class PrecompressStats:
    """What a precompress run produced (printed, and saved as ``stats.json``)."""

    documents: int
    chunks: int
    duplicate_chunks: int
    tokens: int
    scale: float
    latents: int
    average_factor: float  # mean over chunks of the chosen factor (tokens per latent)
    overall_ratio: float  # tokens / latents
    histogram_of: str  # "factor" (mean pooling) or "latents" (token backbones)
    histogram: dict[str, int]
    encoded: int  # chunks encoded by this run
    reused: int  # chunks already in the store
    recomputed_corrupt: int
    skipped: int
    skipped_by_reason: dict[str, int]
    skipped_inputs: list[str]  # the first messages, one per skipped input
    bytes_on_disk: dict[str, int]
    store_payload_bytes: int
    bytes_per_chunk: float
    encode_seconds: float
    chunks_per_second: float
    seconds: float
    index: str
    embedder: str
    compressor: dict = field(default_factory=dict)
    fitted_to: dict | None = None  # {"ratio", "average"} when the scale was fitted to a target ratio

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """Human-readable lines."""
        mb = self.bytes_on_disk.get("total", 0) / 1e6
        hist = "  ".join(f"{k}: {v}" for k, v in self.histogram.items()) or "-"
        lines = [
            f"documents  {self.documents}  (skipped {self.skipped}"
            + (f": {', '.join(f'{r} {n}' for r, n in self.skipped_by_reason.items())}" if self.skipped else "") + ")",
            f"chunks     {self.chunks}  (+{self.duplicate_chunks} duplicates stored once)",
            f"tokens     {self.tokens}",
            f"latents    {self.latents} at scale {self.scale:g}"
            + (f" (fitted to a {self.fitted_to['average']} ratio of {self.fitted_to['ratio']:g})" if self.fitted_to else "")
            + f"  (average factor {self.average_factor:.2f}, "
            f"overall {self.overall_ratio:.2f}x)",
            f"{self.histogram_of + 's':<10} {hist}",
            f"encoded    {self.encoded} this run, {self.reused} reused"
            + (f", {self.recomputed_corrupt} corrupt entries recomputed" if self.recomputed_corrupt else "")
            + (f"  ({self.chunks_per_second:.1f} chunks/s)" if self.encoded else ""),
            f"on disk    {mb:.2f} MB  (" + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in self.bytes_on_disk.items()
                                                  if k != "total") + f"; {self.bytes_per_chunk / 1e3:.1f} kB/chunk)",
        ]
        lines += [f"  {m}" for m in self.skipped_inputs]
        return "\n".join(lines)


def collect_chunks(corpus: str | os.PathLike, chunker: Chunker, report: LoadReport,
                   text_field: str = "text") -> tuple[list[Chunk], Counter, dict[str, dict]]:
    """Unique chunks of the corpus (first occurrence kept), how often each key occurred, and
    the metadata of every document by id."""
    metadata: dict[str, dict] = {}

    def remember(docs):
        for d in docs:
            metadata[d.doc_id] = d.metadata
            yield d

    unique: dict[str, Chunk] = {}
    copies: Counter = Counter()
    for chunk in chunker.chunk(remember(load_documents(corpus, report, text_field=text_field))):
        copies[chunk.key] += 1
        unique.setdefault(chunk.key, chunk)
    return list(unique.values()), copies, metadata


def chunk_table(chunks: list[Chunk], copies: Counter, metadata: dict[str, dict]):
    """The chunk table (pyarrow) with its digest in the schema metadata; returns (table, digest)."""
    import pyarrow as pa

    meta = [json.dumps(metadata.get(c.doc_id, {}), sort_keys=True, ensure_ascii=False) for c in chunks]
    cols = {
        "chunk_id": pa.array(range(len(chunks)), pa.int64()),
        "key": pa.array([c.key for c in chunks], pa.string()),
        "doc_id": pa.array([c.doc_id for c in chunks], pa.string()),
        "position": pa.array([c.position for c in chunks], pa.int32()),
        "n_tokens": pa.array([c.n_tokens for c in chunks], pa.int32()),
        "copies": pa.array([copies[c.key] for c in chunks], pa.int32()),
        "text": pa.array([c.text for c in chunks], pa.string()),
        "metadata": pa.array(meta, pa.string()),
    }
    h = hashlib.sha256()
    for c, m in zip(chunks, meta):
        h.update(json.dumps([c.key, c.doc_id, c.position, c.n_tokens, copies[c.key], m]).encode())
        h.update(b"\n")
    digest = h.hexdigest()
    table = pa.table(cols).replace_schema_metadata({DIGEST_KEY: digest.encode()})
    return table, digest


def texts_digest(chunks: list[Chunk]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.key.encode())
    return h.hexdigest()


class EncodeEngine(Protocol):
    """Step 3 of ``precompress``: encode ``chunks`` (sorted by length) into ``store``.

    Called with the chunks that have no valid entry under ``compressor.feature_fingerprint``;
    calls ``advance(n)`` as chunks land in the store and returns how many it encoded (chunks it
    found elsewhere, e.g. in finished shards of an earlier run, count as reused, not encoded).
    """

    def __call__(self, chunks: list[Chunk], store: LatentStore, compressor, *, batch_size: int,
                 advance: Callable[[int], None]) -> int: ...


def encode_locally(chunks: list[Chunk], store: LatentStore, compressor, *, batch_size: int,
                   advance: Callable[[int], None]) -> int:
    """The default engine: encode in this process, one store transaction per batch."""
    for s in range(0, len(chunks), batch_size):
        batch = chunks[s : s + batch_size]
        feats = compressor.encode([c.text for c in batch], batch_size=batch_size)
        store.put_many(zip((c.key for c in batch), feats))
        advance(len(batch))
    return len(chunks)


def open_store_to_fill(path: Path, dtype: str, keys: list[str], fingerprint: str
                       ) -> tuple[LatentStore, set[str], int, Path | None]:
    """(store, keys without a valid entry, how many of those had a corrupt one, where a damaged
    file was moved) for a build.

    A store file that is damaged (SQLite cannot read it, or its quick_check fails) is moved
    aside to ``<name>.corrupt-<time>`` and a new one is started: the chunk table has the texts.
    """
    try:
        return (*_scan_store(path, dtype, keys, fingerprint), None)
    except CorruptStoreError as e:
        aside = set_aside(path)
        logger.warning("%s is damaged (%s): moved it to %s; rebuilding the store from the chunk table",
                       path, e.detail, aside.name)
    return (*_scan_store(path, dtype, keys, fingerprint), aside)


def _scan_store(path: Path, dtype: str, keys: list[str], fingerprint: str) -> tuple[LatentStore, set[str], int]:
    store = LatentStore(path, dtype=dtype)
    try:
        store.check_integrity()
        present = set(keys) - set(store.missing(keys, fingerprint))
        todo = set(store.missing(keys, fingerprint, verify=True))
    except BaseException:
        store.close()
        raise
    corrupt = len(todo & present)
    if corrupt:
        logger.warning("%d corrupt store entries will be recomputed", corrupt)
    return store, todo, corrupt


def fill_store(engine: EncodeEngine, pending: list[Chunk], store: LatentStore, compressor, *, batch_size: int,
               advance: Callable[[int], None], total: int) -> int:
    """Run ``engine`` over ``pending``; returns how many chunks it encoded.

    A full disk raises DiskFullError saying how many chunks this run saved (each saved batch
    is committed) and that rerunning the same command resumes from there.
    """
    if not pending:
        return 0
    saved = 0

    def count(n: int) -> None:
        nonlocal saved
        saved += n
        advance(n)

    try:
        return engine(pending, store, compressor, batch_size=batch_size, advance=count)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        have = total - len(pending) + saved
        size = sum(_size(Path(f"{store.path}{x}")) for x in ("", "-wal", "-shm"))
        raise DiskFullError(f"no space left on the device writing {store.path}: this run saved {saved} of "
                            f"{len(pending)} chunks to encode ({have} of {total} are in the store, "
                            f"{size / 1e6:.1f} MB); free some space and rerun the same command to resume",
                            store.path) from e


def precompress(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    compressor,
    *,
    compressor_path: str | None = None,
    scale: float | None = None,
    target_ratio: float | None = None,
    ratio_average: str = "mean",
    batch_size: int = 16,
    chunk_tokens: int = 256,
    overlap: int = 0,
    index: IndexParams | None = None,
    embedder: Embedder | str = DEFAULT_EMBEDDER,
    store_dtype: str = "float16",
    text_field: str = "text",
    progress: bool = True,
    engine: EncodeEngine = encode_locally,
) -> PrecompressStats:
    """Build (or complete) the corpus directory ``out`` from the documents at ``corpus``.

    ``engine`` encodes the chunks missing from the store (default: in this process).
    ``scale`` is the default recorded for queries (0 when not given); ``target_ratio`` instead
    fits it, after encoding, so that the chunks' ``ratio_average`` ratio is at least that
    (``pipeline.target_ratio``).
    Returns the run's statistics (also written to ``out/stats.json``). Raises CorpusError when
    the corpus yields no chunk, ValueError for a chunk budget the encoder cannot read.
    """
    from tqdm.auto import tqdm

    from ..pipeline.selector import check_scale

    t_start = time.perf_counter()
    if scale is not None and target_ratio is not None:
        raise ValueError("give a scale or a target ratio, not both")
    scale = check_scale(0.0 if scale is None else scale)
    if target_ratio is not None:
        check_target(compressor, target_ratio, ratio_average)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out} is a file, not a corpus directory; choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    index = index or IndexParams()
    embedder = Embedder(embedder) if isinstance(embedder, str) else embedder
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    limit = compressor.encoder.max_tokens
    if chunk_tokens > limit:
        raise ValueError(f"--chunk-tokens {chunk_tokens} is over the encoder's limit of {limit} tokens")

    # 1. documents -> unique chunks -> chunk table
    report = LoadReport()
    chunker = Chunker(tokenizer_counter(compressor.encoder.tokenizer), chunk_tokens, overlap)
    chunks, copies, metadata = collect_chunks(corpus, chunker, report, text_field)
    if not chunks:
        msgs = "; ".join(s.message() for s in report.skipped[:5])
        raise CorpusError(f"{corpus} yielded no text to index ({report.documents} documents, "
                          f"{len(report.skipped)} skipped{': ' + msgs if msgs else ''})")
    table, digest = chunk_table(chunks, copies, metadata)
    tdigest = texts_digest(chunks)
    try:
        old = read_manifest(out)
    except CorpusError:
        old = None
    if old is None or old.chunks_digest != digest or not (out / CHUNKS_FILE).is_file():
        import pyarrow.parquet as pq

        with atomic_path(out / CHUNKS_FILE) as tmp:
            pq.write_table(table, tmp)

    # 2. embeddings -> FAISS index (only when the texts, embedder or index settings changed)
    index_ok = (old is not None and old.texts_digest == tdigest and old.embedder == embedder.name
                and old.index == index)
    if index_ok:
        problem = index_problem(out / INDEX_FILE, len(chunks), old.embedding_dim)
        if problem:
            logger.warning("%s %s: rebuilding it", out / INDEX_FILE, problem)
            index_ok = False
    if index_ok:
        dim = old.embedding_dim
    else:
        logger.info("embedding %d chunks with %s", len(chunks), embedder.name)
        vecs = embedder.embed([c.text for c in chunks], progress=progress)
        dim = int(vecs.shape[1])
        save_index(build_index(vecs, index), out / INDEX_FILE)
    record = CompressorRecord(path=str(Path(compressor_path).resolve()) if compressor_path else None,
                              fingerprint=compressor.fingerprint,
                              feature_fingerprint=compressor.feature_fingerprint)
    manifest = CorpusManifest(embedder=embedder.name, embedding_dim=dim, index=index, chunk_tokens=chunk_tokens,
                              overlap=overlap, documents=report.documents, chunks=len(chunks),
                              chunks_digest=digest, texts_digest=tdigest, store_dtype=store_dtype, scale=scale,
                              compressor=record)
    atomic_write_text(out / MANIFEST_FILE, manifest.model_dump_json(indent=2))

    # 3. encoder features -> latent store (only what is missing or corrupt; commit per batch)
    fp = compressor.feature_fingerprint
    keys = [c.key for c in chunks]
    store, todo, corrupt, _ = open_store_to_fill(out / STORE_FILE, store_dtype, keys, fp)
    with store:
        pending = sorted((c for c in chunks if c.key in todo), key=lambda c: (c.n_tokens, c.key))
        t_enc = time.perf_counter()
        bar = tqdm(total=len(chunks), initial=len(chunks) - len(pending), unit="chunk", desc="compressing",
                   dynamic_ncols=True, disable=not progress, smoothing=0.1)
        try:
            n_encoded = fill_store(engine, pending, store, compressor, batch_size=batch_size, advance=bar.update,
                                   total=len(chunks))
        finally:
            bar.close()
        enc_seconds = time.perf_counter() - t_enc
        summaries = store.summaries(keys, fp)
        payload = store.stats()
    missing = [k for k in keys if k not in summaries]
    if missing:  # another process deleted entries under us; say so rather than report wrong stats
        raise CorpusError(f"{len(missing)} chunks are missing from the store after encoding; rerun precompress")

    # 4. statistics
    y = [summaries[k][0] for k in keys]
    n = [summaries[k][1] for k in keys]
    fitted_to = None
    if target_ratio is not None:
        scale = fit_scale(compressor, y, n, target_ratio, average=ratio_average).scale
        fitted_to = {"ratio": float(target_ratio), "average": ratio_average}
        atomic_write_text(out / MANIFEST_FILE, manifest.model_copy(update={"scale": scale}).model_dump_json(indent=2))
    choice, lat = latent_counts(compressor, y, n, scale)
    total_tokens, total_latents = sum(n), sum(lat)
    mean_pool = compressor.pooling.takes == "factor"
    per_chunk = [t / m for t, m in zip(n, lat)]
    sizes = {"chunks": _size(out / CHUNKS_FILE), "index": _size(out / INDEX_FILE),
             "store": sum(_size(Path(f"{out / STORE_FILE}{x}")) for x in ("", "-wal", "-shm"))}
    sizes["total"] = sum(sizes.values())
    stats = PrecompressStats(
        documents=report.documents, chunks=len(chunks), duplicate_chunks=sum(copies.values()) - len(chunks),
        tokens=total_tokens, scale=scale, latents=total_latents,
        average_factor=(sum(choice) / len(choice)) if mean_pool else sum(per_chunk) / len(per_chunk),
        overall_ratio=total_tokens / total_latents, histogram_of="factor" if mean_pool else "latents",
        histogram={str(k): v for k, v in sorted(Counter(choice).items())},
        encoded=n_encoded, reused=len(chunks) - n_encoded, recomputed_corrupt=corrupt,
        skipped=len(report.skipped), skipped_by_reason=report.by_reason,
        skipped_inputs=[s.message() for s in report.skipped[:50]],
        bytes_on_disk=sizes, store_payload_bytes=payload.payload_bytes,
        bytes_per_chunk=sizes["store"] / len(chunks),
        encode_seconds=round(enc_seconds, 3),
        chunks_per_second=round(n_encoded / enc_seconds, 2) if n_encoded and enc_seconds > 0 else 0.0,
        seconds=round(time.perf_counter() - t_start, 3), index=index.kind, embedder=embedder.name,
        compressor=record.model_dump(), fitted_to=fitted_to,
    )
    atomic_write_text(out / STATS_FILE, json.dumps(stats.to_dict(), indent=2))
    return stats


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0
