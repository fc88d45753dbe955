"""Time to first token and end-to-end latency: retrieved text vs cached latents, same decoder.

For k retrieved chunks of about L tokens, the text path pastes the chunks into the prompt
("Context: [1] ... [k] ... Question: ..."), the compressed path reads the chunks' features
from a ``LatentStore``, derives latents and applies the projector (``compress_features``), and
puts one placeholder per chunk in the same prompt. Both then run the same decoder (as the
compressor holds it, LoRA included):

* TTFT = everything from the chunks' keys (compressed) or texts (text) to the first token:
  store read + derive + projector (compressed only), chat template + tokenizing + placeholder
  expansion, the prefill forward over all positions (logits for the last one only, as
  ``generate`` does) and the arg-max that yields the first token;
* end-to-end = the same through ``LatentDecoder.generate`` with a fixed number of new tokens
  (``min_new_tokens`` = ``max_new_tokens``, so both paths decode equally many).

The ideal speed-up is the ratio of prefill positions; the target at k = 5 is a measured TTFT
speed-up of at least 80% of it.

    python -m benchmarks.ttft [--quick] [--ks 3,5,10] [--lengths 150,512] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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

TARGET_K = 5
TARGET_FRACTION = 0.80
QUESTION = "Which places, people and dates do these passages mention?"


def text_prompt(question: str, chunks: list[str]) -> str:
    """The uncompressed RAG prompt: the default prompt's layout with the chunk texts in place."""
    if len(chunks) == 1:
        ctx = f"Context: {chunks[0]}"
    else:
        ctx = "Context:\n" + "\n".join(f"[{i + 1}] {c}" for i, c in enumerate(chunks))
    return f"{ctx}\n\nQuestion: {question}"


def first_token(model, inputs) -> int:
    """Prefill over the expanded inputs and pick the first token (greedy), as ``generate`` does."""
    with torch.inference_mode():
        out = model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                    use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())


class Paths:
    """The two ways of answering from k chunks, each returning what it timed."""

    def __init__(self, comp, store, question: str):
        self.comp, self.store, self.question = comp, store, question
        self.dec = comp.decoder
        self.fp = comp.feature_fingerprint
        self.splits: list[dict] = []

    def text_inputs(self, chunks: list[str]):
        ids = self.dec.encode_prompts([self.dec.apply_chat(text_prompt(self.question, chunks))])
        return self.dec.expand(ids, [[]])

    def text_ttft(self, chunks: list[str]) -> int:
        return first_token(self.dec.model, self.text_inputs(chunks))

    def contexts(self, keys: list[str]):
        t0 = time.perf_counter()
        found = self.store.get_many(keys, self.fp)
        if len(found) != len(keys):
            raise RuntimeError(f"{len(keys) - len(found)} chunks are missing from the latent store")
        t1 = time.perf_counter()
        ctx = self.comp.compress_features(list(found.values()))
        t2 = time.perf_counter()
        return ctx, t1 - t0, t2 - t1

    def compressed_inputs(self, ctx):
        ids = self.dec.encode_prompts([self.dec.render(self.question, len(ctx))])
        return self.dec.expand(ids, [[c.latents for c in ctx]])

    def compressed_ttft(self, keys: list[str]) -> int:
        ctx, read, derive = self.contexts(keys)
        t2 = time.perf_counter()
        inp = self.compressed_inputs(ctx)
        t3 = time.perf_counter()
        tok = first_token(self.dec.model, inp)
        t4 = time.perf_counter()
        self.splits.append({"store_read_s": read, "derive_project_s": derive, "prompt_s": t3 - t2,
                            "prefill_s": t4 - t3})
        return tok

    def text_generate(self, chunks: list[str], n: int) -> str:
        prompt = self.dec.apply_chat(text_prompt(self.question, chunks))
        return self.dec.generate([prompt], [[]], max_new_tokens=n, min_new_tokens=n)[0]

    def compressed_generate(self, keys: list[str], n: int) -> str:
        ctx, _, _ = self.contexts(keys)
        return self.comp.generate(self.question, ctx, max_new_tokens=n, min_new_tokens=n)


def run(args) -> dict:
    threads = configure_threads(args.threads)
    quick = args.quick
    ks = int_list(args.ks) if args.ks else ([3, 5] if quick else [3, 5, 10])
    lengths = int_list(args.lengths) if args.lengths else [150, 512]
    reps = args.reps or (2 if quick else 3)
    warmup = 1 if args.warmup is None else args.warmup
    gen_reps = args.generate_reps if args.generate_reps is not None else (1 if quick else 2)
    new_tokens = args.new_tokens or (8 if quick else 16)
    with tempfile.TemporaryDirectory() as work:
        comp, model_desc = load_compressor(args.model, work)
        from semidyn_rag.store import LatentStore, chunk_key

        store = LatentStore(Path(work) / "latents.sqlite")
        chunks = {L: texts_of_tokens(comp.encoder.tokenizer, max(ks), L, seed=L) for L in lengths}
        for L, texts in chunks.items():  # precompress once: this is what a corpus store holds
            store.put_many(zip((chunk_key(t) for t in texts), comp.encode(texts, batch_size=4)))
        settings = {"model": model_desc, "threads": threads, "ks": ks, "lengths": lengths, "reps": reps,
                    "warmup": warmup, "generate_reps": gen_reps, "new_tokens": new_tokens, "question": QUESTION,
                    "ttft": "store read + derive + projector + prompt + prefill (last-position logits) + arg-max",
                    "scale": 0.0}
        rec = Run("ttft", settings)
        print(f"TTFT: k in {ks}, chunks of {lengths} tokens, {model_desc}, {threads} thread(s), "
              f"load {rec.machine['loadavg'][0]:.2f}")
        paths = Paths(comp, store, QUESTION)
        rows = []
        for L in lengths:
            for k in ks:
                texts = chunks[L][:k]
                keys = [chunk_key(t) for t in texts]
                ctx, _, _ = paths.contexts(keys)
                p_text = int(paths.text_inputs(texts).inputs_embeds.shape[1])
                p_comp = int(paths.compressed_inputs(ctx).inputs_embeds.shape[1])
                paths.splits.clear()
                t = measure_interleaved({"text": lambda: paths.text_ttft(texts),
                                         "compressed": lambda: paths.compressed_ttft(keys)},
                                        warmup=warmup, reps=reps)
                splits = paths.splits[-reps:]
                split_med = {name: float(torch.tensor([s[name] for s in splits]).median()) for name in splits[0]}
                row = {
                    "chunk_tokens": L, "k": k,
                    "context_tokens": sum(c.n_tokens for c in ctx), "latents": sum(c.n_latents for c in ctx),
                    "factors": sorted({c.factor for c in ctx}),
                    "positions_text": p_text, "positions_compressed": p_comp,
                    "ideal_speedup": p_text / p_comp,
                    "ttft_text_s": t["text"].median, "ttft_compressed_s": t["compressed"].median,
                    "ttft_speedup": t["text"].median / t["compressed"].median,
                    "ttft_text": t["text"].to_dict(), "ttft_compressed": t["compressed"].to_dict(),
                    "compressed_split_s": split_med,
                }
                row["fraction_of_ideal"] = row["ttft_speedup"] / row["ideal_speedup"]
                if gen_reps:
                    g = measure_interleaved({"text": lambda: paths.text_generate(texts, new_tokens),
                                             "compressed": lambda: paths.compressed_generate(keys, new_tokens)},
                                            warmup=0, reps=gen_reps)
                    row.update({"e2e_text_s": g["text"].median, "e2e_compressed_s": g["compressed"].median,
                                "e2e_speedup": g["text"].median / g["compressed"].median,
                                "e2e_text": g["text"].to_dict(), "e2e_compressed": g["compressed"].to_dict()})
                rows.append(row)
                print(f"  L={L:<4} k={k:<3} positions {p_text:>5} -> {p_comp:<4} ideal {row['ideal_speedup']:5.2f}x  "
                      f"TTFT {row['ttft_text_s']:.3f} s -> {row['ttft_compressed_s']:.3f} s = "
                      f"{row['ttft_speedup']:5.2f}x ({row['fraction_of_ideal']:.0%} of ideal)"
                      + (f"  e2e {row['e2e_speedup']:.2f}x" if gen_reps else ""))
        store.close()

    cols = [("chunk_tokens", "chunk tok", "d"), ("k", "k", "d"), ("positions_text", "prefill text", "d"),
            ("positions_compressed", "prefill comp.", "d"), ("ideal_speedup", "ideal", ".2f"),
            ("ttft_text_s", "TTFT text s", ".3f"), ("ttft_compressed_s", "TTFT comp. s", ".3f"),
            ("ttft_speedup", "TTFT speed-up", ".2f"), ("fraction_of_ideal", "of ideal", ".0%")]
    if gen_reps:
        cols += [("e2e_text_s", f"e2e text s ({new_tokens} tok)", ".2f"),
                 ("e2e_compressed_s", "e2e comp. s", ".2f"), ("e2e_speedup", "e2e speed-up", ".2f")]
    print(table(rows, cols))
    at_k = [r for r in rows if r["k"] == TARGET_K]
    target = {"k": TARGET_K, "fraction": TARGET_FRACTION,
              "fractions": {str(r["chunk_tokens"]): round(r["fraction_of_ideal"], 4) for r in at_k},
              "met": bool(at_k) and all(r["fraction_of_ideal"] >= TARGET_FRACTION for r in at_k)}
    if at_k:
        print(f"target: at k={TARGET_K} TTFT speed-up >= {TARGET_FRACTION:.0%} of ideal: "
              f"{'met' if target['met'] else 'MISSED'} ({', '.join(f'L={a}: {b:.0%}' for a, b in target['fractions'].items())})")
    rec.results = {"rows": rows, "target": target}
    if not args.no_plot:
        plot(rows, args.out)
    return rec.finish(args.out)


def plot(rows: list[dict], out_dir) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"L={r['chunk_tokens']}\nk={r['k']}" for r in rows]
    x = range(len(rows))
    w = 0.4
    axes[0].bar([i - w / 2 for i in x], [r["ttft_text_s"] for r in rows], w, label="retrieved text")
    axes[0].bar([i + w / 2 for i in x], [r["ttft_compressed_s"] for r in rows], w, label="cached latents")
    axes[0].set_ylabel("time to first token (s)")
    axes[0].set_xticks(list(x), labels, fontsize=8)
    axes[0].legend()
    axes[1].bar([i - w / 2 for i in x], [r["ideal_speedup"] for r in rows], w, label="ideal (prefill positions)")
    axes[1].bar([i + w / 2 for i in x], [r["ttft_speedup"] for r in rows], w, label="measured TTFT")
    if "e2e_speedup" in rows[0]:
        axes[1].plot(list(x), [r["e2e_speedup"] for r in rows], "k^", label="measured end-to-end")
    axes[1].set_ylabel("speed-up (x)")
    axes[1].set_xticks(list(x), labels, fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle("Answering from cached latents vs retrieved text (same decoder)")
    save_plot(fig, "ttft", out_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ttft", description=__doc__.split("\n")[0])
    add_common_arguments(p)
    p.add_argument("--ks", default=None, help="chunks per question (default 3,5,10; quick 3,5)")
    p.add_argument("--lengths", default=None, help="tokens per chunk (default 150,512)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated end-to-end (default 16, quick 8)")
    p.add_argument("--generate-reps", type=int, default=None, help="end-to-end repetitions (0 = skip)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
