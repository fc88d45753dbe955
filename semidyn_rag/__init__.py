"""semidyn-rag: density-aware soft context compression with a semi-dynamic ratio, for RAG.

Retrieved chunks are encoded into a few latent vectors each (more for dense text, fewer for
redundant text) and a decoder LLM reads them in place of the text.
"""

from .checkpoint import CheckpointError
from .compressor import SemiDynamicCompressor
from .config import CompressorConfig, LoraSettings
from .corpus import CorpusDirectory, CorpusError, IndexParams, PrecompressStats, precompress
from .pipeline.encoder import ContextTooLongError
from .evaluation import EvalConfig, run_evaluation
from .pipeline.placeholder import PlaceholderCountError
from .pipeline.selector import DiscreteRatioSelector
from .progressive import ProgressiveReader, ReadPlan
from .session import ChunkCompression, CompressionSession, PromptUsage, open_session
from .store import CorruptEntryError, LatentStore, chunk_key, normalize_text
from .training import TrainConfig, TrainingRecord, load_records
from .types import CompressedContext, ContextFeatures

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ChunkCompression",
    "CompressedContext",
    "CompressionSession",
    "CompressorConfig",
    "ContextFeatures",
    "ContextTooLongError",
    "CorpusDirectory",
    "CorpusError",
    "CorruptEntryError",
    "DiscreteRatioSelector",
    "EvalConfig",
    "IndexParams",
    "LatentStore",
    "LoraSettings",
    "PlaceholderCountError",
    "PrecompressStats",
    "ProgressiveReader",
    "PromptUsage",
    "ReadPlan",
    "SemiDynamicCompressor",
    "TrainConfig",
    "TrainingRecord",
    "chunk_key",
    "load_records",
    "normalize_text",
    "open_session",
    "precompress",
    "run_evaluation",
]
