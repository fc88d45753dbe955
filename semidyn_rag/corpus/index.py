"""The FAISS index over chunk embeddings: inner product on unit vectors (cosine similarity).

``flat`` (IndexFlatIP, exact) is the default; ``ivf`` (IndexIVFFlat, trained on the corpus
vectors) and ``hnsw`` (IndexHNSWFlat) trade a little recall for speed on large corpora. Row ids
are chunk ids: the i-th vector added is chunk i. Written atomically; ``index_problem`` says
whether a file on disk still fits its chunk table (readable, one vector per chunk, the
embedder's dimension), so a resumed build can rebuild a damaged one instead of trusting it.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..atomic import atomic_path

INDEX_KINDS = ("flat", "ivf", "hnsw")


class IndexParams(BaseModel):
    """How an index is built and searched (saved in the corpus manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int | None = Field(None, ge=1, description="ivf cells; None = about sqrt(n), >= 39 vectors each")
    nprobe: int = Field(8, ge=1, description="ivf cells visited per query")
    hnsw_m: int = Field(32, ge=2, description="hnsw neighbours per node")
    ef_construction: int = Field(80, ge=1)
    ef_search: int = Field(64, ge=1)


def build_index(vectors: np.ndarray, params: IndexParams | None = None):
    """A FAISS index holding ``vectors`` (n x d, float32, unit rows) under ids 0..n-1."""
    import faiss

    params = params or IndexParams()
    if params.kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {params.kind!r}; use one of {', '.join(INDEX_KINDS)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if params.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    else:
        nlist = params.nlist or max(1, min(int(math.sqrt(n)), n // 39))
        if n < nlist:
            raise ValueError(f"an ivf index with {nlist} cells needs at least {nlist} chunks, got {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(params.nprobe, nlist)
    if n:
        index.add(vectors)
    return index


def save_index(index, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` atomically."""
    import faiss

    with atomic_path(path) as tmp:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as e:  # FAISS reports a failed write (e.g. a full disk) as RuntimeError
            raise OSError(f"cannot write {path}: {faiss_reason(e)}; nothing was replaced (is the disk full?)") from e


def load_index(path: str | os.PathLike, params: IndexParams | None = None):
    """Read an index (search-time parameters re-applied from ``params``)."""
    import faiss

    index = faiss.read_index(str(path))
    if params is not None:
        if params.kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(params.nprobe, ivf.nlist)
        elif params.kind == "hnsw":
            index.hnsw.efSearch = params.ef_search
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries x k'); k' = min(k, index size); missing hits are dropped by callers (id -1)."""
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def faiss_reason(e: RuntimeError) -> str:
    """The useful part of a FAISS error (its messages start with a C++ signature and a file:line)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.rsplit("Error: ", 1)[-1].strip() if "Error: " in text else text


def index_mismatch(index, n_vectors: int, dim: int) -> str | None:
    """Why ``index`` does not fit a chunk table of ``n_vectors`` ``dim``-d embeddings, or None."""
    if index.ntotal != n_vectors:
        return f"holds {index.ntotal} vectors but the corpus has {n_vectors} chunks"
    if index.d != dim:
        return f"holds {index.d}-d vectors but the embedder gives {dim}-d ones"
    return None


def index_problem(path: str | os.PathLike, n_vectors: int, dim: int) -> str | None:
    """Why the index file at ``path`` must be rebuilt (missing, unreadable, not fitting), or None."""
    if not os.path.isfile(path):
        return "is missing"
    try:
        index = load_index(path)
    except RuntimeError as e:
        return f"cannot be read ({faiss_reason(e)})"
    return index_mismatch(index, n_vectors, dim)
