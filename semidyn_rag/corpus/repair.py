"""Repairing a corpus directory in place: rebuild a damaged index or store from the chunk table.

The chunk table holds every chunk's text, so the FAISS index (embeddings) and the latent store
(encoder features) can both be rebuilt from it without the original documents. ``repair``
checks each part and rebuilds only what is damaged: an index that cannot be read or does not
fit the table is re-embedded; a store file SQLite cannot read is moved aside to
``latents.sqlite.corrupt-<time>`` (kept for inspection) and refilled; missing or corrupt
entries of an intact store are re-encoded. A damaged manifest or chunk table cannot be rebuilt
from inside the directory: the error says to rerun precompress on the documents.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import remove_stale_temporaries
from .build import EncodeEngine, encode_locally, fill_store, open_store_to_fill
from .chunking import Chunk
from .directory import INDEX_FILE, STORE_FILE, CorpusError, read_chunk_table, read_manifest
from .embedding import Embedder
from .index import build_index, index_problem, save_index

logger = logging.getLogger(__name__)


@dataclass
class RepairReport:
    """What ``repair`` found and did."""

    path: str
    chunks: int
    index_problem: str | None  # why the index was rebuilt, or None when it was fine
    store_moved_to: str | None  # where a damaged store file was moved, or None
    encoded: int  # chunks encoded into the store
    corrupt_entries: int  # entries that failed their checksum (re-encoded)

    @property
    def repaired(self) -> bool:
        return bool(self.index_problem or self.store_moved_to or self.encoded)

    def to_dict(self) -> dict:
        return {**asdict(self), "repaired": self.repaired}

    def summary(self) -> str:
        """Lines for a terminal."""
        index = f"rebuilt (it {self.index_problem})" if self.index_problem else "ok"
        if self.store_moved_to:
            store = f"damaged: moved to {self.store_moved_to}; rebuilt with {self.encoded} chunks"
        elif self.encoded:
            store = (f"{self.encoded} chunks encoded"
                     + (f" ({self.corrupt_entries} corrupt entries replaced)" if self.corrupt_entries else ""))
        else:
            store = "ok"
        verdict = "repaired" if self.repaired else "nothing to repair"
        return "\n".join([f"{self.path}: {verdict} ({self.chunks} chunks)", f"index      {index}",
                          f"store      {store}"])


def repair_directory(
    path: str | os.PathLike,
    load_compressor: Callable[[], object],
    *,
    embedder: Embedder | str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    engine: EncodeEngine = encode_locally,
) -> RepairReport:
    """Check the corpus directory at ``path`` and rebuild its damaged parts from the chunk table.

    ``load_compressor`` is called only when chunks must be encoded; the compressor must be the
    one the directory was built with (same feature fingerprint). Raises CorpusError when the
    manifest or chunk table is damaged (rerun precompress) or the compressor does not match.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    manifest = read_manifest(path)
    remove_stale_temporaries(path)
    table = read_chunk_table(path, manifest)
    cols = table.select(["key", "text", "n_tokens", "doc_id", "position"]).to_pydict()
    chunks = [Chunk(t, n, d, p, k) for k, t, n, d, p in
              zip(cols["key"], cols["text"], cols["n_tokens"], cols["doc_id"], cols["position"])]

    problem = index_problem(path / INDEX_FILE, len(chunks), manifest.embedding_dim)
    if problem:
        logger.warning("%s %s: rebuilding it from the chunk table", path / INDEX_FILE, problem)
        emb = Embedder(embedder or manifest.embedder) if not isinstance(embedder, Embedder) else embedder
        vecs = emb.embed([c.text for c in chunks], progress=progress)
        if vecs.shape[1] != manifest.embedding_dim:
            raise CorpusError(f"{emb.name} gives {vecs.shape[1]}-d vectors but {path} was built with "
                              f"{manifest.embedder} ({manifest.embedding_dim}-d); pass that embedder")
        save_index(build_index(vecs, manifest.index), path / INDEX_FILE)

    record = manifest.compressor
    if record is None:
        raise CorpusError(f"{path} records no compressor, so its store cannot be checked; rerun precompress")
    fp = record.feature_fingerprint
    store, todo, corrupt, aside = open_store_to_fill(path / STORE_FILE, manifest.store_dtype,
                                                     [c.key for c in chunks], fp)
    with store:
        pending = sorted((c for c in chunks if c.key in todo), key=lambda c: (c.n_tokens, c.key))
        encoded = 0
        if pending:
            compressor = load_compressor()
            if compressor.feature_fingerprint != fp:
                raise CorpusError(f"this compressor's encoder ({compressor.feature_fingerprint}) is not the one "
                                  f"{path} was built with ({fp}); pass --compressor with that checkpoint, or "
                                  "rerun precompress with this one")
            bar = tqdm(total=len(chunks), initial=len(chunks) - len(pending), unit="chunk", desc="repairing",
                       dynamic_ncols=True, disable=not progress)
            try:
                encoded = fill_store(engine, pending, store, compressor, batch_size=batch_size,
                                     advance=bar.update, total=len(chunks))
            finally:
                bar.close()
    return RepairReport(str(path), len(chunks), problem, aside.name if aside else None, encoded, corrupt)
