"""Node postprocessor: compress each retrieved node into latents, keep the node itself intact.

All logic lives in ``semidyn_rag.session.CompressionSession``; this class only adapts
LlamaIndex nodes to it. Node ids, scores, text, metadata and relationships are kept; each node
is a shallow copy marked with ``semidyn_*`` metadata (cache key, tokens, latents, factor, cache
hit) that is excluded from the LLM and embedding text. No tensor ever enters a node.
"""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle


class SemiDynamicCompressPostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes with a semi-dynamic soft compressor (one node, one context).

    Pass a ``session`` (shared with ``SemiDynamicLLM``), or build one from ``compressor`` /
    ``compressor_path`` and an optional ``store_path`` (a latent store file or corpus folder).
    """

    scale: float = Field(default=0.0, description="Shift of every chunk's log2 factor: <0 fidelity, >0 efficiency.")
    max_latents: Optional[int] = Field(default=None, description="Budget on total latent slots per query.")
    min_chunk_tokens: int = Field(default=8, description="Chunks shorter than this stay text.")
    compressor_path: Optional[str] = Field(default=None, description="Checkpoint folder or hub id.")
    store_path: Optional[str] = Field(default=None, description="Latent store file or corpus directory.")
    device: Optional[str] = Field(default=None, description="Device for the compressor (None: auto).")

    _session: Any = PrivateAttr(default=None)

    def __init__(self, session: Any = None, compressor: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if session is None:
            from semidyn_rag.session import open_session

            session = open_session(compressor=compressor, compressor_path=self.compressor_path,
                                   store_path=self.store_path, device=self.device)
        self._session = session

    @classmethod
    def class_name(cls) -> str:
        return "SemiDynamicCompressPostprocessor"

    @property
    def session(self):
        """The ``CompressionSession`` to hand to ``SemiDynamicLLM``."""
        return self._session

    def _postprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
    ) -> List[NodeWithScore]:
        if not nodes:
            return []
        texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        results = self._session.compress_chunks(
            texts, scale=self.scale, max_latents=self.max_latents, min_tokens=self.min_chunk_tokens
        )
        out = []
        for item, res in zip(nodes, results):
            meta = res.to_metadata()
            node = item.node.model_copy()  # the docstore's node is never modified
            node.metadata = {**item.node.metadata, **meta}
            node.excluded_llm_metadata_keys = _union(item.node.excluded_llm_metadata_keys, meta)
            node.excluded_embed_metadata_keys = _union(item.node.excluded_embed_metadata_keys, meta)
            out.append(NodeWithScore(node=node, score=item.score))
        return out

    async def _apostprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
    ) -> List[NodeWithScore]:
        # The encoder runs in a worker thread so the event loop stays free.
        return await asyncio.to_thread(self._postprocess_nodes, nodes, query_bundle)


def _union(existing: List[str], meta: dict) -> List[str]:
    return list(existing) + [k for k in meta if k not in existing]
