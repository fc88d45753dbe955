from llama_index.retrievers.semidyn_rag.base import SemiDynamicCorpusRetriever

__all__ = ["SemiDynamicCorpusRetriever"]
