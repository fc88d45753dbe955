"""``semidyn-rag precompress CORPUS --out DIR``: build a corpus directory, resumably.

Loads the documents, chunks them in encoder tokens, embeds and indexes the chunks (FAISS) and
encodes every chunk into the latent store. Killed at any point and rerun, it encodes only what
is missing. Prints the run's statistics and writes them to ``DIR/stats.json``.

A rerun also repairs what it finds damaged: an index that cannot be read or does not fit the
chunk table is rebuilt, a damaged ``latents.sqlite`` is moved aside and refilled.

``--engine ray`` encodes on a Ray cluster instead (``semidyn_rag.distributed``): actors write
latent shards under ``--shards-dir``, which are ingested into the store as they arrive.
"""

from __future__ import annotations

import argparse
import json
import logging

from . import (add_trust_remote_code, allow_negative_values, compressor_overrides, fail, folder_arg, ratio_arg,
               scale_arg)

logger = logging.getLogger(__name__)

NO_COMPRESSOR = ("no compressor given and no trained embedded default is installed: pass --compressor CKPT "
                 "(a folder written by SemiDynamicCompressor.save_pretrained or `semidyn-rag train`)")


def shipped_compressor() -> str | None:
    """The trained default checkpoint shipped inside the package, if there is one."""
    try:
        from ..default_compressor import SHIPPED_COMPRESSOR
    except ImportError:
        return None
    return str(SHIPPED_COMPRESSOR) if (SHIPPED_COMPRESSOR / "config.json").is_file() else None


def register(subparsers) -> None:
    p = subparsers.add_parser("precompress", help="chunk, index and compress a corpus into a directory",
                              description="Build a corpus directory (chunk table, FAISS index, latent "
                                          "store) from documents; rerun to resume or update it.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    allow_negative_values(p)
    p.add_argument("corpus", help="a folder of .txt/.md files, a .jsonl file (text + metadata) or a .parquet file")
    p.add_argument("--out", required=True, type=folder_arg, help="the corpus directory to create or complete")
    p.add_argument("--compressor", help="compressor checkpoint folder or hub id (default: the trained "
                                        "embedded default, when the package ships one)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--scale", type=scale_arg, default=None,
                        help="default scale recorded for queries (stats are reported at it; default 0); the "
                             "store keeps features for every scale")
    target.add_argument("--target-ratio", type=ratio_arg, default=None,
                        help="fit the recorded scale so that the chunks average at least this many tokens per "
                             "latent (dense chunks still get more latents)")
    p.add_argument("--ratio-average", choices=["mean", "sums"], default=None,
                   help="with --target-ratio: mean of each chunk's ratio (default), or all tokens over all latents")
    p.add_argument("--batch-size", type=int, default=16, help="chunks per encoder batch and per commit")
    p.add_argument("--chunk-tokens", type=int, default=256, help="chunk budget in encoder tokens")
    p.add_argument("--overlap", type=int, default=0, help="tokens of trailing sentences repeated in the next chunk")
    p.add_argument("--index", choices=["flat", "ivf", "hnsw"], default="flat", help="FAISS index type")
    p.add_argument("--embedder", default="all-MiniLM-L6-v2",
                   help="sentence-transformers model: name, hub id or folder")
    p.add_argument("--store-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="precision of the stored features")
    p.add_argument("--text-field", default="text", help="text field of JSONL records / text column of parquet")
    p.add_argument("--device", default=None, help="device for the compressor (default: CUDA if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_trust_remote_code(p)
    g = p.add_argument_group("engine", "where the chunks are encoded")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: in this process; ray: on a Ray cluster, through latent shards")
    # Ray options default to "not given" (SUPPRESS) so that passing one with --engine local is an error
    no = argparse.SUPPRESS
    g.add_argument("--address", default=no, help="Ray cluster address for ray.init, e.g. auto or HEAD:6379 "
                                                 "(default: $RAY_ADDRESS, else a new local Ray instance)")
    g.add_argument("--num-workers", type=int, default=no, help="Ray actors, each holding one compressor (default: 1)")
    g.add_argument("--gpus-per-worker", type=float, default=no, help="GPUs per Ray actor (default: 0)")
    g.add_argument("--cpus-per-worker", type=float, default=no,
                   help="CPUs per Ray actor (default: min(1, cluster CPUs / (workers + 1)))")
    g.add_argument("--shard-size", type=int, default=no, help="chunks per shard and per actor call (default: 256)")
    g.add_argument("--shards-dir", default=no, help="where Ray actors write latent shards; every node must see it "
                                                   "(default: DIR/shards)")
    p.set_defaults(func=run)


RAY_OPTIONS = ("address", "num_workers", "gpus_per_worker", "cpus_per_worker", "shard_size", "shards_dir")


def _engine(args: argparse.Namespace):
    """The encode engine (step 3 of precompress) that the options ask for."""
    if args.engine == "local":
        from ..corpus.build import encode_locally

        return encode_locally
    from pathlib import Path

    from ..distributed import RayEngine

    opt = lambda name, default: getattr(args, name, default)  # noqa: E731
    return RayEngine(
        checkpoint=args.compressor, shards_dir=opt("shards_dir", Path(args.out) / "shards"),
        address=opt("address", None), num_workers=opt("num_workers", 1), gpus_per_worker=opt("gpus_per_worker", 0.0),
        cpus_per_worker=opt("cpus_per_worker", None), shard_size=opt("shard_size", 256), device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    args.compressor = args.compressor or shipped_compressor()
    if not args.compressor:
        return fail(NO_COMPRESSOR, 2)
    if args.ratio_average and args.target_ratio is None:
        return fail("--ratio-average only applies with --target-ratio", 2)
    if args.engine == "local":
        given = [f"--{o.replace('_', '-')}" for o in RAY_OPTIONS if hasattr(args, o)]
        if given:
            return fail(f"{', '.join(given)} only apply to --engine ray", 2)
    else:
        if args.trust_remote_code:
            return fail("--trust-remote-code is not passed on to Ray workers; use --engine local", 2)
        from ..distributed import RayUnavailableError, require_ray

        try:
            require_ray()
        except RayUnavailableError as e:
            return fail(str(e), 2)
    from ..checkpoint import CheckpointError
    from ..compressor import SemiDynamicCompressor
    from ..corpus import CorpusError, IndexParams, precompress

    # with Ray the workers run the encoder (on --device); the driver only chunks and counts
    device = args.device if args.engine == "local" else "cpu"
    try:
        comp = SemiDynamicCompressor.from_pretrained(args.compressor, **compressor_overrides(args, device))
    except CheckpointError as e:
        return fail(f"cannot load the compressor: {e}", 2)
    failures: tuple[type[Exception], ...] = (CorpusError, FileNotFoundError, ValueError)
    if args.engine == "ray":
        from ..distributed import InvalidShardError, RayEngineError

        failures += (RayEngineError, InvalidShardError)
    try:
        engine = _engine(args)
        stats = precompress(
            args.corpus, args.out, comp, compressor_path=args.compressor, scale=args.scale,
            target_ratio=args.target_ratio, ratio_average=args.ratio_average or "mean",
            batch_size=args.batch_size, chunk_tokens=args.chunk_tokens, overlap=args.overlap,
            index=IndexParams(kind=args.index), embedder=args.embedder,
            store_dtype=args.store_dtype, text_field=args.text_field, progress=not args.no_progress,
            engine=engine,
        )
    except failures as e:
        return fail(str(e), 1)
    print(stats.summary())
    print(f"stats written to {args.out}/stats.json")
    logger.debug("%s", json.dumps(stats.to_dict()))
    return 0
