"""Chunking long strings without spaces (URLs, base64, minified code): time against length.

A word longer than the chunk budget is cut at token boundaries. The cut used to search for the
longest prefix within the budget by re-tokenizing the rest of the word at every probe, which is
quadratic in the word (issue 17: 10k / 20k / 40k characters took 0.49 / 1.69 / 7.33 s and a
1 MB line did not finish in 300 s). ``Chunker`` now tokenizes the word once and cuts at token
offsets. This measures ``Chunker.split`` on seeded random strings of letters, digits and a few
multi-byte characters, at each size, and the old prefix search on the sizes where it finishes;
``seconds per MB`` staying flat across sizes is what linear means.

    python -m benchmarks.chunking [--quick] [--model tiny|embedded] [--sizes 10000,20000,40000,1000000]
"""

from __future__ import annotations

import argparse
import random
import string

from .common import Run, add_common_arguments, configure_threads, int_list, measure, pyplot, save_plot, table

SIZES = [10_000, 20_000, 40_000, 1_000_000]
QUICK_SIZES = [10_000, 20_000, 40_000, 200_000]
ALPHABET = string.ascii_letters + string.digits + "éü漢"


def no_space_text(n: int, seed: int = 0) -> str:
    """``n`` seeded random characters with no whitespace (so the chunker must cut inside a word)."""
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def load_tokenizer(model: str):
    """(tokenizer, description): the tiny test tokenizer or the embedded SmolLM2's."""
    if model == "tiny":
        from semidyn_rag.testing import build_tokenizer

        return build_tokenizer(), "tiny byte-level BPE (512 tokens, about 1 token per character)"
    from transformers import AutoTokenizer

    from semidyn_rag.embedded import smollm2_path

    return AutoTokenizer.from_pretrained(str(smollm2_path())), "SmolLM2-135M tokenizer (49k tokens)"


def legacy_cut(count, word: str, budget: int) -> list[str]:
    """The old cut: binary search over prefixes of the whole remaining word (quadratic)."""
    out, start = [], 0
    while start < len(word):
        lo, hi = start + 1, len(word)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count([word[start:mid]])[0] <= budget:
                lo = mid
            else:
                hi = mid - 1
        out.append(word[start:lo])
        start = lo
    return out


def run(args) -> dict:
    from semidyn_rag.corpus.chunking import Chunker, tokenizer_counter

    threads = configure_threads(args.threads)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    reps = args.reps or (1 if args.quick else 3)
    tok, desc = load_tokenizer(args.model)
    count = tokenizer_counter(tok)
    chunker = Chunker(count, chunk_tokens=args.chunk_tokens)
    rec = Run("chunking", {"tokenizer": desc, "threads": threads, "chunk_tokens": args.chunk_tokens,
                           "sizes": sizes, "reps": reps, "legacy_max": args.legacy_max})
    rows = []
    for n in sizes:
        text = no_space_text(n)
        pieces = chunker.split(text)  # also the warm-up
        assert "".join(p for p, _ in pieces) == text and all(k <= args.chunk_tokens for _, k in pieces)
        t = measure(lambda: chunker.split(text), warmup=0, reps=reps)
        row = {"chars": n, "chunks": len(pieces), "seconds": t.median, "s_per_mb": t.median / n * 1e6}
        if n <= args.legacy_max:
            row["legacy_seconds"] = measure(lambda: legacy_cut(count, text, args.chunk_tokens), warmup=0,
                                            reps=1).median
        rows.append(row)
        print(f"  {n:>9,} chars: {t.median:.3f} s" + (f" (old prefix search {row['legacy_seconds']:.3f} s)"
                                                      if "legacy_seconds" in row else ""))
    print(table(rows, [("chars", "characters", ","), ("chunks", "chunks", ","), ("seconds", "split s", ".3f"),
                       ("s_per_mb", "s per MB", ".2f"), ("legacy_seconds", "old cut s", ".3f")]))
    linearity = rows[-1]["s_per_mb"] / rows[0]["s_per_mb"]
    print(f"seconds per MB, largest vs smallest: {linearity:.2f}x (1 = linear)")
    rec.results = {"rows": rows, "s_per_mb_largest_vs_smallest": linearity}
    if not args.no_plot:
        plot(rows, args.out)
    return rec.finish(args.out)


def plot(rows: list[dict], out_dir) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.loglog([r["chars"] for r in rows], [r["seconds"] for r in rows], "o-", label="Chunker.split (offsets)")
    old = [r for r in rows if "legacy_seconds" in r]
    if old:
        ax.loglog([r["chars"] for r in old], [r["legacy_seconds"] for r in old], "s--", label="old prefix search")
    ax.set_xlabel("characters without a space")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.set_title("Cutting one long word into chunks")
    save_plot(fig, "chunking", out_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chunking", description=__doc__.split("\n")[0])
    add_common_arguments(p, default_model="tiny")
    p.add_argument("--sizes", type=int_list, default=None, help="string lengths (default 10k,20k,40k,1M)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="chunk budget in tokens")
    p.add_argument("--legacy-max", type=int, default=40_000, help="time the old cut up to this length")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
