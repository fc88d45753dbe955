"""Compression throughput: ``compress()`` against a bare encoder forward over the same batches.

The bare forward (the encoder model alone on pre-built padded id tensors, bidirectional,
LoRA included) is the physical limit of this design: tokenizing, building the padded batch,
the density head, selection, pooling and projection should cost almost nothing beyond it.
Batches are either length-bucketed (what ``compress`` does: texts sorted by length, then cut
into batches) or unsorted (batches in input order, as a caller feeding slices would get); the
bare forward runs over exactly the same batches in both cases. Target: compress <= 1.10x bare.

    python -m benchmarks.throughput [--quick] [--model embedded|tiny] [--batch-sizes 1,8,64]
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch

from .common import (
    Run,
    add_common_arguments,
    configure_threads,
    int_list,
    load_compressor,
    measure_interleaved,
    pyplot,
    save_plot,
    table,
    texts_of_tokens,
)

TARGET = 1.10


def bare_batches(comp, ids: list[list[int]], batch_size: int, bucketed: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Padded (input_ids, attention_mask) tensors laid out exactly as ``ContextEncoder`` lays them."""
    enc = comp.encoder
    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if bucketed else list(range(len(ids)))
    out = []
    for s in range(0, len(order), batch_size):
        rows = [enc.prefix + ids[i] + [enc.eos_id] for i in order[s : s + batch_size]]
        width = max(len(r) for r in rows)
        t = torch.full((len(rows), width), enc.pad_id, dtype=torch.long)
        m = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            t[b, : len(r)] = torch.tensor(r)
            m[b, : len(r)] = 1
        out.append((t.to(comp.device), m.to(comp.device)))
    return out


def bare_forward(comp, batches) -> None:
    """The encoder model alone over pre-built batches (no tokenizer, head, pooling or projector)."""
    enc = comp.encoder
    kwargs = {} if enc.native_bidirectional else {"is_causal": not enc.bidirectional}
    with torch.inference_mode():
        for ids, mask in batches:
            enc.model(input_ids=ids, attention_mask=mask, **kwargs)


def compress_call(comp, texts: list[str], batch_size: int, bucketed: bool):
    """``compress`` over all texts (bucketed), or over input-order slices of ``batch_size``."""
    if bucketed:
        return lambda: comp.compress(texts, batch_size=batch_size)
    slices = [texts[s : s + batch_size] for s in range(0, len(texts), batch_size)]
    return lambda: [comp.compress(sl, batch_size=batch_size) for sl in slices]


def run(args) -> dict:
    threads = configure_threads(args.threads)
    quick = args.quick
    n = args.chunks or (32 if quick else 64)
    sizes = int_list(args.batch_sizes) if args.batch_sizes else ([1, 8, 32] if quick else [1, 4, 16, 64])
    reps = args.reps or 2
    warmup = 1 if args.warmup is None else args.warmup
    lo, hi = args.min_tokens, args.max_tokens
    with tempfile.TemporaryDirectory() as work:
        comp, model_desc = load_compressor(args.model, work)
    rng = random.Random(0)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    texts = texts_of_tokens(comp.encoder.tokenizer, n, lengths, seed=1)
    ids = comp.encoder.tokenize(texts)
    real = sum(len(r) for r in ids)
    settings = {"model": model_desc, "threads": threads, "chunks": n, "tokens_per_chunk": [lo, hi],
                "real_tokens": real, "batch_sizes": sizes, "reps": reps, "warmup": warmup,
                "bare": "encoder model forward on pre-built padded ids (bidirectional, LoRA as in compress)"}
    rec = Run("throughput", settings)
    print(f"compression throughput: {n} chunks of {lo}-{hi} tokens ({real} tokens), {model_desc}, "
          f"{threads} thread(s), load {rec.machine['loadavg'][0]:.2f}")

    # warm up both paths once on a small batch (allocator, thread pool), then per configuration
    small = sorted(range(n), key=lambda i: lengths[i])[: min(4, n)]
    comp.compress([texts[i] for i in small])
    bare_forward(comp, bare_batches(comp, [ids[i] for i in small], 4, True))

    rows = []
    for bs in sizes:
        for bucketed in ([True] if bs == 1 else [True, False]):
            batches = bare_batches(comp, ids, bs, bucketed)
            padded = sum(int(t.numel()) for t, _ in batches)
            times = measure_interleaved({"compress": compress_call(comp, texts, bs, bucketed),
                                         "bare": lambda b=batches: bare_forward(comp, b)},
                                        warmup=warmup if bs == sizes[0] else 0, reps=reps)
            c, b = times["compress"].median, times["bare"].median
            rows.append({
                "batch_size": bs, "batching": "bucketed" if bucketed else "unsorted",
                "padding": 1 - (real + n * (1 + len(comp.encoder.prefix))) / padded,
                "compress_chunks_s": n / c, "compress_tokens_s": real / c,
                "bare_chunks_s": n / b, "bare_tokens_s": real / b,
                "overhead": c / b, "meets_target": c / b <= TARGET,
                "compress": times["compress"].to_dict(), "bare": times["bare"].to_dict(),
            })
            r = rows[-1]
            print(f"  batch {bs:>3} {r['batching']:<8}  compress {r['compress_tokens_s']:8.1f} tok/s  "
                  f"bare {r['bare_tokens_s']:8.1f} tok/s  ratio {r['overhead']:.3f}")

    cols = [("batch_size", "batch", "d"), ("batching", "batches", ""), ("padding", "padding", ".1%"),
            ("compress_chunks_s", "compress chunks/s", ".2f"), ("compress_tokens_s", "compress tok/s", ".1f"),
            ("bare_tokens_s", "bare fwd tok/s", ".1f"), ("overhead", "compress / bare", ".3f")]
    print(table(rows, cols))
    worst = max(r["overhead"] for r in rows)
    rec.results = {"rows": rows, "worst_overhead": worst, "target": TARGET, "meets_target": worst <= TARGET}
    print(f"worst compress/bare ratio {worst:.3f} (target <= {TARGET}): {'met' if worst <= TARGET else 'MISSED'}")
    if not args.no_plot:
        plot(rows, args.out)
    return rec.finish(args.out)


def plot(rows: list[dict], out_dir) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for batching, style in (("bucketed", "-o"), ("unsorted", "--s")):
        sel = [r for r in rows if r["batching"] == batching or r["batch_size"] == 1]
        xs = [r["batch_size"] for r in sel]
        ax.plot(xs, [r["compress_tokens_s"] for r in sel], style, label=f"compress(), {batching}")
        ax.plot(xs, [r["bare_tokens_s"] for r in sel], style, alpha=0.45, label=f"bare forward, {batching}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("real tokens / s")
    ax.set_title("Compression throughput vs bare encoder forward")
    ax.legend(fontsize=8)
    save_plot(fig, "throughput", out_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    add_common_arguments(p)
    p.add_argument("--chunks", type=int, default=None, help="texts per pass (default 64, quick 32)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,16,64; quick 1,8,32)")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
