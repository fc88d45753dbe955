from llama_index.postprocessor.semidyn_rag.base import SemiDynamicCompressPostprocessor

__all__ = ["SemiDynamicCompressPostprocessor"]
