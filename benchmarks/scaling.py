"""Scaling: precompression time, store size and query latency from 1k to 100k chunks.

A generated topical corpus (one chunk per document) is precompressed with ``precompress``
(chunking, chunk table, embeddings, FAISS index, encoder features into the latent store) at
each size, then queried through ``CorpusDirectory``: search (query embedding + FAISS + chunk
table) and latent read (store read + derive + projector). Time and size should grow linearly
with the corpus (constant per chunk); query latency should stay flat apart from the exact
(``flat``) index's linear scan, which is where ``ivf`` and ``hnsw`` come in: they are built on
the same vectors and shown with their recall@k against the exact search, and beyond the
largest corpus on index-only vector sets.

The default model is the tiny random test model (2 layers, 64-d), so 100k chunks take
minutes on 2 cores: encoder cost per chunk is what ``throughput`` measures; this benchmark is
about what grows with the corpus. The retrieval embedder is signed feature hashing (a neural
embedder would dominate the build time at 100k chunks and say nothing about compression).

    python -m benchmarks.scaling [--quick] [--sizes 1000,10000,100000] [--beyond 300000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import (
    HashingEmbedder,
    Run,
    TextGenerator,
    add_common_arguments,
    configure_threads,
    int_list,
    load_compressor,
    measure,
    pyplot,
    save_plot,
    table,
)

K = 5
IVF_WIDE_NPROBE = 32


def write_corpus(path: Path, n: int, words: int, gen: TextGenerator) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc{i}", "text": gen.document(i, words)}) + "\n")


def index_rows_for(kind: str, vectors: np.ndarray, queries: np.ndarray, kth: np.ndarray | None,
                   targets: list[int], reps: int) -> list[dict]:
    """Build an index of ``kind`` over ``vectors``: build time, search latency, recall@K against the
    exact search, and how often each known-item query finds its document in the top K. IVF is
    also searched with more cells probed (``IVF_WIDE_NPROBE``), the knob that buys its recall back.

    Recall is tie-aware: a result counts when its true score reaches the exact K-th score
    (``kth``, one per query), since generated text has many equally similar chunks and which
    of them an exact search lists is arbitrary.
    """
    import faiss

    from semidyn_rag.corpus import IndexParams, build_index
    from semidyn_rag.corpus.index import search

    params = IndexParams(kind=kind)
    t0 = time.perf_counter()
    index = build_index(vectors, params)
    build_s = time.perf_counter() - t0
    settings = [(kind, params.nprobe if kind == "ivf" else None)]
    if kind == "ivf":
        settings.append((f"ivf nprobe={IVF_WIDE_NPROBE}", IVF_WIDE_NPROBE))
    out = []
    for name, nprobe in settings:
        if nprobe is not None:
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(nprobe, ivf.nlist)
        lat = [measure(lambda q=q: search(index, q[None, :], K), warmup=1, reps=reps).median for q in queries]
        scores, ids = search(index, queries, K)
        recall = None
        if kth is not None:
            true = np.where(ids >= 0, np.einsum("qd,qkd->qk", queries, vectors[np.maximum(ids, 0)]), -np.inf)
            recall = float(np.mean(true >= kth[:, None] - 1e-5))
        found = float(np.mean([t in set(row) for t, row in zip(targets, ids)]))
        out.append({"kind": name, "vectors": len(vectors), "build_s": build_s,
                    "search_ms": statistics.median(lat) * 1e3, "search_p90_ms": float(np.percentile(lat, 90)) * 1e3,
                    "recall_at_k": recall, "known_item_at_k": found, "kth": scores[:, -1]})
    return out


def approximate(n: int, hnsw_max: int) -> list[str]:
    """The approximate index kinds built at ``n`` vectors (HNSW construction is the slow one)."""
    return ["ivf", "hnsw"] if n <= hnsw_max else ["ivf"]


def run(args) -> dict:
    import faiss

    from semidyn_rag.corpus import CorpusDirectory, IndexParams, precompress

    threads = configure_threads(args.threads)
    faiss.omp_set_num_threads(threads)
    quick = args.quick
    sizes = int_list(args.sizes) if args.sizes else ([1000, 10000] if quick else [1000, 10000, 100000])
    beyond = int_list(args.beyond) if args.beyond is not None else ([] if quick else [300000])
    n_queries = args.queries or (50 if quick else 100)
    hnsw_max = args.hnsw_max if args.hnsw_max is not None else (10000 if quick else 100000)
    reps = args.reps or 3
    gen = TextGenerator(seed=0)
    work_root = Path(args.workdir) if args.workdir else None
    with tempfile.TemporaryDirectory(dir=work_root) as work:
        work = Path(work)
        comp, model_desc = load_compressor(args.model, work)
        probe = [len(x) for x in comp.encoder.tokenize([gen.document(i, args.words) for i in range(50)])]
        chunk_tokens = min(comp.encoder.max_tokens, max(probe) * 3 // 2)  # one chunk per document
        settings = {"model": model_desc, "threads": threads, "sizes": sizes, "beyond": beyond, "hnsw_max": hnsw_max, "k": K,
                    "queries": n_queries, "words_per_doc": args.words, "chunk_tokens_budget": chunk_tokens,
                    "batch_size": args.batch_size, "embedder": HashingEmbedder().name, "store_dtype": "float16",
                    "index_params": {kind: IndexParams(kind=kind).model_dump() for kind in ("flat", "ivf", "hnsw")}}
        rec = Run("scaling", settings)
        print(f"scaling: {sizes} chunks (+ index-only {beyond}), {model_desc}, {threads} thread(s), "
              f"load {rec.machine['loadavg'][0]:.2f}")
        embedder = HashingEmbedder()
        rows, index_rows = [], []
        for n in sizes:
            targets = [(i * 7919 + 13) % n for i in range(n_queries)]  # known items: doc i is chunk i
            queries = [gen.query(t, 6, args.words) for t in targets]
            qvecs = embedder.embed(queries)
            corpus = work / f"corpus-{n}.jsonl"
            out = work / f"dir-{n}"
            write_corpus(corpus, n, args.words, gen)
            stats = precompress(corpus, out, comp, embedder=embedder, batch_size=args.batch_size,
                                chunk_tokens=chunk_tokens, progress=not args.no_progress)
            if stats.chunks != n:
                raise RuntimeError(f"{n} documents gave {stats.chunks} chunks; the known-item queries need one "
                                   "chunk per document (use fewer --words)")
            with CorpusDirectory(out, embedder=embedder, readonly_store=True) as cd:
                for q in queries[:3]:  # load index, table and store connection
                    cd.contexts(cd.search(q, K), comp)
                search_t, read_t, derive_t, faiss_t = [], [], [], []
                from semidyn_rag.corpus.index import search as index_search

                for q, v in zip(queries, qvecs):
                    t0 = time.perf_counter()
                    hits = cd.search(q, K)
                    t1 = time.perf_counter()
                    fetched = cd.features(hits, comp)
                    t2 = time.perf_counter()
                    comp.compress_features(fetched.features, scale=cd.manifest.scale)
                    t3 = time.perf_counter()
                    index_search(cd.index, v[None, :], K)
                    t4 = time.perf_counter()
                    if fetched.encoded:
                        raise RuntimeError(f"{fetched.encoded} retrieved chunks were not in the store")
                    search_t.append(t1 - t0)
                    read_t.append(t2 - t1)
                    derive_t.append(t3 - t2)
                    faiss_t.append(t4 - t3)
                vectors = cd.index.reconstruct_n(0, cd.index.ntotal)
            total = [a + b + c for a, b, c in zip(search_t, read_t, derive_t)]
            row = {
                "chunks": stats.chunks, "tokens": stats.tokens, "precompress_s": stats.seconds,
                "encode_s": stats.encode_seconds, "other_s": stats.seconds - stats.encode_seconds,
                "ms_per_chunk": stats.seconds / stats.chunks * 1e3,
                "store_bytes": stats.bytes_on_disk["store"], "index_bytes": stats.bytes_on_disk["index"],
                "chunks_bytes": stats.bytes_on_disk["chunks"], "total_bytes": stats.bytes_on_disk["total"],
                "store_bytes_per_chunk": stats.bytes_on_disk["store"] / stats.chunks,
                "payload_bytes_per_chunk": stats.store_payload_bytes / stats.chunks,
                "query_ms": statistics.median(total) * 1e3, "query_p90_ms": float(np.percentile(total, 90)) * 1e3,
                "search_ms": statistics.median(search_t) * 1e3, "faiss_ms": statistics.median(faiss_t) * 1e3,
                "store_read_ms": statistics.median(read_t) * 1e3,
                "derive_project_ms": statistics.median(derive_t) * 1e3,
            }
            rows.append(row)
            print(f"  {n:>7} chunks: precompress {row['precompress_s']:.1f} s ({row['ms_per_chunk']:.2f} ms/chunk), "
                  f"store {row['store_bytes'] / 1e6:.1f} MB, query {row['query_ms']:.2f} ms "
                  f"(FAISS {row['faiss_ms']:.3f} ms, store read {row['store_read_ms']:.2f} ms, "
                  f"derive + projector {row['derive_project_ms']:.2f} ms)")
            (flat,) = index_rows_for("flat", vectors, qvecs, None, targets, reps)
            index_rows.append(flat)
            for kind in approximate(n, hnsw_max):
                index_rows += index_rows_for(kind, vectors, qvecs, flat["kth"], targets, reps)
            shutil.rmtree(out)
            corpus.unlink()
        for n in beyond:  # index-only: vectors of a larger generated corpus
            vectors = embedder.embed([gen.document(i, args.words) for i in range(n)])
            targets = [(i * 7919 + 13) % n for i in range(n_queries)]
            qvecs = embedder.embed([gen.query(t, 6, args.words) for t in targets])
            first = len(index_rows)
            (flat,) = index_rows_for("flat", vectors, qvecs, None, targets, reps)
            index_rows.append(flat)
            for kind in approximate(n, hnsw_max):
                index_rows += index_rows_for(kind, vectors, qvecs, flat["kth"], targets, reps)
            print(f"  {n:>7} vectors (index only): " + ", ".join(
                f"{r['kind']} {r['search_ms']:.3f} ms" for r in index_rows[first:]))
            del vectors

    base = rows[0]
    for r in rows:
        r["time_per_chunk_vs_smallest"] = r["ms_per_chunk"] / base["ms_per_chunk"]
        r["store_per_chunk_vs_smallest"] = r["store_bytes_per_chunk"] / base["store_bytes_per_chunk"]
        r["query_vs_smallest"] = r["query_ms"] / base["query_ms"]
    for r in index_rows:
        r.pop("kth", None)
    print(table(rows, [("chunks", "chunks", ",d"), ("tokens", "tokens", ",d"), ("precompress_s", "precompress s", ".1f"),
                       ("ms_per_chunk", "ms/chunk", ".3f"), ("store_bytes_per_chunk", "store B/chunk", ",.0f"),
                       ("total_bytes", "directory bytes", ",d"), ("query_ms", "query ms", ".2f"),
                       ("search_ms", "search ms", ".3f"), ("faiss_ms", "FAISS ms", ".3f"),
                       ("store_read_ms", "store read ms", ".3f"), ("derive_project_ms", "derive+proj. ms", ".3f")]))
    print(table(index_rows, [("vectors", "vectors", ",d"), ("kind", "index", ""), ("build_s", "build s", ".2f"),
                             ("search_ms", "search ms", ".3f"), ("search_p90_ms", "p90 ms", ".3f"),
                             ("recall_at_k", f"recall@{K} vs flat", ".3f"),
                             ("known_item_at_k", f"known item in top {K}", ".3f")]))
    rec.results = {"rows": rows, "indexes": index_rows,
                   "linearity": {"time_per_chunk_largest_vs_smallest": rows[-1]["time_per_chunk_vs_smallest"],
                                 "store_per_chunk_largest_vs_smallest": rows[-1]["store_per_chunk_vs_smallest"],
                                 "query_largest_vs_smallest": rows[-1]["query_vs_smallest"]}}
    if not args.no_plot:
        plot(rows, index_rows, args.out)
    return rec.finish(args.out)


def plot(rows: list[dict], index_rows: list[dict], out_dir) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    n = [r["chunks"] for r in rows]
    axes[0].loglog(n, [r["precompress_s"] for r in rows], "-o", label="precompress (s)")
    axes[0].loglog(n, [r["encode_s"] for r in rows], "--o", label="of which encoding (s)")
    axes[0].loglog(n, [r["store_bytes"] / 1e6 for r in rows], "-s", label="store (MB)")
    axes[0].loglog(n, [r["total_bytes"] / 1e6 for r in rows], "--s", label="directory (MB)")
    axes[0].set_xlabel("chunks")
    axes[0].set_title("build time and size")
    axes[0].legend(fontsize=8)
    axes[1].semilogx(n, [r["query_ms"] for r in rows], "-o", label="query total")
    axes[1].semilogx(n, [r["search_ms"] for r in rows], "--o", label="search (embed + FAISS flat + table)")
    axes[1].semilogx(n, [r["store_read_ms"] for r in rows], ":o", label="latent store read")
    axes[1].semilogx(n, [r["derive_project_ms"] for r in rows], "-.o", label="derive + projector")
    axes[1].set_xlabel("chunks")
    axes[1].set_ylabel("ms (median)")
    axes[1].set_title("query latency, flat index")
    axes[1].legend(fontsize=8)
    for kind, style in (("flat", "-o"), ("ivf", "-s"), (f"ivf nprobe={IVF_WIDE_NPROBE}", "--s"), ("hnsw", "-^")):
        sel = [r for r in index_rows if r["kind"] == kind]
        axes[2].loglog([r["vectors"] for r in sel], [r["search_ms"] for r in sel], style, label=kind)
    axes[2].set_xlabel("vectors")
    axes[2].set_ylabel("search ms (median, k=5)")
    axes[2].set_title("FAISS search by index kind")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    save_plot(fig, "scaling", out_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    add_common_arguments(p, default_model="tiny")
    p.add_argument("--sizes", default=None, help="corpus sizes in chunks (default 1000,10000,100000; quick 1000,10000)")
    p.add_argument("--beyond", default=None, help="index-only sizes past the largest corpus (default 300000; quick none)")
    p.add_argument("--hnsw-max", type=int, default=None,
                   help="largest size with an HNSW index (its build takes minutes per 100k vectors on 2 cores; "
                        "default 100000, quick 10000)")
    p.add_argument("--queries", type=int, default=None, help="queries per size (default 100, quick 50)")
    p.add_argument("--words", type=int, default=8, help="words per generated document (one chunk each)")
    p.add_argument("--batch-size", type=int, default=64, help="precompress batch size")
    p.add_argument("--workdir", default=None, help="where the temporary corpora go (default: system temp)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
