from llama_index.llms.semidyn_rag.base import SemiDynamicLLM

__all__ = ["SemiDynamicLLM"]
