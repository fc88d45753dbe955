"""``semidyn-rag repair DIR``: rebuild a corpus directory's damaged index or store from its chunk table.

For a corpus directory whose ``query`` warns that ``latents.sqlite`` is damaged, or fails on
``index.faiss``: the damaged store is moved aside (``latents.sqlite.corrupt-<time>``) and
refilled with the compressor the directory was built with; an unreadable index is re-embedded.
Exit code 0 whether or not something needed repair; 1 when the directory cannot be repaired
from inside (a damaged manifest or chunk table: rerun precompress on the documents).
"""

from __future__ import annotations

import argparse
import json

from . import add_trust_remote_code, compressor_overrides, fail


def register(subparsers) -> None:
    p = subparsers.add_parser("repair", help="rebuild a corpus directory's damaged index or latent store",
                              description="Check a corpus directory and rebuild its damaged parts (index, "
                                          "latent store) from its chunk table.")
    p.add_argument("dir", help="corpus directory built by `semidyn-rag precompress`")
    p.add_argument("--compressor", default=None,
                   help="compressor checkpoint (default: the one the directory was built with)")
    p.add_argument("--embedder", default=None, help="sentence-transformers model (default: the recorded one)")
    p.add_argument("--batch-size", type=int, default=16, help="chunks per encoder batch and per commit (default 16)")
    p.add_argument("--device", default=None, help="device for the compressor (default: CUDA if available)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_trust_remote_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..corpus import read_manifest
    from ..corpus.repair import repair_directory

    if args.batch_size < 1:
        return fail(f"--batch-size must be positive, got {args.batch_size}", 2)
    recorded = read_manifest(args.dir).compressor

    def load():
        from ..compressor import SemiDynamicCompressor

        ckpt = args.compressor or (recorded.path if recorded else None)
        if not ckpt:
            raise FileNotFoundError(f"{args.dir} records no compressor checkpoint; pass --compressor CKPT")
        return SemiDynamicCompressor.from_pretrained(ckpt, **compressor_overrides(args, args.device))

    report = repair_directory(args.dir, load, embedder=args.embedder, batch_size=args.batch_size,
                    progress=not args.no_progress)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0
