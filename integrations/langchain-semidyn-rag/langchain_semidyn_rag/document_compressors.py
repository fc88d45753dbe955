"""Document compressor: compress each retrieved document into latents, keep the document intact.

All logic lives in ``semidyn_rag.session.CompressionSession``; this class only adapts LangChain
``Document``s to it. Each document comes back as a copy with the same text, id and metadata plus
``semidyn_*`` metadata (cache key, tokens, latents, factor, cache hit, or why it stayed text),
all plain JSON values: no tensor ever enters a document. The latents are registered in the
session under the document's text, where ``ChatSemiDynamic`` finds them.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.runnables.config import run_in_executor

from semidyn_rag.session_settings import SessionSettings


class SemiDynamicDocumentCompressor(SessionSettings, BaseDocumentCompressor):
    """Compress retrieved documents with a semi-dynamic soft compressor (one document, one context).

    Its settings and the session it opens are ``semidyn_rag.session_settings.SessionSettings``'s:
    pass a ``session`` (then share it with ``ChatSemiDynamic``), or build one from ``compressor`` /
    ``compressor_path`` and an optional ``store_path`` (a latent store file or a corpus directory).

    Example:
        ```python
        compressor = SemiDynamicDocumentCompressor(store_path="corpus/", min_chunk_tokens=8)
        llm = ChatSemiDynamic(session=compressor.session)
        docs = compressor.compress_documents(retriever.invoke(question), question)
        ```
    """

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Copies of ``documents`` (same order, text, id, metadata) with ``semidyn_*`` metadata added.

        ``query`` is not used: each document is compressed on its own, so its latents can be
        cached and reused for any query. Raises what the compressor raises (e.g. a document over
        the encoder limit when the compressor's ``on_overflow`` is not ``error``).
        """
        if not documents:
            return []
        results = self.compress_texts([d.page_content for d in documents])
        # model_copy: the caller's documents (a vector store's, say) are never modified
        return [d.model_copy(update={"metadata": {**d.metadata, **r.to_metadata()}})
                for d, r in zip(documents, results)]

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """``compress_documents`` in a worker thread, so the encoder never blocks the event loop."""
        return await run_in_executor(None, self.compress_documents, documents, query, callbacks)
