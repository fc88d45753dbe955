"""A LlamaIndex query engine whose LLM reads retrieved chunks as compressed latents.

FAISS vector store + MiniLM embeddings as the retriever, ``SemiDynamicCompressPostprocessor``
to compress each retrieved node (cached in a latent store), ``SemiDynamicLLM`` to answer from
the latents. Runs offline on the embedded default compressor, or on ``--compressor CKPT``.

    python examples/llama_index_query_engine.py [--compressor CKPT] [--mode compact] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressor", help="checkpoint folder or hub id (default: the embedded default)")
    ap.add_argument("--mode", default="compact", choices=["compact", "simple_summarize"])
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--scale", type=float, default=0.0)
    ap.add_argument("--docs", type=int, default=40, help="how many Wikipedia summaries to index")
    args = ap.parse_args()

    import faiss
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.llms.semidyn_rag import SemiDynamicLLM
    from llama_index.postprocessor.semidyn_rag import SemiDynamicCompressPostprocessor
    from llama_index.vector_stores.faiss import FaissVectorStore

    from semidyn_rag import CompressionSession, LatentStore, SemiDynamicCompressor
    from semidyn_rag.default_compressor import default_compressor_path
    from semidyn_rag.embedded import demo_corpus, minilm_path

    path = args.compressor or str(default_compressor_path()[0])
    comp = SemiDynamicCompressor.from_pretrained(path)

    # 1. an ordinary LlamaIndex index: FAISS + MiniLM
    wiki = demo_corpus(split="reserved")  # the half of the summaries never trained on
    docs = [Document(text=d["text"], metadata={"title": d["title"]}) for d in wiki[:: max(1, len(wiki) // args.docs)]]
    embed = HuggingFaceEmbedding(model_name=str(minilm_path()), device="cpu")
    storage = StorageContext.from_defaults(vector_store=FaissVectorStore(faiss_index=faiss.IndexFlatIP(384)))
    index = VectorStoreIndex.from_documents(docs, storage_context=storage, embed_model=embed)

    # 2. the compressor's session: latent store on disk, shared by postprocessor and LLM
    store = LatentStore(os.path.join(tempfile.gettempdir(), "semidyn-example-latents.sqlite"))
    session = CompressionSession(comp, store)
    pp = SemiDynamicCompressPostprocessor(session=session, scale=args.scale)
    llm = SemiDynamicLLM(session=session, max_new_tokens=48)
    engine = index.as_query_engine(llm=llm, node_postprocessors=[pp], similarity_top_k=3,
                                   response_mode=args.mode, streaming=args.stream)

    question = f"What is {docs[0].metadata['title']}?"
    print("Q:", question)
    response = engine.query(question)
    if args.stream:
        print("A: ", end="", flush=True)
        for piece in response.response_gen:
            print(piece, end="", flush=True)
        print()
    else:
        print("A:", response.response.strip())
    for n in response.source_nodes:
        m = n.node.metadata
        print(f"  [{n.score:.2f}] {m['title']!r}: {m['semidyn_n_tokens']} tokens -> "
              f"{m.get('semidyn_n_latents', 'text')} latents, factor {m.get('semidyn_factor')}")
    u = llm.last_usage
    print(f"prefill {u['prefill_positions']} positions vs {u['uncompressed_tokens']} as text "
          f"(saved {u['saved_tokens']}); latent slots {u['latent_slots']}")

    # the same engine, asynchronously; the second query reads every chunk from the cache
    again = asyncio.run(engine.aquery(question)) if not args.stream else None
    if again is not None:
        print("aquery, all chunks from cache:", all(n.node.metadata["semidyn_cache_hit"] for n in again.source_nodes))
    store.close()


if __name__ == "__main__":
    main()
