"""LlamaIndex side by side: the node postprocessors a RAG developer could pick, one index, one LLM.

One ``VectorStoreIndex`` over Wikipedia lead summaries (the demo corpus, reserved half: never
trained on; MiniLM embeddings), the same retriever (top k=5), the same QA template and the same
SmolLM2 decoder, greedy. Setups, each a real LlamaIndex postprocessor in the ordinary
retrieve -> postprocess -> synthesize path:

* ``none``: the nodes as text;
* ``sentence_optimizer``: llama-index-core's ``SentenceEmbeddingOptimizer`` (MiniLM), keeping a
  quarter of each node's sentences (``percentile_cutoff=0.25``, neighbour sentences off);
* ``longllmlingua``: ``LongLLMLinguaPostprocessor`` (llama-index-postprocessor-longllmlingua)
  scoring with SmolLM2 itself, ``rate=0.25``, question-aware (contrastive perplexity);
* ``semidyn``: ``SemiDynamicCompressPostprocessor`` + the latent-reading LLM, features
  precompressed in a latent store (the deployment pattern); ``semidyn_cold`` is the same with an
  empty store, so every node is encoded at query time.

Text setups decode with the base SmolLM2 (adapters off: the LLM a user would run); the semidyn
setups with the compressor's decoder reading latents. Per query: the answer, the prefill
positions, and the latency split into retrieve / compress / prefill / decode (prefill = up to
the first new token). Setups run interleaved per question after one warm-up query each.
Writes ``llamaindex_peers.json``, ``llamaindex_peers.png`` and prints a Markdown table.

    python -m benchmarks.llamaindex_peers [--model embedded|tiny] [--quick] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from .common import Run, add_common_arguments, configure_threads, load_compressor, pyplot, save_plot, table

# Questions on articles of the reserved half (never trained on), with the word a right answer
# contains and the article that holds it (always indexed, among every ``stride``-th other summary).
QUESTIONS = [
    ("In which city is the Eiffel Tower?", "Paris", "Eiffel Tower"),
    ("Who developed the theory of relativity?", "Einstein", "Albert Einstein"),
    ("Which planet is known as the Red Planet?", "Mars", "Mars"),
    ("What is the largest ocean on Earth?", "Pacific", "Pacific Ocean"),
    ("Who painted the Mona Lisa?", "Leonardo", "Mona Lisa"),
    ("Who formulated the laws of motion and universal gravitation?", "Newton", "Isaac Newton"),
    ("In which country is the Great Wall?", "China", "Great Wall of China"),
    ("What is the capital of Japan?", "Tokyo", "Tokyo"),
    ("What nationality was the composer Ludwig van Beethoven?", "German", "Ludwig van Beethoven"),
    ("In which year did Marie Curie share a Nobel Prize?", "1903", "Marie Curie"),
    ("What nationality was the painter Pablo Picasso?", "Spanish", "Pablo Picasso"),
    ("What is the capital of Germany?", "Berlin", "Berlin"),
    ("Who was the 16th president of the United States?", "Lincoln", "Abraham Lincoln"),
    ("In which city is the Taj Mahal?", "Agra", "Taj Mahal"),
    ("On the bank of which river does the Taj Mahal stand?", "Yamuna", "Taj Mahal"),
    ("Which spaceflight first landed humans on the Moon?", "Apollo 11", "Apollo 11"),
    ("In which country is Machu Picchu?", "Peru", "Machu Picchu"),
    ("Which is the smallest of the world's five oceans?", "Arctic", "Arctic Ocean"),
    ("Which planet is the sixth from the Sun?", "Saturn", "Saturn"),
    ("What is the longest continental mountain range in the world?", "Andes", "Andes"),
]
QA_TEMPLATE = "Context:\n{context_str}\n\nQuestion: {query_str} Answer briefly."
SETUPS = ("none", "sentence_optimizer", "longllmlingua", "semidyn", "semidyn_cold")
TARGET_RATE = 0.25  # the text peers keep a quarter, about the semi-dynamic default's 4-5x


def corpus_documents(stride: int, titles: list[str]) -> list:
    """Every ``stride``-th reserved summary plus the questions' articles, as LlamaIndex documents."""
    from llama_index.core import Document

    from semidyn_rag.embedded import demo_corpus

    docs = demo_corpus(split="reserved")
    keep = [d for i, d in enumerate(docs) if i % stride == 0 or d["title"] in titles]
    return [Document(text=d["text"], metadata={"title": d["title"]}, excluded_llm_metadata_keys=["title"])
            for d in keep]


def timed_llm_class():
    """``SemiDynamicLLM`` whose calls record prefill positions and the prefill / decode split.

    It answers through the same session splice as ``SemiDynamicLLM`` and the eval's timed
    greedy decode; ``base=True`` reads with the base decoder (adapters off).
    """
    from llama_index.core.base.llms.types import CompletionResponse
    from llama_index.core.llms.callbacks import llm_completion_callback
    from llama_index.llms.semidyn_rag import SemiDynamicLLM

    from semidyn_rag.evaluation.decoding import timed_generate

    class TimedLLM(SemiDynamicLLM):
        base: bool = False
        calls: list = []

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs) -> CompletionResponse:
            ids, contexts, usage = self.session.splice(prompt)
            comp = self.session.compressor
            gen = timed_generate(comp.decoder, ids, [c.latents for c in contexts],
                                 max_new_tokens=self.max_new_tokens, base=self.base)
            self.calls.append({"prefill_positions": gen.prefill_tokens, "prefill_s": gen.prefill_s,
                               "decode_s": gen.decode_s, "latent_slots": usage.latent_slots,
                               "uncompressed_tokens": usage.uncompressed_tokens})
            return CompletionResponse(text=gen.text)

    return TimedLLM


def build_setups(comp, index, embed, scorer: str, max_new_tokens: int, store) -> dict:
    """{setup: factory of (retriever, postprocessor or None, llm)}: one retriever and template for all.

    The semidyn factories make a fresh session per query, so each query reads its features
    from ``store`` (``semidyn``: a latent-store read) or encodes them (``semidyn_cold``: no store).
    """
    from llama_index.core.postprocessor import SentenceEmbeddingOptimizer
    from llama_index.postprocessor.longllmlingua import LongLLMLinguaPostprocessor
    from llama_index.postprocessor.semidyn_rag import SemiDynamicCompressPostprocessor

    from semidyn_rag import CompressionSession
    from semidyn_rag.evaluation.peers import longllmlingua_kwargs, offline_text_tools

    TimedLLM = timed_llm_class()

    class SingleWindowLongLLMLingua(LongLLMLinguaPostprocessor):
        """The real postprocessor; each query gets one scoring window over its joined nodes
        (``peers.longllmlingua_kwargs``: llmlingua 0.2.2's windows break on transformers 5)."""

        def _postprocess_nodes(self, nodes, query_bundle=None):
            joined = "".join(n.node.get_content() for n in nodes)  # as the postprocessor joins them
            kw = longllmlingua_kwargs(self._llm_lingua, query_bundle.query_str, [joined])
            kw.pop("rank_method")
            kw["concate_question"] = True  # the postprocessor splits instruction / text / question
            self.additional_compress_kwargs = {"rate": TARGET_RATE, **kw}
            return super()._postprocess_nodes(nodes, query_bundle)

    with offline_text_tools():
        lingua_pp = SingleWindowLongLLMLingua(model_name=scorer, device_map=str(comp.device),
                                              model_config={"trust_remote_code": False})
        optimizer = SentenceEmbeddingOptimizer(embed_model=embed, percentile_cutoff=TARGET_RATE,
                                               context_before=0, context_after=0)
    retriever = index.as_retriever(similarity_top_k=5)

    def text(pp):
        llm = TimedLLM(session=CompressionSession(comp), max_new_tokens=max_new_tokens, base=True)
        return lambda: (retriever, pp, llm)

    def semidyn(backing):
        def make():
            session = CompressionSession(comp, backing)
            return (retriever, SemiDynamicCompressPostprocessor(session=session, scale=0.0, min_chunk_tokens=8),
                    TimedLLM(session=session, max_new_tokens=max_new_tokens))
        return make

    return {"none": text(None), "sentence_optimizer": text(optimizer), "longllmlingua": text(lingua_pp),
            "semidyn": semidyn(store), "semidyn_cold": semidyn(None)}


def run_query(setup, question: str, template) -> dict:
    """retrieve -> postprocess -> synthesize, each timed; the LLM records prefill and decode."""
    from llama_index.core import get_response_synthesizer
    from llama_index.core.schema import QueryBundle

    retriever, pp, llm = setup
    query = QueryBundle(question)
    t0 = time.perf_counter()
    nodes = retriever.retrieve(query)
    t1 = time.perf_counter()
    if pp is not None:  # on copies: the postprocessors rewrite node text in place
        nodes = pp.postprocess_nodes([n.model_copy(deep=True) for n in nodes], query_bundle=query)
    t2 = time.perf_counter()
    llm.calls = []
    synth = get_response_synthesizer(llm=llm, text_qa_template=template, response_mode="compact")
    response = synth.synthesize(question, nodes)
    calls = llm.calls
    return {"answer": str(response).strip(), "retrieve_s": t1 - t0, "compress_s": t2 - t1,
            "total_s": time.perf_counter() - t0,
            "prefill_s": sum(c["prefill_s"] for c in calls), "decode_s": sum(c["decode_s"] for c in calls),
            "prefill_positions": sum(c["prefill_positions"] for c in calls), "llm_calls": len(calls),
            "latent_slots": sum(c["latent_slots"] for c in calls)}


def summarise(name: str, rows: list[dict]) -> dict:
    """Per query: median latencies in ms (a stray slow query on a shared machine moves a mean, not
    a median), mean prefill positions and new tokens, and how many answers hold the expected word."""
    median = lambda k: 1000 * statistics.median(r[k] for r in rows)  # noqa: E731
    out = {"setup": name, "correct": sum(r["correct"] for r in rows), "questions": len(rows),
           "prefill_positions": statistics.mean(r["prefill_positions"] for r in rows)}
    for k in ("retrieve", "compress", "prefill", "decode"):
        out[f"{k}_ms"] = median(f"{k}_s")
    out["total_ms"] = median("total_s")
    return out


def plot(summary: list[dict], out_dir) -> Path:
    """Stacked latency per setup (retrieve, compress, prefill, decode), prefill positions annotated."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = [s["setup"] for s in summary]
    bottom = [0.0] * len(summary)
    for k, color in (("retrieve", "#999999"), ("compress", "#d62728"), ("prefill", "#1f77b4"), ("decode", "#2ca02c")):
        vals = [s[f"{k}_ms"] / 1000 for s in summary]
        ax.bar(names, vals, bottom=bottom, label=k, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, s in enumerate(summary):
        ax.text(i, bottom[i], f"{s['prefill_positions']:.0f} pos\n{s['correct']}/{s['questions']} right",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per query (median of each part)")
    ax.set_ylim(0, max(bottom) * 1.25)
    ax.set_title("LlamaIndex, k=5, same SmolLM2: latency per query by postprocessor")
    ax.legend(fontsize=8)
    return save_plot(fig, "llamaindex_peers", out_dir)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--stride", type=int, default=100, help="index every N-th reserved summary (plus the "
                    "questions' articles; default 100: about 55 documents)")
    ap.add_argument("--scorer", help="LongLLMLingua's causal LM (default: the decoder's base model)")
    args = ap.parse_args(argv)
    threads = configure_threads(args.threads)
    questions = QUESTIONS[:2] if args.quick else QUESTIONS

    from llama_index.core import PromptTemplate, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    from semidyn_rag import CompressionSession, LatentStore
    from semidyn_rag.evaluation.metrics import substring_match
    from semidyn_rag.evaluation.peers import default_scorer, make_embedding, offline_text_tools

    with tempfile.TemporaryDirectory(prefix="semidyn-li-peers-") as tmp:
        tmp = Path(tmp)
        comp, described = load_compressor(args.model, tmp)
        embed = make_embedding()
        docs = corpus_documents(args.stride, [t for _, _, t in questions])
        with offline_text_tools():  # the splitter counts tokens with tiktoken's cl100k_base
            index = VectorStoreIndex.from_documents(
                docs, embed_model=embed, transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=0)])
        scorer = args.scorer or default_scorer(comp)
        with LatentStore(tmp / "latents.sqlite") as store:
            # every node's features in the store, as `precompress` leaves a corpus
            CompressionSession(comp, store).compress_chunks([n.get_content() for n in index.docstore.docs.values()])
            setups = build_setups(comp, index, embed, scorer, args.max_new_tokens, store)
            template = PromptTemplate(QA_TEMPLATE)
            run = Run("llamaindex_peers", {"model": args.model, "compressor": described, "k": 5, "threads": threads,
                                           "max_new_tokens": args.max_new_tokens, "documents": len(docs),
                                           "nodes": len(index.docstore.docs), "scorer": str(scorer),
                                           "text_peers_keep": TARGET_RATE, "questions": len(questions)})
            for make in setups.values():  # one untimed query each: first-call costs stay out of the timings
                run_query(make(), "What is the capital of France?", template)
            rows: dict[str, list[dict]] = {name: [] for name in setups}
            for question, expected, _ in questions:  # interleaved: load changes hit every setup alike
                for name, make in setups.items():
                    embed.clear()  # every setup embeds the query (and the optimizer its sentences) afresh
                    r = run_query(make(), question, template)
                    r.update(question=question, expected=expected, correct=substring_match(r["answer"], [expected]))
                    rows[name].append(r)
                    print(f"[{name}] {question} -> {r['answer'][:60]!r} ({r['prefill_positions']} positions)")
        summary = [summarise(name, rs) for name, rs in rows.items()]
        base = summary[0]["prefill_positions"]
        for s in summary:
            s["fewer_positions_than_none"] = base / s["prefill_positions"]
        print(table(summary, [("setup", "setup", ""), ("correct", "right", "d"), ("prefill_positions", "prefill pos", ".0f"),
                              ("fewer_positions_than_none", "x fewer", ".2f"), ("retrieve_ms", "retrieve ms", ".0f"),
                              ("compress_ms", "compress ms", ".0f"), ("prefill_ms", "prefill ms", ".0f"),
                              ("decode_ms", "decode ms", ".0f"), ("total_ms", "total ms", ".0f")]))
        run.results.update(summary=summary, queries=rows)
        if not args.no_plot:
            plot(summary, args.out)
        return run.finish(args.out)


if __name__ == "__main__":
    main()
