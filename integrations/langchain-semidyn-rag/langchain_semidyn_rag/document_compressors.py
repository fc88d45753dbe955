"""Document compressor: compress each retrieved document into latents, keep the document intact.

All logic lives in ``semidyn_rag.session.CompressionSession``; this class only adapts LangChain
``Document``s to it. Each document comes back as a copy with the same text, id and metadata plus
``semidyn_*`` metadata (cache key, tokens, latents, factor, cache hit, or why it stayed text),
all plain JSON values: no tensor ever enters a document. The latents are registered in the
session under the document's text, where ``ChatSemiDynamic`` finds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.runnables.config import run_in_executor
from pydantic import Field, PrivateAttr


class SemiDynamicDocumentCompressor(BaseDocumentCompressor):
    """Compress retrieved documents with a semi-dynamic soft compressor (one document, one context).

    Pass a ``session`` (then share it with ``ChatSemiDynamic``), or build one from
    ``compressor`` / ``compressor_path`` and an optional ``store_path`` (a latent store file or
    a corpus directory, whose recorded compressor is used when none is given).

    Example:
        ```python
        compressor = SemiDynamicDocumentCompressor(store_path="corpus/", min_chunk_tokens=8)
        llm = ChatSemiDynamic(session=compressor.session)
        docs = compressor.compress_documents(retriever.invoke(question), question)
        ```
    """

    scale: float = Field(default=0.0, description="Shift of every chunk's log2 factor: <0 fidelity, >0 efficiency.")
    max_latents: Optional[int] = Field(default=None, description="Budget on total latent slots per query.")
    min_chunk_tokens: int = Field(default=8, description="Documents shorter than this stay text.")
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

    @property
    def session(self):
        """The ``CompressionSession`` to hand to ``ChatSemiDynamic``."""
        return self._session

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
        results = self._session.compress_chunks(
            [d.page_content for d in documents], scale=self.scale, max_latents=self.max_latents,
            min_tokens=self.min_chunk_tokens,
        )
        # model_copy: the caller's documents (a vector store's, say) are never modified
        return [d.model_copy(update={"metadata": {**d.metadata, **r.to_metadata()}})
                for d, r in zip(documents, results)]

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """``compress_documents`` in a worker thread, so the encoder never blocks the event loop."""
        return await run_in_executor(None, self.compress_documents, documents, query, callbacks)
