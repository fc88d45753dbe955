"""``semidyn-rag fit-scale SOURCE --target-ratio R``: the scale that gives a corpus ratio R on average.

SOURCE is a corpus directory (its chunks' density predictions are read from the latent store,
without the features; chunks missing there are encoded and not written back) or documents as
``precompress`` takes them (chunked the same way and encoded). Prints the scale to pass as
``--scale`` to ``query`` or ``eval``, with the ratios and choices it gives; ``precompress
--target-ratio`` does the same fit and records the scale in the directory.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import add_trust_remote_code, compressor_overrides, fail, ratio_arg

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("fit-scale", help="the scale that gives a corpus a target average ratio",
                              description="Fit the selector's scale so that the chunks of a corpus directory or "
                                          "of documents average at least --target-ratio tokens per latent.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="a corpus directory, or documents: a folder of .txt/.md files, .jsonl or .parquet")
    p.add_argument("--target-ratio", type=ratio_arg, required=True, help="tokens per latent to reach on average")
    p.add_argument("--average", choices=["mean", "sums"], default="mean",
                   help="mean of each chunk's ratio (as the eval reports), or all tokens over all latents")
    p.add_argument("--compressor", default=None,
                   help="compressor checkpoint (default: the directory's, else the embedded default)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="documents: chunk budget in encoder tokens")
    p.add_argument("--overlap", type=int, default=0, help="documents: tokens repeated in the next chunk")
    p.add_argument("--text-field", default="text", help="documents: text field of JSONL records / parquet column")
    p.add_argument("--batch-size", type=int, default=16, help="chunks per encoder batch")
    p.add_argument("--device", default=None, help="device for the compressor (default: CUDA if available)")
    p.add_argument("--json", action="store_true", help="print the fit as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust_remote_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..compressor import SemiDynamicCompressor
    from ..corpus import CorpusError, read_manifest
    from ..corpus.directory import MANIFEST_FILE
    from ..pipeline.target_ratio import check_target, fit_scale
    from .precompress import NO_COMPRESSOR, shipped_compressor

    if args.batch_size < 1:
        return fail(f"--batch-size must be positive, got {args.batch_size}", 2)
    source = Path(args.source)
    if not source.exists():
        return fail(f"{source} does not exist", 2)
    is_corpus = (source / MANIFEST_FILE).is_file()
    try:
        recorded = read_manifest(source).compressor if is_corpus else None
    except CorpusError as e:
        return fail(str(e), 1)
    ckpt = args.compressor or (recorded.path if recorded and recorded.path else None) or shipped_compressor()
    if not ckpt:
        return fail(NO_COMPRESSOR, 2)
    try:
        comp = SemiDynamicCompressor.from_pretrained(ckpt, **compressor_overrides(args, args.device))
    except CheckpointError as e:
        return fail(f"cannot load the compressor: {e}", 2)
    try:
        check_target(comp, args.target_ratio, args.average)
        keys, known, texts = _corpus_chunks(source, comp) if is_corpus else _document_chunks(args, comp)
        y, n = _predictions(comp, keys, known, texts, args.batch_size, not args.no_progress)
        fit = fit_scale(comp, y, n, args.target_ratio, average=args.average)
    except (CorpusError, ValueError) as e:
        return fail(str(e), 1)
    print(json.dumps(fit.to_dict(), indent=2) if args.json else fit.summary())
    return 0


def _corpus_chunks(source: Path, comp) -> tuple[list[str], dict[str, tuple[float, int]], dict[str, str]]:
    """A corpus directory's chunk keys, the store's (y_hat, n) for those it holds, and the texts
    of the others (only those rows of the chunk table are read)."""
    from ..corpus import CorpusDirectory
    from ..store import StoreError

    with CorpusDirectory(source, readonly_store=True) as corpus:
        keys = corpus.table.column("key").to_pylist()
        try:
            known = corpus.store.summaries(keys, comp.feature_fingerprint)
        except (StoreError, FileNotFoundError) as e:  # damaged or missing: the chunks are encoded instead
            logger.warning("%s: encoding the %d chunks instead", e, len(keys))
            known = {}
        missing = [i for i, k in enumerate(keys) if k not in known]
        texts = {c.key: c.text for c in corpus.chunks(missing)} if missing else {}
    return keys, known, texts


def _document_chunks(args: argparse.Namespace, comp) -> tuple[list[str], dict, dict[str, str]]:
    """The keys and texts of the unique chunks ``precompress`` would make of the documents."""
    from ..corpus import Chunker, CorpusError, LoadReport, tokenizer_counter
    from ..corpus.build import collect_chunks

    chunker = Chunker(tokenizer_counter(comp.encoder.tokenizer), args.chunk_tokens, args.overlap)
    chunks, _, _ = collect_chunks(args.source, chunker, LoadReport(), args.text_field)
    if not chunks:
        raise CorpusError(f"{args.source} yielded no text to fit a scale on")
    return [c.key for c in chunks], {}, {c.key: c.text for c in chunks}


def _predictions(comp, keys: list[str], known: dict, texts: dict[str, str], batch_size: int,
                 progress: bool) -> tuple[list[float], list[int]]:
    """Each chunk's (y_hat, n_tokens): from ``known``, else from an encoder pass over its text (not stored)."""
    from tqdm.auto import tqdm

    todo = [k for k in keys if k not in known]
    found = dict(known)
    bar = tqdm(total=len(todo), unit="chunk", desc="encoding", disable=not progress or not todo)
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        for k, f in zip(batch, comp.encode([texts[k] for k in batch], batch_size=batch_size)):
            found[k] = (f.y_hat, f.n_tokens)
        bar.update(len(batch))
    bar.close()
    return [found[k][0] for k in keys], [found[k][1] for k in keys]
