"""``semidyn-rag import-latents SHARDS --into DIR``: load latent shards into a corpus's store.

A cluster precompresses once (``precompress --engine ray`` leaves its shards under
``--shards-dir``); every serving node copies the small parts of the corpus directory
(``corpus.json``, ``chunks.parquet``, ``index.faiss``) and imports the shards into its own
store. Importing is idempotent; invalid shards are reported and left out (exit code 1).
"""

from __future__ import annotations

import argparse
import sys

from . import fail


def register(subparsers) -> None:
    p = subparsers.add_parser("import-latents", help="load latent shards into a corpus directory's store",
                              description="Verify latent shards (Parquet, written by precompress --engine ray) "
                                          "and load them into a corpus directory's latent store; "
                                          "entries the store already holds are left as they are.")
    p.add_argument("shards", nargs="+", help="a folder of shards, or shard files")
    p.add_argument("--into", required=True, metavar="DIR", help="the corpus directory whose store receives them")
    p.add_argument("--only-corpus", action="store_true",
                   help="import only entries for this corpus's chunks under its compressor")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..corpus import CorpusDirectory, CorpusError
    from ..distributed import ingest_shards

    try:
        with CorpusDirectory(args.into, readonly_store=False) as corpus:
            manifest = corpus.manifest
            fp = manifest.compressor.feature_fingerprint if manifest.compressor else None
            if args.only_corpus and fp is None:
                return fail(f"{args.into} records no compressor, so --only-corpus has nothing to match", 2)
            keys = corpus.table.column("key").to_pylist()
            report = ingest_shards(args.shards, corpus.store, keys=keys if args.only_corpus else None,
                                   fingerprint=fp if args.only_corpus else None, on_invalid="skip",
                                   progress=not args.no_progress)
            covered = len(keys) - len(corpus.store.missing(keys, fp)) if fp else 0
    except (CorpusError, FileNotFoundError) as e:
        return fail(str(e), 2)
    print(f"shards     {report.shards} read" + (f", {report.filtered_shards} not for this corpus"
                                                 if report.filtered_shards else "")
          + (f", {len(report.invalid)} invalid" if report.invalid else ""))
    print(f"entries    {report.written} written, {report.present} already present")
    if fp:
        print(f"corpus     {covered}/{len(keys)} chunks have latents for its compressor ({fp})")
    for path, why in report.invalid:
        print(f"  invalid: {path}: {why}", file=sys.stderr)
    return 1 if report.invalid else 0
