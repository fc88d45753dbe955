"""The Ray engine of ``precompress``: encode a corpus on a Ray cluster, through latent shards.

Pending chunks (key, text), sorted by length and cut into shard-sized blocks, become a Ray
dataset; ``map_batches`` runs them through a pool of actors that each load the compressor
once (``SemiDynamicCompressor.from_pretrained``), encode a block in length-bucketed batches
and write it as one shard (``shards``) under ``shards_dir``. The driver ingests every shard
as it is reported, so the store fills while the cluster works.

Resumable: before encoding, valid shards already in ``shards_dir`` are ingested (a killed job
left them) and invalid ones deleted; only chunks still missing are encoded. ``shards_dir`` and
the checkpoint must be paths every node sees (one machine, NFS, a mounted volume).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import remove_stale_temporaries
from ..store import LatentStore
from ..store.record import pack
from .ingest import IngestReport, ingest_shards
from .shards import write_shard

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'semidyn-rag[ray]'  (or: pip install 'ray[data]>=2.40')"


class RayUnavailableError(ImportError):
    """Ray (with Ray Data) is not installed: the Ray engine cannot run."""


class RayEngineError(RuntimeError):
    """The Ray job could not produce or hand back the shards it was asked for."""


def require_ray():
    """Import and return ``ray`` (with ``ray.data``); raise RayUnavailableError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailableError(f"the Ray engine needs Ray Data, which is not installed ({e}): {INSTALL_HINT}") from e
    return ray


class ShardEncoder:
    """The actor of the pipeline: one compressor per actor; each call encodes a block into a shard.

    Returns one row per shard written: its file name, row count and the host that wrote it.
    """

    def __init__(self, checkpoint: str, fingerprint: str, shards_dir: str, store_dtype: str, batch_size: int,
                 device: str | None = None, threads: int | None = None):
        import torch

        from ..compressor import SemiDynamicCompressor

        if threads:
            torch.set_num_threads(threads)
        overrides = {"device": device} if device else {}
        self.compressor = SemiDynamicCompressor.from_pretrained(checkpoint, **overrides)
        got = self.compressor.feature_fingerprint
        if got != fingerprint:
            raise RayEngineError(f"the compressor at {checkpoint} on {socket.gethostname()} has feature fingerprint "
                                 f"{got}, the driver's has {fingerprint}: every node must see the same checkpoint")
        self.fingerprint, self.shards_dir = fingerprint, shards_dir
        self.store_dtype, self.batch_size = store_dtype, batch_size

    def __call__(self, batch):
        import pyarrow as pa

        keys = batch.column("key").to_pylist()
        texts = batch.column("text").to_pylist()
        feats = self.compressor.encode(texts, batch_size=self.batch_size)
        info = write_shard(self.shards_dir, [pack(k, f, self.store_dtype) for k, f in zip(keys, feats)])
        return pa.table({"shard": [info.name], "rows": [info.rows], "host": [socket.gethostname()]})


@dataclass
class RayEngine:
    """``precompress(..., engine=RayEngine(...))``: encode the missing chunks on a Ray cluster.

    ``address`` is passed to ``ray.init`` (None: ``RAY_ADDRESS`` or a new local instance; an
    already initialised Ray is used as it is). ``cpus_per_worker`` None gives each actor
    ``min(1, cluster CPUs / (workers + 1))``, fractional on small machines so that Ray Data's
    own tasks always find a CPU; torch in each actor uses ``max(1, floor(cpus))`` threads.
    """

    checkpoint: str
    shards_dir: str | os.PathLike
    address: str | None = None
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    shard_size: int = 256
    device: str | None = None

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be positive, got {self.num_workers}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")
        if self.gpus_per_worker < 0 or (self.cpus_per_worker is not None and self.cpus_per_worker <= 0):
            raise ValueError("gpus_per_worker must be >= 0 and cpus_per_worker > 0")
        if Path(self.checkpoint).is_dir():  # workers resolve relative paths elsewhere
            self.checkpoint = str(Path(self.checkpoint).resolve())
        self.shards_dir = Path(self.shards_dir).resolve()

    def __call__(self, chunks, store: LatentStore, compressor, *, batch_size: int,
                 advance: Callable[[int], None]) -> int:
        """Encode ``chunks`` into ``store`` through shards; returns how many were encoded here.

        Raises RayUnavailableError without Ray, RayEngineError when the job fails (finished
        shards stay, so a rerun resumes), InvalidShardError for a shard that fails its checks.
        """
        fp = compressor.feature_fingerprint
        wanted = {c.key for c in chunks}
        shards_dir = Path(self.shards_dir)
        shards_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(shards_dir)
        # 1. resume: what finished shards of an earlier (killed) run already hold
        resumed = ingest_shards(shards_dir, store, keys=wanted, fingerprint=fp, on_invalid="delete")
        if resumed.invalid:
            logger.warning("%d invalid shards deleted; their chunks are encoded again", len(resumed.invalid))
        left = set(store.missing(sorted(wanted), fp, verify=True))
        advance(len(wanted) - len(left))
        todo = [c for c in chunks if c.key in left]  # still sorted by length
        if not todo:
            return 0
        # 2. encode the rest on the cluster, one shard per block, ingested as each is reported
        ray = require_ray()
        owned = not ray.is_initialized()
        if owned:
            kwargs = {"logging_level": logging.WARNING}
            if self.address is None and not os.environ.get("RAY_ADDRESS"):
                kwargs["include_dashboard"] = False
            try:
                ray.init(address=self.address, **kwargs)
            except ConnectionError as e:
                raise RayEngineError(
                    f"cannot connect to the Ray cluster at {self.address or os.environ.get('RAY_ADDRESS')}: {e}. "
                    "`ray status` on the head node shows its address; Ray clusters with token authentication "
                    "also need RAY_AUTH_MODE=token and the head's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
                ) from e
        elif self.address:
            logger.warning("Ray is already initialised in this process; --address %s is ignored", self.address)
        ctx = ray.data.DataContext.get_current()
        saved = ctx.enable_progress_bars
        ctx.enable_progress_bars = False  # precompress draws its own bar; Ray Data need not say so
        quiet = logging.getLogger("ray.data._internal.progress")
        quiet_level = quiet.level
        quiet.setLevel(logging.ERROR)
        done = IngestReport()
        try:
            for name, rows, host in self._shards(ray, todo, fp, store.dtype, batch_size):
                path = shards_dir / name
                if not path.is_file():
                    raise RayEngineError(f"a worker on {host} wrote shard {name}, but it is not at {path} "
                                         "here: --shards-dir must be storage every node and the driver see")
                done.merge(ingest_shards(path, store, keys=wanted, fingerprint=fp))
                advance(rows)
        except ray.exceptions.RayError as e:  # a worker failed: say why in one line, keep the chain
            raise RayEngineError(f"the Ray job failed ({type(e).__name__}): {_cause(e)}; "
                                 "finished shards are kept, rerun to resume") from e
        finally:
            ctx.enable_progress_bars = saved
            quiet.setLevel(quiet_level)
            if owned:
                ray.shutdown()
        missing = left - done.keys
        if missing:
            raise RayEngineError(f"the Ray job finished but {len(missing)} chunks came back in no shard; "
                                 "rerun to resume")
        return len(todo)

    def _shards(self, ray, todo, fingerprint: str, store_dtype: str, batch_size: int):
        """Run the pipeline over ``todo``; yield (shard name, rows, host) as shards are written."""
        import pyarrow as pa

        cpus = self.cpus_per_worker
        if cpus is None:  # fractional on small clusters: Ray Data's own tasks need a CPU too
            cpus = min(1.0, float(ray.cluster_resources().get("CPU", 1.0)) / (self.num_workers + 1))
        blocks = [pa.table({"key": [c.key for c in todo[s : s + self.shard_size]],
                            "text": [c.text for c in todo[s : s + self.shard_size]]})
                  for s in range(0, len(todo), self.shard_size)]
        ds = ray.data.from_arrow(blocks).map_batches(
            ShardEncoder,
            batch_size=None,  # one input block = one batch = one shard
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(self.num_workers, len(blocks))),
            num_cpus=cpus,
            num_gpus=self.gpus_per_worker or None,
            fn_constructor_kwargs={
                "checkpoint": self.checkpoint, "fingerprint": fingerprint, "shards_dir": str(self.shards_dir),
                "store_dtype": store_dtype, "batch_size": batch_size, "device": self.device,
                "threads": max(1, math.floor(cpus)),
            },
        )
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from zip(*(out.column(c).to_pylist() for c in ("shard", "rows", "host")))


def _cause(error: BaseException) -> str:
    """The innermost "SomeError: message" line of a Ray error (its text embeds the remote traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not set(ln.strip()) <= set("^~ ")]
    named = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*: ", ln)]
    return (named or lines or [type(error).__name__])[-1]
