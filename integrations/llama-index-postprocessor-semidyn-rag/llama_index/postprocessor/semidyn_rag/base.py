"""Node postprocessor: compress each retrieved node into latents, keep the node itself intact.

All logic lives in ``semidyn_rag.session.CompressionSession``; this class only adapts
LlamaIndex nodes to it. Node ids, scores, text, metadata and relationships are kept; each node
is a shallow copy marked with ``semidyn_*`` metadata (cache key, tokens, latents, factor, cache
hit) that is excluded from the LLM and embedding text. No tensor ever enters a node.

With ``progressive=True`` the nodes are read coarse-to-fine within ``max_latents``
(``CompressionSession.read_progressive``): every node is scanned coarsely, the relevant ones
are re-read finely or as text, the rest stay coarse, and nodes the budget cannot hold are
left out of the result; each kept node's metadata says how it was read and why.
"""

from __future__ import annotations

import asyncio
from typing import List, Optional

from llama_index.core.bridge.pydantic import Field
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from semidyn_rag.session_settings import SessionSettings


class SemiDynamicCompressPostprocessor(SessionSettings, BaseNodePostprocessor):
    """Compress retrieved nodes with a semi-dynamic soft compressor (one node, one context).

    Its settings and the session it opens are ``semidyn_rag.session_settings.SessionSettings``'s:
    pass a ``session`` (shared with ``SemiDynamicLLM``), or build one from ``compressor`` /
    ``compressor_path`` and an optional ``store_path`` (a latent store file or corpus folder).
    """

    progressive: bool = Field(default=False, description="Coarse-to-fine reading within max_latents: scan every "
                              "node coarsely, re-read the relevant ones finely or as text, drop what does not fit.")
    signal: str = Field(default="retriever", description="Progressive: which nodes matter (retriever, attention, "
                        "likelihood).")
    max_expand: int = Field(default=2, description="Progressive: nodes re-read finer than the coarse factor, at most.")

    @classmethod
    def class_name(cls) -> str:
        return "SemiDynamicCompressPostprocessor"

    def _postprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
    ) -> List[NodeWithScore]:
        if not nodes:
            return []
        texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        if self.progressive:
            return self._progressive(nodes, texts, query_bundle)
        results = self.compress_texts(texts)
        return [_marked(item, res.to_metadata()) for item, res in zip(nodes, results)]

    def _progressive(self, nodes: List[NodeWithScore], texts: List[str],
                     query_bundle: Optional[QueryBundle]) -> List[NodeWithScore]:
        if query_bundle is None or not query_bundle.query_str.strip():
            raise ValueError("progressive mode needs the query (call it with a QueryBundle)")
        if self.max_latents is None:
            raise ValueError("progressive mode needs max_latents (the budget of the coarse-to-fine read)")
        scores = [n.score for n in nodes]
        plan = self._session.read_progressive(
            query_bundle.query_str, texts, max_latents=self.max_latents,
            scores=None if any(s is None for s in scores) else scores, signal=self.signal, max_expand=self.max_expand)
        # a dropped node, pasted as text, would break the budget
        return [_marked(item, read.to_metadata()) for item, read in zip(nodes, plan.chunks) if read.read != "dropped"]

    async def _apostprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
    ) -> List[NodeWithScore]:
        # The encoder runs in a worker thread so the event loop stays free.
        return await asyncio.to_thread(self._postprocess_nodes, nodes, query_bundle)


def _marked(item: NodeWithScore, meta: dict) -> NodeWithScore:
    """A copy of the node with ``meta`` added and hidden from the LLM and embedding text."""
    node = item.node.model_copy()  # the docstore's node is never modified
    node.metadata = {**item.node.metadata, **meta}
    node.excluded_llm_metadata_keys = _union(item.node.excluded_llm_metadata_keys, meta)
    node.excluded_embed_metadata_keys = _union(item.node.excluded_embed_metadata_keys, meta)
    return NodeWithScore(node=node, score=item.score)


def _union(existing: List[str], meta: dict) -> List[str]:
    return list(existing) + [k for k in meta if k not in existing]
