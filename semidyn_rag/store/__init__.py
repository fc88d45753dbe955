"""The latent store: encoder features of chunks, cached once and read at any scale.

``LatentStore`` (SQLite in WAL mode) keeps CRC-32-checksummed ``ContextFeatures`` by chunk key
(sha256 of the normalised text) and feature fingerprint; ``record`` is their byte format;
``sqlite`` opens the file and turns SQLite failures into errors that say what to do.
"""

from .fetch import FetchResult, StoreStats, encode_without_store
from .keys import chunk_key, normalize_text
from .latent_store import LatentStore
from .record import STORAGE_DTYPES, CorruptEntryError, Record, check, pack, unpack
from .sqlite import CorruptStoreError, StoreBusyError, StoreError, StoreFullError, set_aside, writable

__all__ = [
    "STORAGE_DTYPES",
    "CorruptEntryError",
    "CorruptStoreError",
    "FetchResult",
    "LatentStore",
    "Record",
    "StoreBusyError",
    "StoreError",
    "StoreFullError",
    "StoreStats",
    "check",
    "chunk_key",
    "encode_without_store",
    "normalize_text",
    "pack",
    "set_aside",
    "unpack",
    "writable",
]
