"""Corpus directories: documents -> chunks -> FAISS index + latent store, and reading them back.

``precompress`` builds a directory (resumably); ``CorpusDirectory`` opens one to ``search``
chunks and read their latents at any scale; ``repair_directory`` rebuilds a damaged index or
store from the chunk table. See ``directory`` for the layout.
"""

from .build import PrecompressStats, latent_counts, precompress
from .chunking import Chunk, Chunker, split_sentences, tokenizer_counter
from .directory import (
                        ChunkRecord,
                        CompressorRecord,
                        CorpusDirectory,
                        CorpusError,
                        CorpusManifest,
                        SearchHit,
                        read_chunk_table,
                        read_manifest,
)
from .documents import Document, LoadReport, SkippedInput, decode_text, load_documents
from .embedding import DEFAULT_EMBEDDER, Embedder, resolve_embedder
from .index import INDEX_KINDS, IndexParams, build_index, load_index, save_index
from .repair import RepairReport, repair_directory

__all__ = [
    "DEFAULT_EMBEDDER",
    "INDEX_KINDS",
    "Chunk",
    "ChunkRecord",
    "Chunker",
    "CompressorRecord",
    "CorpusDirectory",
    "CorpusError",
    "CorpusManifest",
    "Document",
    "Embedder",
    "IndexParams",
    "LoadReport",
    "PrecompressStats",
    "RepairReport",
    "SearchHit",
    "SkippedInput",
    "build_index",
    "decode_text",
    "latent_counts",
    "load_documents",
    "load_index",
    "precompress",
    "read_chunk_table",
    "read_manifest",
    "repair_directory",
    "resolve_embedder",
    "save_index",
    "split_sentences",
    "tokenizer_counter",
]
