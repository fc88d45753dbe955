"""Chunk keys: what makes two chunks "the same text" for the latent store and for dedup.

A key is the sha256 of the normalised text (Unicode NFC, runs of whitespace collapsed to one
space, ends stripped). Features are computed from the normalised text, so chunks that differ
only in layout share one entry; the compressor fingerprint is kept next to the key, not in it,
so one chunk can hold entries from several compressors side by side.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFC, whitespace runs collapsed to single spaces, ends stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def chunk_key(text: str) -> str:
    """The store key of a chunk: sha256 (hex) of its normalised text."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()
