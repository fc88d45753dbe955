"""Coarse-to-fine progressive reading: more retrieved chunks for the same latent budget.

``ProgressiveReader`` scans many chunks at a coarse size, ranks them with a relevance signal
(``signals``), re-reads the relevant ones finely (or as text) and keeps the rest coarse, never
spending more than ``max_latents`` decoder positions (``plan``). ``CompressionSession.
read_progressive`` does the same for frameworks that pass text prompts (``session``).
"""

from .plan import TEXT, ChunkRead, ReadPlan, Sizes, flat_reads, plan_reads
from .reader import DEFAULT_SIGNAL, ProgressiveReader
from .signals import SIGNALS, AttentionSignal, LikelihoodSignal, RelevanceSignal, RetrieverSignal, make_signal

__all__ = [
    "DEFAULT_SIGNAL", "SIGNALS", "TEXT", "AttentionSignal", "ChunkRead", "LikelihoodSignal", "ProgressiveReader",
    "ReadPlan", "RelevanceSignal", "RetrieverSignal", "Sizes", "flat_reads", "make_signal", "plan_reads",
]
