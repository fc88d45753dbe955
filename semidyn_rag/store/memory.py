"""An in-memory feature store with the same ``fetch_or_encode`` as :class:`LatentStore`.

A session always reads features through one path: this LRU, in front of a disk store when
there is one (hot chunks then skip SQLite) or alone (features live only in memory). Entries
are keyed by chunk key and feature fingerprint, so features of one encoder (or pooling rule)
are never served to another.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from ..types import ContextFeatures
from .keys import chunk_key, normalize_text
from .latent_store import FetchResult


class MemoryStore:
    """Up to ``max_entries`` features in memory (least recently used evicted), over an optional ``backing`` store."""

    def __init__(self, max_entries: int = 4096, backing=None):
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.max_entries = max_entries
        self.backing = backing
        self._entries: OrderedDict[tuple[str, str], ContextFeatures] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, fingerprint: str) -> ContextFeatures | None:
        with self._lock:
            return self._entries.get((key, fingerprint))

    def put_many(self, items) -> int:
        with self._lock:
            n = 0
            for key, f in items:
                self._entries[(key, f.fingerprint)] = f
                self._entries.move_to_end((key, f.fingerprint))
                n += 1
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return n

    def fetch_or_encode(self, compressor, texts: Sequence[str], *, batch_size: int = 16, write_back: bool = True,
                        keys: Sequence[str] | None = None,
                        token_ids: Sequence[Sequence[int]] | None = None) -> FetchResult:
        """Features of ``texts``: from memory, then the backing store, misses encoded.

        ``keys`` (with ``texts`` already normalised) and ``token_ids`` (the encoder's ids of
        those texts) spare hashing and tokenizing again when the caller has them.
        """
        norm = list(texts) if keys is not None else [normalize_text(t) for t in texts]
        keys = list(keys) if keys is not None else [chunk_key(t) for t in norm]
        fp = compressor.feature_fingerprint
        with self._lock:
            found = {k: f for k in keys if (f := self._entries.get((k, fp))) is not None}
            first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first position of each key
            miss = sorted(i for k, i in first.items() if k not in found)
            corrupt: list[str] = []
            encoded_keys: set[str] = set()
            if miss:
                mk = [keys[i] for i in miss]
                ids = None if token_ids is None else [token_ids[i] for i in miss]
                if self.backing is not None:
                    res = self.backing.fetch_or_encode(compressor, [norm[i] for i in miss], batch_size=batch_size,
                                                       write_back=write_back, keys=mk, token_ids=ids)
                    got, corrupt, encoded_keys = res.features, res.corrupt, set(res.encoded_keys)
                else:
                    got = (compressor.encode_ids(ids, batch_size) if ids is not None
                           else compressor.encode([norm[i] for i in miss], batch_size))
                    encoded_keys = set(mk)
                found.update(zip(mk, got))
                self.put_many(zip(mk, got))
            for k in first:
                if (k, fp) in self._entries:  # a call with more keys than max_entries evicts some
                    self._entries.move_to_end((k, fp))
        hits = sum(1 for k in keys if k not in encoded_keys)
        return FetchResult([found[k] for k in keys], keys, hits, len(keys) - hits, corrupt, encoded_keys)
