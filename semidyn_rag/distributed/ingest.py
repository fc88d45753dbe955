"""Loading latent shards into a ``LatentStore``, idempotently.

A record goes in only when the store has no valid entry for its key and fingerprint, so
ingesting the same shards twice writes nothing the second time, and an entry that fails its
checksum in the store is replaced. Each shard is verified as a whole first (``read_shard``)
and written in one store transaction: a shard is either in or not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..store import LatentStore
from ..store.record import unpack
from .shards import InvalidShardError, list_shards, read_shard, shard_info, shard_keys

logger = logging.getLogger(__name__)

ON_INVALID = ("raise", "skip", "delete")


@dataclass
class IngestReport:
    """What an ingestion read and wrote."""

    shards: int = 0  # valid shards read
    records: int = 0  # records in them that passed the filters
    written: int = 0  # records written to the store
    present: int = 0  # records the store already held valid entries for (left untouched)
    filtered_shards: int = 0  # shards skipped without reading rows (no wanted key or fingerprint)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    by_fingerprint: dict[str, int] = field(default_factory=dict)  # records per fingerprint
    keys: set[str] = field(default_factory=set, repr=False)  # keys of the records that passed

    def merge(self, other: IngestReport) -> None:
        for name in ("shards", "records", "written", "present", "filtered_shards"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.invalid += other.invalid
        for fp, n in other.by_fingerprint.items():
            self.by_fingerprint[fp] = self.by_fingerprint.get(fp, 0) + n
        self.keys |= other.keys


def ingest_shards(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    store: LatentStore,
    *,
    keys: Collection[str] | None = None,
    fingerprint: str | None = None,
    on_invalid: str = "raise",
    progress: bool = False,
) -> IngestReport:
    """Load the shards at ``source`` (a folder, or shard files) into ``store``.

    ``keys`` / ``fingerprint`` restrict what is loaded (shards without a wanted key or under
    another fingerprint are skipped after reading only their footer and key column). An invalid
    shard raises InvalidShardError (``on_invalid="raise"``), is reported and skipped
    (``"skip"``), or is reported and deleted so that its chunks get encoded again (``"delete"``).
    Returns what was read and written.
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    from tqdm.auto import tqdm

    wanted = set(keys) if keys is not None else None
    report = IngestReport()
    paths = list_shards(source)
    for path in tqdm(paths, unit="shard", desc="ingesting", disable=not progress, dynamic_ncols=True):
        try:
            report.merge(_ingest_one(path, store, wanted, fingerprint))
        except InvalidShardError as e:
            if on_invalid == "raise":
                raise
            logger.warning("%s; %s", e, "deleting it" if on_invalid == "delete" else "skipping it")
            report.invalid.append((str(path), e.why))
            if on_invalid == "delete":
                Path(path).unlink(missing_ok=True)
    return report


def _ingest_one(path: Path, store: LatentStore, wanted: set[str] | None, fingerprint: str | None) -> IngestReport:
    rep = IngestReport()
    if fingerprint is not None and shard_info(path).fingerprint != fingerprint:
        rep.filtered_shards = 1
        return rep
    if wanted is not None and wanted.isdisjoint(shard_keys(path)[1]):
        rep.filtered_shards = 1
        return rep
    info, records = read_shard(path)
    if wanted is not None:
        records = [r for r in records if r.key in wanted]
    todo = set(store.missing([r.key for r in records], info.fingerprint, verify=True))
    # put_many packs again in the store's dtype: the same bytes and checksum when it is the shard's
    store.put_many((r.key, unpack(r)) for r in records if r.key in todo)
    rep.shards, rep.records, rep.written = 1, len(records), len(todo)
    rep.present = len(records) - len(todo)
    rep.by_fingerprint = {info.fingerprint: len(records)}
    rep.keys = {r.key for r in records}
    return rep
