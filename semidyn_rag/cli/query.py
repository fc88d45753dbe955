"""``semidyn-rag query DIR "question"``: retrieve, read latents from the store, answer.

Chunks come from the corpus directory's FAISS index; their latents are derived from the store
at the requested scale (misses are encoded and written back, unless the directory is read-only
here); the decoder answers from the latents of all retrieved chunks in one multi-context
prompt. A damaged store does not stop a query: the retrieved chunks are encoded instead, with a
warning to run ``semidyn-rag repair DIR``. Prints the answer, the sources and the compression
statistics (``--json`` for one machine-readable object).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter

from . import (add_backend_arguments, add_trust_remote_code, allow_negative_values, backend_choice,
               compressor_overrides, fail, query_progressive, scale_arg, text_arg)

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("query", help="answer a question from a precompressed corpus directory",
                              description="Retrieve chunks from a corpus directory, read their latents "
                                          "from its store at a scale, and answer with the decoder.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    allow_negative_values(p)
    p.add_argument("dir", help="corpus directory built by `semidyn-rag precompress`")
    p.add_argument("question", type=text_arg)
    p.add_argument("-k", type=int, default=None, help="chunks to retrieve (default 5; 20 with --progressive)")
    p.add_argument("--scale", type=scale_arg, default=None,
                   help="compression scale (default: the one the directory was precompressed at)")
    p.add_argument("--factor", type=int, default=None, help="force one pooling factor instead of the selector")
    p.add_argument("--compressor", default=None,
                   help="compressor checkpoint (default: the one the directory was built with)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None, help="device for the compressor (default: CUDA if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    query_progressive.add_options(p)
    add_backend_arguments(p)
    add_trust_remote_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..compressor import SemiDynamicCompressor
    from ..corpus import CorpusDirectory, CorpusError

    problem = query_progressive.check(args)
    if problem:
        return fail(problem, 2)
    try:
        backend_name, vllm_url = backend_choice(args)
    except argparse.ArgumentTypeError as e:
        return fail(str(e), 2)
    k = args.k if args.k is not None else query_progressive.PROGRESSIVE_K if args.progressive else 5
    try:
        corpus = CorpusDirectory(args.dir)
    except CorpusError as e:
        return fail(str(e), 1)
    with corpus:
        recorded = corpus.manifest.compressor
        ckpt = args.compressor or (recorded.path if recorded else None)
        if not ckpt:
            return fail(f"{args.dir} records no compressor checkpoint; pass --compressor CKPT", 2)
        try:
            comp = SemiDynamicCompressor.from_pretrained(ckpt, **compressor_overrides(args, args.device))
        except CheckpointError as e:
            hint = "" if args.compressor else " (recorded in corpus.json; pass --compressor to use another)"
            return fail(f"cannot load the compressor {ckpt}{hint}: {e}", 2)
        pooling = comp.pooling
        if args.factor is not None and pooling.takes != "factor":
            return fail(f"--factor does not apply: this compressor's pooling ({pooling.kind}) takes a latent count", 2)
        if args.factor is not None and args.factor not in pooling.candidates:
            return fail(f"--factor {args.factor} is not a factor this compressor was trained on; "
                        f"use one of {', '.join(map(str, pooling.candidates))}", 2)
        if recorded and comp.feature_fingerprint != recorded.feature_fingerprint:
            logger.warning("this compressor's encoder differs from the one %s was precompressed with; "
                           "retrieved chunks are encoded now and written back", args.dir)
        try:
            hits = corpus.search(args.question, k=k)
        except (CorpusError, ValueError) as e:
            return fail(str(e), 1)
        if not hits:
            return fail("the corpus directory holds no chunks", 1)
        if args.progressive:
            try:
                result = query_progressive.answer(args, corpus, comp, hits, backend_name, vllm_url)
            except ValueError as e:
                return fail(str(e), 2)
            print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else query_progressive.render(result))
            return 0
        scale = corpus.manifest.scale if args.scale is None else args.scale
        try:
            contexts, fetched = corpus.contexts(hits, comp, scale=scale, factor=args.factor)
        except ValueError as e:  # e.g. a forced factor the backbone cannot pool at
            return fail(str(e), 2)
        answer = _answer(comp, backend_name, vllm_url, args.question, contexts, args.max_new_tokens)
    result = report(args.question, answer, hits, contexts, fetched, scale)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(render(result))
    return 0


def _answer(comp, backend_name: str, vllm_url: str | None, question: str, contexts, max_new_tokens: int) -> str:
    """The decoder's answer from the chosen backend (the default RAG prompt, one placeholder per chunk)."""
    from ..serving import make_backend

    dec = comp.decoder
    ids = dec.encode_prompts([dec.render(question, len(contexts))])
    with make_backend(comp, backend_name, vllm_url=vllm_url) as backend:
        (answer,) = backend.generate(ids, comp.context_latents(ids, [contexts]), max_new_tokens)
    return answer


def report(question: str, answer: str, hits, contexts, fetched, scale: float) -> dict:
    """The query result as plain data: answer, sources and compression statistics."""
    sources = []
    for hit, ctx in zip(hits, contexts):
        c = hit.chunk
        words = c.text.split()
        sources.append({
            "rank": hit.rank + 1, "chunk_id": c.chunk_id, "doc_id": c.doc_id, "position": c.position,
            "score": round(hit.score, 4), "tokens": ctx.n_tokens, "latents": ctx.n_latents, "factor": ctx.factor,
            "preview": " ".join(words[:12]) + (" ..." if len(words) > 12 else ""),
        })
    tokens = sum(c.n_tokens for c in contexts)
    latents = sum(c.n_latents for c in contexts)
    factors = Counter(c.factor for c in contexts if c.factor is not None)
    return {
        "question": question, "answer": answer.strip(), "sources": sources,
        "compression": {
            "scale": scale, "contexts": len(contexts), "tokens": tokens, "latents": latents,
            "ratio": round(tokens / latents, 3) if latents else None,
            "factors": {str(k): v for k, v in sorted(factors.items())},
            "store_hits": fetched.hits, "encoded": fetched.encoded, "corrupt_recomputed": len(fetched.corrupt),
        },
    }


def render(result: dict) -> str:
    """The query result as text for a terminal."""
    lines = [f"Answer: {result['answer']}", "", "Sources:"]
    for s in result["sources"]:
        f = f"factor {s['factor']}, " if s["factor"] is not None else ""
        lines.append(f"  [{s['rank']}] chunk {s['chunk_id']} ({s['doc_id']} #{s['position']})  score {s['score']:.3f}  "
                     f"{f}{s['latents']} latents / {s['tokens']} tokens")
        lines.append(f"      {s['preview']}")
    c = result["compression"]
    hist = ", ".join(f"{k}x: {v}" for k, v in c["factors"].items())
    lines += ["", f"Compression: {c['contexts']} contexts, {c['tokens']} tokens -> {c['latents']} latents "
              f"({c['ratio']}x) at scale {c['scale']:g}" + (f"; factors {hist}" if hist else ""),
              f"Store: {c['store_hits']} read, {c['encoded']} encoded and written back"
              + (f" ({c['corrupt_recomputed']} corrupt entries replaced)" if c["corrupt_recomputed"] else "")]
    return "\n".join(lines)
