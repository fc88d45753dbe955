"""semidyn-rag: density-aware soft context compression with a semi-dynamic ratio, for RAG.

Retrieved chunks are encoded into a few latent vectors each (more for dense text, fewer for
redundant text) and a decoder LLM reads them in place of the text.
"""

from .checkpoint import CheckpointError
from .compressor import SemiDynamicCompressor
from .config import CompressorConfig, LoraSettings
from .encoder import ContextTooLongError
from .placeholder import PlaceholderCountError
from .selector import DiscreteRatioSelector
from .types import CompressedContext, ContextFeatures

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CompressedContext",
    "CompressorConfig",
    "ContextFeatures",
    "ContextTooLongError",
    "DiscreteRatioSelector",
    "LoraSettings",
    "PlaceholderCountError",
    "SemiDynamicCompressor",
]
