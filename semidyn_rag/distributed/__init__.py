"""Precompressing on a cluster: latent shards, their ingestion into a store, the Ray engine.

``shards`` is the Parquet format encoders write and stores load; ``ingest`` loads shards into
a ``LatentStore`` idempotently; ``ray_engine`` is the ``precompress`` engine that encodes on a
Ray cluster (``pip install 'semidyn-rag[ray]'``; Ray is imported only when it runs).
"""

from ..atomic import remove_stale_temporaries
from .ingest import IngestReport, ingest_shards
from .ray_engine import INSTALL_HINT, RayEngine, RayEngineError, RayUnavailableError, ShardEncoder, require_ray
from .shards import (
    FORMAT_VERSION,
    InvalidShardError,
    ShardInfo,
    list_shards,
    read_shard,
    shard_info,
    shard_keys,
    shard_name,
    write_shard,
)

__all__ = [
    "FORMAT_VERSION",
    "INSTALL_HINT",
    "IngestReport",
    "InvalidShardError",
    "RayEngine",
    "RayEngineError",
    "RayUnavailableError",
    "ShardEncoder",
    "ShardInfo",
    "ingest_shards",
    "list_shards",
    "read_shard",
    "remove_stale_temporaries",
    "require_ray",
    "shard_info",
    "shard_keys",
    "shard_name",
    "write_shard",
]
