"""Retriever over a precompressed corpus directory (``semidyn-rag precompress``).

Thin: ``semidyn_rag.corpus.CorpusDirectory.search`` does the work; chunks become ``TextNode``s
whose id is the chunk key (stable across rebuilds) and whose metadata is the document's plus
its position. Pair it with ``SemiDynamicCompressPostprocessor(store_path=<same dir>)``: the
chunks' features are already in that directory's store, so nothing is encoded at query time.
"""

from __future__ import annotations

from typing import Any, List

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode


class SemiDynamicCorpusRetriever(BaseRetriever):
    """Top-k chunks of a corpus directory by embedding similarity."""

    def __init__(self, corpus: Any, similarity_top_k: int = 5, **kwargs: Any) -> None:
        if isinstance(corpus, (str, bytes)) or hasattr(corpus, "__fspath__"):
            from semidyn_rag.corpus import CorpusDirectory

            corpus = CorpusDirectory(corpus)
        self._corpus = corpus
        self.similarity_top_k = similarity_top_k
        super().__init__(**kwargs)

    @property
    def corpus(self):
        return self._corpus

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        hits = self._corpus.search(query_bundle.query_str, k=self.similarity_top_k)
        out = []
        for h in hits:
            c = h.chunk
            meta = {**c.metadata, "doc_id": c.doc_id, "position": c.position, "chunk_id": c.chunk_id}
            node = TextNode(id_=c.key, text=c.text, metadata=meta,
                            excluded_embed_metadata_keys=["doc_id", "position", "chunk_id"],
                            excluded_llm_metadata_keys=["doc_id", "position", "chunk_id"])
            out.append(NodeWithScore(node=node, score=h.score))
        return out

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        import asyncio

        return await asyncio.to_thread(self._retrieve, query_bundle)


