"""Retriever over a precompressed corpus directory (``semidyn-rag precompress``).

Thin: ``semidyn_rag.corpus.CorpusDirectory.search`` does the work. Each chunk becomes a
``Document`` whose id is the chunk key (stable across rebuilds) and whose metadata is its
document's plus ``doc_id``, ``position``, ``chunk_id`` and the similarity ``score``. Pair it with
``SemiDynamicDocumentCompressor(store_path=<same dir>)``: the chunks' features are already in
that directory's store, so nothing is encoded at query time.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables.config import run_in_executor
from pydantic import Field, field_validator


class SemiDynamicCorpusRetriever(BaseRetriever):
    """Top-``k`` chunks of a corpus directory by embedding similarity (cosine), best first.

    ``corpus`` is a path to the directory or an open ``semidyn_rag.corpus.CorpusDirectory``.
    """

    corpus: Any = Field(description="Corpus directory (path or CorpusDirectory).")
    k: int = Field(default=4, ge=1, description="Number of chunks to return.")

    @field_validator("corpus", mode="before")
    @classmethod
    def _open(cls, value: Any) -> Any:
        if isinstance(value, str) or hasattr(value, "__fspath__"):
            from semidyn_rag.corpus import CorpusDirectory

            return CorpusDirectory(value)
        return value

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        out = []
        for hit in self.corpus.search(query, k=self.k):
            c = hit.chunk
            meta = {**c.metadata, "doc_id": c.doc_id, "position": c.position, "chunk_id": c.chunk_id,
                    "score": hit.score}
            out.append(Document(id=c.key, page_content=c.text, metadata=meta))
        return out

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        # The query embedding and the index search run in a worker thread.
        return await run_in_executor(None, self._get_relevant_documents, query, run_manager=run_manager.get_sync())
