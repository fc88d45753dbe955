"""What store reads return: ``FetchResult`` (features and where they came from) and ``StoreStats``.

Kept apart from the SQLite store so that every feature source (the disk store, the in-memory
LRU, or no store at all when the disk store is damaged) answers with the same record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..types import ContextFeatures
from .keys import chunk_key, normalize_text


@dataclass
class StoreStats:
    """What a store holds: entries per fingerprint and dtype, payload and file bytes."""

    path: str
    entries: int
    by_fingerprint: dict[str, int]
    by_dtype: dict[str, int]
    payload_bytes: int  # feature + count blobs
    file_bytes: int  # database, WAL and shared-memory files on disk
    tokens: int  # source tokens over all entries

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class FetchResult:
    """Features for a list of texts, and how many came from the store (vs. the encoder)."""

    features: list[ContextFeatures]
    keys: list[str]
    hits: int
    encoded: int
    corrupt: list[str] = field(default_factory=list)
    encoded_keys: set[str] = field(default_factory=set)  # keys that were encoded now (missing or corrupt)


def encode_without_store(compressor, texts: Sequence[str], *, batch_size: int = 16) -> FetchResult:
    """What ``fetch_or_encode`` returns when no store can be read: every text encoded now."""
    norm = [normalize_text(t) for t in texts]
    keys = [chunk_key(t) for t in norm]
    unique = dict(zip(keys, norm))
    new = dict(zip(unique, compressor.encode(list(unique.values()), batch_size=batch_size))) if unique else {}
    return FetchResult([new[k] for k in keys], keys, 0, len(keys), [], set(new))
