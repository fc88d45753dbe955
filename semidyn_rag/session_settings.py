"""The settings every framework's compress step exposes, declared once.

LangChain's document compressor and LlamaIndex's node postprocessor are pydantic models of
their frameworks; both mix this model in, so the fields, their defaults and descriptions, and the
way a session is opened from them cannot drift apart between the two packages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field, PrivateAttr


class SessionSettings(BaseModel):
    """Scale, budget and where the compressor and its store come from; opens the session.

    Pass a ``session`` (to share it with the framework's LLM), or let one be opened from
    ``compressor`` / ``compressor_path`` and an optional ``store_path`` (a latent store file or a
    corpus directory, whose recorded compressor is used when none is given).
    """

    scale: Optional[float] = Field(default=None, description="Shift of every chunk's log2 factor: <0 fidelity, "
                                   ">0 efficiency; None = the scale the store_path corpus directory recorded "
                                   "(`precompress --scale` or `--target-ratio`), else 0.")
    max_latents: Optional[int] = Field(default=None, description="Budget on total latent slots per query.")
    min_chunk_tokens: int = Field(default=8, description="Chunks (documents, nodes) shorter than this stay text.")
    compressor_path: Optional[str] = Field(default=None, description="Checkpoint folder or hub id.")
    store_path: Optional[str] = Field(default=None, description="Latent store file or corpus directory.")
    device: Optional[str] = Field(default=None, description="Device for the compressor (None: auto).")

    _session: Any = PrivateAttr(default=None)

    def __init__(self, session: Any = None, compressor: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.scale is None:
            self.scale = recorded_scale(self.store_path)
        if session is None:
            from .session import open_session

            session = open_session(compressor=compressor, compressor_path=self.compressor_path,
                                   store_path=self.store_path, device=self.device)
        self._session = session

    @property
    def session(self):
        """The ``CompressionSession`` to hand to the framework's LLM."""
        return self._session

    def compress_texts(self, texts: list[str]) -> list:
        """``CompressionSession.compress_chunks`` with these settings, one result per text."""
        return self._session.compress_chunks(texts, scale=self.scale, max_latents=self.max_latents,
                                             min_tokens=self.min_chunk_tokens)


def recorded_scale(store_path: Optional[str]) -> float:
    """The default scale a corpus directory recorded at ``precompress``; 0 for a store file or none."""
    if store_path is None or not Path(store_path).is_dir():
        return 0.0
    from .corpus.directory import MANIFEST_FILE, read_manifest

    p = Path(store_path)
    return read_manifest(p).scale if (p / MANIFEST_FILE).is_file() else 0.0
