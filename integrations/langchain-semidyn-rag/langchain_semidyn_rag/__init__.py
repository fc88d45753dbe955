"""LangChain integration of semidyn-rag: compress retrieved documents, let the decoder read latents.

- ``SemiDynamicDocumentCompressor``: a ``BaseDocumentCompressor`` that compresses each document
  through a ``CompressionSession`` (store first, misses in one batch) and marks it with
  ``semidyn_*`` metadata; the document's text is unchanged.
- ``ChatSemiDynamic``: a ``BaseChatModel`` whose decoder reads every compressed document found
  in the messages as latents.
- ``SemiDynamicCorpusRetriever``: a ``BaseRetriever`` over a ``semidyn-rag precompress`` corpus.
"""

from langchain_semidyn_rag.chat_models import ChatSemiDynamic
from langchain_semidyn_rag.document_compressors import SemiDynamicDocumentCompressor
from langchain_semidyn_rag.retrievers import SemiDynamicCorpusRetriever

__all__ = ["ChatSemiDynamic", "SemiDynamicCorpusRetriever", "SemiDynamicDocumentCompressor"]
