"""The latent cache: reading features from the store against recomputing them, and bytes per chunk.

The store keeps finest-factor window means (factor 2: about n/2 rows of the encoder width, fp16)
so any scale can be derived at read time. This measures, for chunks of about 150 tokens:

* hit path: ``LatentStore.get_many`` (SQLite read, checksum, fp16 -> fp32) in batches of
  1 / 5 / 50 / 500 keys, and the same plus ``compress_features`` (derive + projector), i.e.
  decoder-ready latents;
* miss path: ``encode`` (and ``compress``) of the same chunks, the work a hit saves;
* where a read's time goes (SQLite fetch, checksum, decode) and what would read faster: an
  in-memory LRU in front of the store (what ``CompressionSession`` keeps), skipping the fp32
  cast, and entries holding fewer rows (factor-8 means: 4x fewer bytes, but finer scales lost);
* bytes per chunk: raw text, the store entry (payload and on-disk share), the projected latents,
  and the decoder's KV cache for the same chunk (2 x layers x kv heads x head dim x tokens x bytes),
  which is what KV-reuse systems store.

Targets: store reads >= 100x faster than re-encoding and >= 10,000 chunks/s.

    python -m benchmarks.cache [--quick] [--entries 2000] [--tokens 150]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sqlite3
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

from .common import (
    Run,
    add_common_arguments,
    configure_threads,
    decoder_kv_bytes_per_token,
    load_compressor,
    measure,
    pyplot,
    save_plot,
    table,
    texts_of_tokens,
)

TARGET_SPEEDUP = 100
TARGET_RATE = 10_000


def synthetic_features(comp, n_tokens: int, finest: int, seed: int):
    """A ContextFeatures shaped like a real entry of ``n_tokens`` (reads do not depend on values)."""
    from semidyn_rag.types import ContextFeatures

    g = torch.Generator().manual_seed(seed)
    rows = math.ceil(n_tokens / finest)
    counts = torch.full((rows,), finest, dtype=torch.long)
    counts[-1] = n_tokens - finest * (rows - 1)
    feats = torch.randn(rows, comp.encoder.hidden_size, generator=g)
    return ContextFeatures(feats, counts, 3.0, n_tokens, comp.feature_fingerprint)


def coarser(features, factor: int, finest: int):
    """The same entry with window means at ``factor`` instead of ``finest`` (fewer rows)."""
    from dataclasses import replace

    g = torch.arange(features.features.shape[0]) // (factor // finest)
    m = int(g[-1]) + 1
    cnt = torch.zeros(m, dtype=torch.long).index_add_(0, g, features.counts)
    sums = torch.zeros(m, features.features.shape[1]).index_add_(0, g, features.features * features.counts[:, None])
    return replace(features, features=sums / cnt[:, None], counts=cnt)


def read_rate(fn_batch, keys: list[str], batch: int, reps: int) -> dict:
    """Chunks/s of reading ``keys`` in batches of ``batch`` (median over repetitions)."""
    groups = [keys[s : s + batch] for s in range(0, len(keys), batch)]
    t = measure(lambda: [fn_batch(g) for g in groups], warmup=1, reps=reps)
    return {"batch": batch, "chunks": len(keys), "chunks_s": len(keys) / t.median,
            "us_per_chunk": t.median / len(keys) * 1e6, "timing": t.to_dict()}


def run(args) -> dict:
    from semidyn_rag.store import LatentStore, chunk_key
    from semidyn_rag.store.latent_store import _COLUMNS
    from semidyn_rag.store.record import Record, check, unpack

    threads = configure_threads(args.threads)
    quick = args.quick
    n_entries = args.entries or (1000 if quick else 2000)
    n_tokens = args.tokens
    n_real = 4 if quick else 8
    reps = args.reps or (3 if quick else 5)
    reads = min(n_entries, 1000 if quick else 2000)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        comp, model_desc = load_compressor(args.model, work)
        fp = comp.feature_fingerprint
        finest = comp.pooling.candidates[0]
        real = texts_of_tokens(comp.encoder.tokenizer, n_real, n_tokens, seed=3)
        settings = {"model": model_desc, "threads": threads, "entries": n_entries, "chunk_tokens": n_tokens,
                    "real_chunks": n_real, "reads": reads, "reps": reps, "store_dtype": "float16",
                    "page_cache": "warm (the store file was just written)"}
        rec = Run("cache", settings)
        print(f"cache: {n_entries} entries of ~{n_tokens} tokens, {model_desc}, {threads} thread(s), "
              f"load {rec.machine['loadavg'][0]:.2f}")

        # miss path: what a hit saves
        t_enc = measure(lambda: comp.encode(real, batch_size=n_real), warmup=1, reps=max(2, reps // 2))
        t_cmp = measure(lambda: comp.compress(real, batch_size=n_real), warmup=0, reps=max(2, reps // 2))
        encode_rate, compress_rate = n_real / t_enc.median, n_real / t_cmp.median
        real_feats = comp.encode(real, batch_size=n_real)

        # the store: the real entries plus synthetic ones of the same shape
        store = LatentStore(work / "latents.sqlite")
        keys = [chunk_key(t) for t in real]
        store.put_many(zip(keys, real_feats))
        t0 = time.perf_counter()
        for s in range(0, n_entries - n_real, 500):
            part = range(s, min(s + 500, n_entries - n_real))
            items = [(hashlib.sha256(f"synthetic {i}".encode()).hexdigest(),
                      synthetic_features(comp, n_tokens, finest, i)) for i in part]
            store.put_many(items)
            keys += [k for k, _ in items]
        write_s = time.perf_counter() - t0
        stats = store.stats()
        rng = random.Random(0)
        sample = rng.sample(keys, reads)

        get = {b: read_rate(lambda g: store.get_many(g, fp), sample, b, reps) for b in (1, 5, 50, 500)}
        lat = {b: read_rate(lambda g: comp.compress_features(list(store.get_many(g, fp).values())), sample, b, reps)
               for b in (5, 50)}
        print("  store.get_many: " + ", ".join(f"batch {b}: {r['chunks_s']:,.0f}/s" for b, r in get.items()))

        # where the time of a 500-key read goes
        conn = sqlite3.connect(f"file:{work / 'latents.sqlite'}?mode=ro", uri=True)
        part = sample[:500]
        sql = f"SELECT {_COLUMNS} FROM entries WHERE fingerprint = ? AND key IN ({','.join('?' * len(part))})"
        rows = conn.execute(sql, [fp, *part]).fetchall()
        t_sql = measure(lambda: conn.execute(sql, [fp, *part]).fetchall(), warmup=1, reps=reps).median
        recs = [Record(*r) for r in rows]
        t_check = measure(lambda: [check(r) for r in recs], warmup=1, reps=reps).median
        t_unpack = measure(lambda: [unpack(r) for r in recs], warmup=1, reps=reps).median  # check + decode
        t_unpack16 = measure(lambda: [unpack(r, torch.float16) for r in recs], warmup=1, reps=reps).median
        conn.close()
        per = 1e6 / len(part)
        breakdown = {"sqlite_fetch_us": t_sql * per, "checksum_us": t_check * per,
                     "decode_fp32_us": (t_unpack - t_check) * per, "decode_fp16_us": (t_unpack16 - t_check) * per,
                     "get_many_us": get[500]["us_per_chunk"]}

        # what reads faster
        lru: OrderedDict = OrderedDict(store.get_many(keys[: min(len(keys), 4096)], fp))

        def lru_get(g):
            out = []
            for k in g:
                f = lru.get(k)
                if f is not None:
                    lru.move_to_end(k)
                out.append(f)
            return out

        in_lru = [k for k in sample if k in lru]
        alt = {
            "in-memory LRU (dict lookups)": read_rate(lru_get, in_lru, 5, reps),
            "get_many, fp16 kept (no fp32 cast)": read_rate(
                lambda g: store.get_many(g, fp, compute_dtype=torch.float16), sample, 500, reps),
        }
        coarse = LatentStore(work / "coarse.sqlite")
        for s in range(0, len(sample), 500):
            got = store.get_many(sample[s : s + 500], fp)
            coarse.put_many((k, coarser(f, 4 * finest, finest)) for k, f in got.items())
        alt["get_many, entries of 4x coarser means (4x fewer rows)"] = read_rate(lambda g: coarse.get_many(g, fp), sample, 500, reps)
        coarse_stats = coarse.stats()
        coarse.close()
        big = work / "pages64k.sqlite"
        with sqlite3.connect(big) as c:  # page size is fixed when the file is first written
            c.execute("PRAGMA page_size = 65536")
            c.execute("CREATE TABLE _init (a)")
            c.execute("DROP TABLE _init")
        paged = LatentStore(big)
        for s in range(0, len(sample), 500):
            paged.put_many(store.get_many(sample[s : s + 500], fp, compute_dtype=torch.float16).items())
        alt["get_many, 64 kB SQLite pages (no overflow chains)"] = read_rate(lambda g: paged.get_many(g, fp), sample, 500, reps)
        paged.close()
        main_file = (work / "latents.sqlite").stat().st_size
        store.close()

    # bytes per chunk
    dec_cfg = comp.decoder.model.config
    kv16 = decoder_kv_bytes_per_token(dec_cfg, 2)
    text_bytes = sum(len(t.encode("utf-8")) for t in real) / n_real
    mean_tokens = sum(f.n_tokens for f in real_feats) / n_real
    ctx = comp.compress_features(real_feats)
    mean_latents = sum(c.n_latents for c in ctx) / n_real
    d_dec = comp.decoder.hidden_size
    sizes = [
        {"what": "raw text (UTF-8)", "bytes": text_bytes},
        {"what": "store entry payload (factor-2 means fp16 + counts)", "bytes": stats.payload_bytes / stats.entries},
        {"what": "store entry on disk (database file / entries)", "bytes": main_file / stats.entries},
        {"what": "store entry on disk, WAL file included", "bytes": stats.file_bytes / stats.entries},
        {"what": "store entry of 4x coarser means (hypothetical)", "bytes": coarse_stats.payload_bytes / coarse_stats.entries},
        {"what": f"projected latents at scale 0 ({mean_latents:.1f} x {d_dec}, fp16)", "bytes": mean_latents * d_dec * 2},
        {"what": f"decoder KV cache, {mean_tokens:.0f} tokens, fp16/bf16", "bytes": kv16 * mean_tokens},
        {"what": f"decoder KV cache, {mean_tokens:.0f} tokens, fp32", "bytes": 2 * kv16 * mean_tokens},
        {"what": f"decoder KV cache of the latents ({mean_latents:.1f} positions, fp16)", "bytes": kv16 * mean_latents},
    ]
    for s in sizes:
        s["kB"] = s["bytes"] / 1e3
        s["x_text"] = s["bytes"] / text_bytes

    hit_rate = get[5]["chunks_s"]  # a query reads its k chunks in one call
    best = max(get.values(), key=lambda r: r["chunks_s"])
    speedup = hit_rate / encode_rate
    rate_rows = [{"path": f"store.get_many, batch {b}", "chunks_s": r["chunks_s"], "us": r["us_per_chunk"],
                  "vs_encode": r["chunks_s"] / encode_rate} for b, r in get.items()]
    rate_rows += [{"path": f"get_many + derive + projector, batch {b}", "chunks_s": r["chunks_s"],
                   "us": r["us_per_chunk"], "vs_encode": r["chunks_s"] / compress_rate} for b, r in lat.items()]
    rate_rows += [{"path": name, "chunks_s": r["chunks_s"], "us": r["us_per_chunk"],
                   "vs_encode": r["chunks_s"] / encode_rate} for name, r in alt.items()]
    rate_rows += [{"path": f"re-encode (encode, batch {n_real})", "chunks_s": encode_rate, "us": 1e6 / encode_rate,
                   "vs_encode": 1.0},
                  {"path": f"recompute latents (compress, batch {n_real})", "chunks_s": compress_rate,
                   "us": 1e6 / compress_rate, "vs_encode": compress_rate / encode_rate}]
    print(table(rate_rows, [("path", "path", ""), ("chunks_s", "chunks/s", ",.0f"), ("us", "us/chunk", ",.1f"),
                            ("vs_encode", "x re-encoding", ",.0f")]))
    print("where a batched read's time goes (us per chunk): " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()))
    print(table(sizes, [("what", "per chunk", ""), ("kB", "kB", ",.2f"), ("x_text", "x raw text", ",.2f")]))
    targets = {"speedup_vs_encode": speedup, "speedup_target": TARGET_SPEEDUP, "speedup_met": speedup >= TARGET_SPEEDUP,
               "best_rate": best["chunks_s"], "best_batch": best["batch"], "rate_target": TARGET_RATE,
               "rate_met": best["chunks_s"] >= TARGET_RATE}
    print(f"targets: hit path {speedup:,.0f}x re-encoding (>= {TARGET_SPEEDUP}x: "
          f"{'met' if targets['speedup_met'] else 'MISSED'}); best store rate {best['chunks_s']:,.0f} chunks/s "
          f"(>= {TARGET_RATE:,}: {'met' if targets['rate_met'] else 'MISSED'})")
    rec.results = {"rates": rate_rows, "get_many": get, "latents": lat, "alternatives": alt, "breakdown_us": breakdown,
                   "encode_chunks_s": encode_rate, "compress_chunks_s": compress_rate, "encode": t_enc.to_dict(),
                   "write_seconds": write_s, "sizes": sizes, "store": stats.to_dict(),
                   "kv_bytes_per_token_fp16": kv16, "targets": targets}
    if not args.no_plot:
        plot(rate_rows, sizes, args.out)
    return rec.finish(args.out)


def plot(rates: list[dict], sizes: list[dict], out_dir) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    axes[0].barh([r["path"] for r in rates], [r["chunks_s"] for r in rates])
    axes[0].set_xscale("log")
    axes[0].axvline(TARGET_RATE, color="k", ls="--", lw=0.8)
    axes[0].set_xlabel("chunks / s (log)")
    axes[0].tick_params(axis="y", labelsize=7)
    axes[1].barh([s["what"] for s in sizes], [s["kB"] for s in sizes])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("kB per chunk (log)")
    axes[1].tick_params(axis="y", labelsize=7)
    fig.suptitle("Latent cache: read rate and bytes per chunk")
    fig.tight_layout()
    save_plot(fig, "cache", out_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache", description=__doc__.split("\n")[0])
    add_common_arguments(p)
    p.add_argument("--entries", type=int, default=None, help="store entries (default 2000, quick 1000)")
    p.add_argument("--tokens", type=int, default=150, help="tokens per chunk")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
