"""``semidyn-rag query --progressive``: many retrieved chunks, read coarse-to-fine within a budget.

The options, their checks, the read and its report for the ``query`` command. Features come
from the corpus store once; the coarse scan and the answering read both derive from them
(``semidyn_rag.progressive``), so no stored chunk is encoded. The report lists, per source,
how it was read (latents at a factor, text, or dropped), its scan factor and why.
"""

from __future__ import annotations

import argparse

PROGRESSIVE_K = 20  # chunks retrieved by default in progressive mode


def add_options(p: argparse.ArgumentParser) -> None:
    from ..progressive import DEFAULT_SIGNAL, SIGNALS

    g = p.add_argument_group("progressive reading", "scan many chunks coarsely, re-read the relevant ones finely")
    g.add_argument("--progressive", action="store_true",
                   help=f"read coarse-to-fine within --max-latents (then -k defaults to {PROGRESSIVE_K})")
    g.add_argument("--max-latents", type=int, default=None,
                   help="decoder positions the chunks may take in the answer (latents plus text tokens)")
    g.add_argument("--signal", choices=sorted(SIGNALS), default=DEFAULT_SIGNAL,
                   help="which chunks matter: the retriever's scores, the decoder's attention on the coarse "
                        "scan, or the question's likelihood given each chunk")
    g.add_argument("--max-expand", type=int, default=2, help="chunks re-read finer than the coarse factor, at most")
    g.add_argument("--no-text", action="store_true", help="never re-read a chunk as plain text")


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the progressive options, or None."""
    if not args.progressive:
        if args.max_latents is not None:
            return "--max-latents is for --progressive (the budget of the coarse-to-fine read)"
        return None
    if args.max_latents is None:
        return "--progressive needs --max-latents N (decoder positions the chunks may take)"
    if args.max_latents < 0:
        return f"--max-latents must be >= 0, got {args.max_latents}"
    if args.scale is not None or args.factor is not None:
        return "--scale and --factor do not apply to --progressive (the plan picks each chunk's factor)"
    if args.max_expand < 0:
        return f"--max-expand must be >= 0, got {args.max_expand}"
    return None


def answer(args: argparse.Namespace, corpus, comp, hits, backend_name: str = "transformers",
           vllm_url: str | None = None) -> dict:
    """Read ``hits`` progressively and answer; the result as plain data. Raises ValueError.

    The plan runs on the compressor; the answer is decoded by the chosen backend.
    """
    from ..progressive import ProgressiveReader
    from ..serving import make_backend

    fetched = corpus.features(hits, comp)
    texts = [h.chunk.text for h in hits]
    reader = ProgressiveReader(comp, signal=args.signal, max_expand=args.max_expand, allow_text=not args.no_text)
    with make_backend(comp, backend_name, vllm_url=vllm_url) as backend:
        text, plan = reader.answer(args.question, fetched.features, max_latents=args.max_latents, texts=texts,
                                   scores=[h.score for h in hits], max_new_tokens=args.max_new_tokens,
                                   backend=backend)
    sources = []
    for hit, c in zip(hits, plan.chunks):
        words = hit.chunk.text.split()
        sources.append({
            "rank": hit.rank + 1, "chunk_id": hit.chunk.chunk_id, "doc_id": hit.chunk.doc_id,
            "score": round(hit.score, 4), "tokens": c.n_tokens, "read": c.read, "factor": c.factor,
            "scan_factor": c.scan_factor, "positions": c.positions, "relevance_rank": c.relevance_rank,
            "expanded": c.expanded, "reason": c.reason,
            "preview": " ".join(words[:12]) + (" ..." if len(words) > 12 else ""),
        })
    return {
        "question": args.question, "answer": text.strip(), "sources": sources,
        "progressive": {"signal": plan.signal, "max_latents": plan.max_latents, "used": plan.used,
                        "scan_positions": plan.scan_positions, "scan_s": round(plan.scan_s, 4),
                        "store_hits": fetched.hits, "encoded": fetched.encoded},
    }


def render(result: dict) -> str:
    """The progressive query result as text for a terminal."""
    lines = [f"Answer: {result['answer']}", "", "Sources:"]
    for s in result["sources"]:
        how = ("dropped" if s["read"] == "dropped" else "text" if s["read"] == "text"
               else f"factor {s['factor']}" if s["factor"] else "latents")
        scan = f", scanned at {s['scan_factor']}x" if s["scan_factor"] else ""
        lines.append(f"  [{s['rank']}] chunk {s['chunk_id']} ({s['doc_id']})  score {s['score']:.3f}  "
                     f"{how}, {s['positions']} positions{scan}")
        lines.append(f"      {s['reason']}")
        lines.append(f"      {s['preview']}")
    p = result["progressive"]
    lines += ["", f"Progressive ({p['signal']}): {p['used']} of {p['max_latents']} positions used; "
              f"scan prefilled {p['scan_positions']} positions in {p['scan_s']:.2f} s",
              f"Store: {p['store_hits']} read, {p['encoded']} encoded and written back"]
    return "\n".join(lines)
