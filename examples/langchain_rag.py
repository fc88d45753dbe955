"""A LangChain RAG chain on semidyn-rag: corpus retriever -> document compressor -> latent-reading chat model.

1. builds (or reuses) a corpus directory with ``precompress``: by default the one ``make demo``
   builds over Wikipedia lead summaries, with the embedded default compressor;
2. runs an LCEL chain: ``SemiDynamicCorpusRetriever`` -> ``SemiDynamicDocumentCompressor`` ->
   ``ChatPromptTemplate`` -> ``ChatSemiDynamic`` (the decoder reads each document as latents);
3. prints, for each question: the answer, the sources with the factor chosen per document, and the
   prefill positions (``usage_metadata["input_tokens"]``) against the same chain reading the
   documents as text (whose answer is shown too).

    python examples/langchain_rag.py [--compressor CKPT] [--docs DOCS.jsonl] [--question Q ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The prompt the compressor was trained on: numbered contexts, then the question.
TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"


def format_docs(docs) -> str:
    return "\n".join(f"[{i + 1}] {d.page_content}" for i, d in enumerate(docs))


def build_chain(retriever, llm, compressor=None):
    """question -> {"docs", "question", "answer": AIMessage}; without ``compressor`` the documents stay text."""
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

    def retrieve(question: str):
        docs = retriever.invoke(question)
        return compressor.compress_documents(docs, question) if compressor else docs

    async def aretrieve(question: str):
        docs = await retriever.ainvoke(question)
        return await compressor.acompress_documents(docs, question) if compressor else docs

    prompt = ChatPromptTemplate.from_messages([("human", TEMPLATE)])
    to_prompt = RunnableLambda(lambda x: {"context": format_docs(x["docs"]), "question": x["question"]})
    return RunnableParallel(docs=RunnableLambda(retrieve, afunc=aretrieve), question=RunnablePassthrough()).assign(
        answer=to_prompt | prompt | llm)


def source_line(doc) -> str:
    m = doc.metadata
    how = (f"{m['semidyn_n_tokens']} tokens -> {m['semidyn_n_latents']} latents (factor {m['semidyn_factor']}"
           f"{', cache hit' if m.get('semidyn_cache_hit') else ''})" if m.get("semidyn_compressed")
           else f"text ({m.get('semidyn_reason')})")
    return f"   [{m['score']:.2f}] {m.get('title', doc.id[:8])!r}: {how}"


def main(argv: list[str] | None = None) -> int:
    demo = runpy.run_path(str(Path(__file__).with_name("demo.py")))  # its corpus and questions, not its main
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressor", help="checkpoint folder (default: the embedded default)")
    ap.add_argument("--docs", help="JSONL documents (default: the demo's Wikipedia summaries)")
    ap.add_argument("--work", help="folder for the corpus directory (default: the demo's cache)")
    ap.add_argument("--question", action="append", help="ask this (repeatable; default: the demo's five)")
    ap.add_argument("-k", type=int, default=3, help="documents per question")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from langchain_semidyn_rag import ChatSemiDynamic, SemiDynamicCorpusRetriever, SemiDynamicDocumentCompressor

    from semidyn_rag import SemiDynamicCompressor
    from semidyn_rag.corpus import CorpusDirectory, precompress
    from semidyn_rag.embedded import cache_dir, minilm_path
    from semidyn_rag.session import CompressionSession

    t0 = time.perf_counter()
    if args.compressor:
        ckpt = Path(args.compressor)
    else:
        from semidyn_rag.default_compressor import default_compressor_path

        ckpt, trained = default_compressor_path()
        print(demo["describe_card"](ckpt / "card.json") if trained else "NOTE: the embedded compressor is NOT trained.",
              "\n")
    comp = SemiDynamicCompressor.from_pretrained(str(ckpt))
    work = Path(args.work) if args.work else cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    if args.docs:
        docs, corpus_dir = Path(args.docs), work / f"corpus-{Path(args.docs).stem}"
    else:  # the same files as `make demo` (the reserved half), so either one reuses the other's corpus
        docs, corpus_dir = demo["demo_files"](work, 100)
    stats = precompress(docs, corpus_dir, comp, compressor_path=str(ckpt), embedder=str(minilm_path()))
    print(stats.summary(), "\n")

    corpus = CorpusDirectory(corpus_dir)
    retriever = SemiDynamicCorpusRetriever(corpus=corpus, k=args.k)
    compressor = SemiDynamicDocumentCompressor(session=CompressionSession(comp, corpus.store), min_chunk_tokens=8)
    llm = ChatSemiDynamic(session=compressor.session, max_tokens=args.max_new_tokens)
    chain = build_chain(retriever, llm, compressor)
    # the same chain reading the documents as text: its own session has no compressed documents
    text_llm = ChatSemiDynamic(session=CompressionSession(comp), max_tokens=args.max_new_tokens)
    text_chain = build_chain(retriever, text_llm)

    total_c = total_u = 0
    for q in args.question or demo["QUESTIONS"]:
        out, plain = chain.invoke(q), text_chain.invoke(q)
        n_c, n_u = out["answer"].usage_metadata["input_tokens"], plain["answer"].usage_metadata["input_tokens"]
        print(f"Q: {q}")
        print(f"A (compressed):   {out['answer'].content.strip()}")
        print(f"A (uncompressed): {plain['answer'].content.strip()}")
        for d in out["docs"]:
            print(source_line(d))
        print(f"   prefill: {n_c} positions compressed vs {n_u} as text ({n_u / n_c:.1f}x fewer)\n")
        total_c += n_c
        total_u += n_u
    print(f"All questions: {total_c} vs {total_u} prefill positions ({total_u / total_c:.1f}x); "
          f"took {time.perf_counter() - t0:.0f} s.")
    corpus.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
