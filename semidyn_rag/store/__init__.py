"""The latent store: encoder features of chunks, cached once and read at any scale.

``LatentStore`` (SQLite in WAL mode) keeps CRC-32-checksummed ``ContextFeatures`` by chunk key
(sha256 of the normalised text) and feature fingerprint; ``record`` is their byte format.
"""

from .keys import chunk_key, normalize_text
from .latent_store import FetchResult, LatentStore, StoreBusyError, StoreStats
from .record import STORAGE_DTYPES, CorruptEntryError, Record, check, pack, unpack

__all__ = [
    "STORAGE_DTYPES",
    "CorruptEntryError",
    "FetchResult",
    "LatentStore",
    "Record",
    "StoreBusyError",
    "StoreStats",
    "check",
    "chunk_key",
    "normalize_text",
    "pack",
    "unpack",
]
