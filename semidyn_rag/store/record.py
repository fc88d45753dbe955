"""One store entry as bytes: the serialisation of ``ContextFeatures`` and its checksum.

Features are kept in fp16 by default (bf16 and fp32 on request) with their shape and dtype;
token counts per window as int32. The checksum covers the key, the fingerprint, the shape,
the dtype, both blobs, y_hat and the token count, so a flipped byte anywhere in an entry, or an
entry moved under another key, is detected on read instead of silently used.

The checksum is CRC-32 (``"crc32:"`` + 8 hex digits), the storage checksum of zip, PNG and
ext4: it guards against corruption, not against tampering, and costs 21 us per 87 kB entry
where sha256 cost 48 us, on a read path of about 100 us. Entries written before it carry a
bare sha256 hex digest and are still verified with sha256.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import torch

from ..types import ContextFeatures

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


class CorruptEntryError(RuntimeError):
    """A store entry failed its checksum (or cannot be decoded): it must be recomputed."""

    def __init__(self, key: str, fingerprint: str, why: str):
        super().__init__(f"latent store entry {key[:16]}... (fingerprint {fingerprint}) is corrupt: {why}")
        self.key, self.fingerprint, self.why = key, fingerprint, why


@dataclass(frozen=True)
class Record:
    """The stored form of one ``ContextFeatures`` (what one row of the store holds)."""

    key: str
    fingerprint: str
    dtype: str
    rows: int
    cols: int
    features: bytes
    counts: bytes | None
    y_hat: float
    n_tokens: int
    checksum: str

    @property
    def nbytes(self) -> int:
        return len(self.features) + len(self.counts or b"")


_CRC = "crc32:"


def _checksum_parts(key: str, fingerprint: str, dtype: str, rows: int, cols: int, features: bytes,
                    counts: bytes | None, y_hat: float, n_tokens: int):
    """The byte strings a checksum covers, in order (the same for every algorithm)."""
    for part in (key, fingerprint, dtype):
        yield part.encode() + b"\0"
    yield struct.pack("<qqdq?", rows, cols, float(y_hat), int(n_tokens), counts is not None)
    yield struct.pack("<q", len(features))
    yield features
    if counts is not None:
        yield counts


def checksum(key: str, fingerprint: str, dtype: str, rows: int, cols: int, features: bytes,
             counts: bytes | None, y_hat: float, n_tokens: int, *, algorithm: str = "crc32") -> str:
    """The checksum over every field of an entry: ``"crc32:%08x"``, or a bare sha256 hex digest
    (``algorithm="sha256"``, the format of entries written before CRC-32)."""
    parts = _checksum_parts(key, fingerprint, dtype, rows, cols, features, counts, y_hat, n_tokens)
    if algorithm == "crc32":
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        return f"{_CRC}{crc:08x}"
    if algorithm == "sha256":
        h = hashlib.sha256()
        for part in parts:
            h.update(part)
        return h.hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; use crc32 or sha256")


def pack(key: str, features: ContextFeatures, dtype: str = "float16") -> Record:
    """Serialise ``features`` under ``key``; fp16 that would overflow falls back to fp32.

    Raises ValueError for an unknown dtype or non-finite features.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    feats = features.features.detach().to("cpu")
    if feats.dim() != 2:
        raise ValueError(f"features must be 2-D (rows x width), got shape {tuple(feats.shape)}")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"features for {key[:16]}... are not finite; refusing to store them")
    stored = feats.to(STORAGE_DTYPES[dtype])
    if not bool(torch.isfinite(stored).all()):  # fp16 tops out at 65504
        dtype, stored = "float32", feats.to(torch.float32)
    blob = _tensor_bytes(stored)
    counts = None
    if features.counts is not None:
        counts = features.counts.detach().to("cpu", torch.int32).contiguous().numpy().tobytes()
    rows, cols = int(stored.shape[0]), int(stored.shape[1])
    y_hat, n_tokens = float(features.y_hat), int(features.n_tokens)
    fp = features.fingerprint
    return Record(key, fp, dtype, rows, cols, blob, counts, y_hat, n_tokens,
                  checksum(key, fp, dtype, rows, cols, blob, counts, y_hat, n_tokens))


def check(record: Record) -> None:
    """Raise CorruptEntryError unless ``record`` passes its checksum and its sizes agree."""
    r = record
    if r.dtype not in STORAGE_DTYPES:
        raise CorruptEntryError(r.key, r.fingerprint, f"unknown dtype {r.dtype!r}")
    if not isinstance(r.features, bytes) or (r.counts is not None and not isinstance(r.counts, bytes)):
        raise CorruptEntryError(r.key, r.fingerprint, "blob columns do not hold bytes")
    algorithm = "crc32" if str(r.checksum).startswith(_CRC) else "sha256"
    expect = checksum(r.key, r.fingerprint, r.dtype, r.rows, r.cols, r.features, r.counts, r.y_hat, r.n_tokens,
                      algorithm=algorithm)
    if expect != r.checksum:
        raise CorruptEntryError(r.key, r.fingerprint, "checksum mismatch")
    if len(r.features) != r.rows * r.cols * STORAGE_DTYPES[r.dtype].itemsize:
        raise CorruptEntryError(r.key, r.fingerprint, "blob size does not match its shape")
    if r.counts is not None and len(r.counts) != r.rows * 4:
        raise CorruptEntryError(r.key, r.fingerprint, "counts do not match the feature rows")


def unpack(record: Record, compute_dtype: torch.dtype = torch.float32) -> ContextFeatures:
    """Verify ``record`` and rebuild its ``ContextFeatures`` (features cast to ``compute_dtype``).

    Raises CorruptEntryError on a checksum mismatch or an undecodable entry.
    """
    r = record
    check(r)
    feats = torch.frombuffer(bytearray(r.features), dtype=STORAGE_DTYPES[r.dtype]).reshape(r.rows, r.cols)
    counts = None
    if r.counts is not None:
        counts = torch.frombuffer(bytearray(r.counts), dtype=torch.int32).to(torch.long)
    return ContextFeatures(feats.to(compute_dtype), counts, r.y_hat, r.n_tokens, r.fingerprint)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: move the raw bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()
