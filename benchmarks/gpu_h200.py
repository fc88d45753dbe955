"""TTFT and compression throughput on an H200-class GPU, offline: a Qwen3-0.6B-shaped model in bf16.

Nothing is downloaded: the encoder (``Qwen3Model``) and decoder (``Qwen3ForCausalLM``) are
built from Qwen3-0.6B's configuration (hidden 1024, 28 layers, 16 heads / 8 KV heads, head dim
128, intermediate 3072, vocabulary 151936) with random weights, since speed does not depend on
the weights, and contexts are random token ids (tokenizer-free: only the special ids of the
package's offline test tokenizer are used). The library does the work: ``encode_ids``,
``LatentStore``, ``compress_features``, ``LatentDecoder.expand``. Measured, as the CPU
benchmarks do:

1. time to first token (and end-to-end with a fixed number of new tokens), k chunks as text vs
   the same chunks as cached latents (store read + derive + projector included), contexts of
   up to 2,048 tokens; ideal speed-up = ratio of prefill positions;
2. compression throughput, ``encode_ids`` + ``compress_features`` against a bare encoder
   forward over the same batches, batch sizes 1 to 64, length-bucketed vs unsorted;
3. serving on vLLM (when it is installed): the decoder exported as plain weights
   (``export_decoder``) on one in-process vLLM engine, text RAG (token ids) vs compressed RAG
   (prompt embeddings with latents from the store), k=5 chunks of 512 tokens, 32 questions:
   requests/s and TTFT against the ideal speed-up, and against the transformers backend
   (``benchmarks.vllm_serving`` measures the same on the CPU with SmolLM2).

Everything fits in about 8 minutes (a time budget skips what does not). JSON goes to ``$OUT``
when set (else ``--out``, else ``benchmarks/results``). ``--dry-run`` runs a tiny model of the
same family on the CPU in seconds, to check the script where there is no GPU.

    python -m benchmarks.gpu_h200            # on the GPU machine
    python -m benchmarks.gpu_h200 --dry-run  # anywhere
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from .common import Run, measure_interleaved, table
from .throughput import TARGET as THROUGHPUT_TARGET
from .throughput import bare_batches, bare_forward
from .ttft import TARGET_FRACTION, TARGET_K, first_token

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN3_06B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)  # vLLM's CPU attention takes head sizes from 32
FIRST_ID = 16  # random ids start above the tokenizer's special tokens (pad, eos, chat markers, placeholder)


def qwen3_config(shape: dict, tok):
    from transformers import Qwen3Config

    shape = dict(shape)
    theta = shape.pop("rope_theta")
    cfg = Qwen3Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return cfg


def build_compressor(shape: dict, device: str, dtype: str, lora: bool):
    """A SemiDynamicCompressor around random Qwen3 models of ``shape`` (no download, no tokenizer files)."""
    from transformers import Qwen3ForCausalLM, Qwen3Model

    from semidyn_rag import CompressorConfig, SemiDynamicCompressor
    from semidyn_rag.testing import build_tokenizer

    tok = build_tokenizer()
    cfg = qwen3_config(shape, tok)
    torch.manual_seed(0)
    with torch.device(device):
        enc, dec = Qwen3Model(cfg), Qwen3ForCausalLM(cfg)
    training = "lora" if lora else "frozen"
    config = CompressorConfig(encoder="random:qwen3-0.6b-shape", decoder="random:qwen3-0.6b-shape", device=device,
                              dtype=dtype, encoder_training=training, decoder_training=training,
                              max_context_tokens=2048)
    comp = SemiDynamicCompressor.from_models(config, enc, tok, dec, tok, wrap_lora=lora)
    return comp


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


class Prompt:
    """A tokenizer-free RAG prompt: fixed random prefix and suffix ids, k chunks in between."""

    def __init__(self, rng: random.Random, vocab: int, placeholder: int):
        self.prefix = random_ids(rng, 20, vocab)  # chat template + "Context:"
        self.seps = [random_ids(rng, 3, vocab) for _ in range(16)]  # "\n[i] "
        self.suffix = random_ids(rng, 30, vocab)  # question + end of turn + assistant marker
        self.placeholder = placeholder

    def text(self, chunks: list[list[int]]) -> list[int]:
        ids = list(self.prefix)
        for i, c in enumerate(chunks):
            ids += self.seps[i % len(self.seps)] + c
        return ids + self.suffix

    def compressed(self, k: int) -> list[int]:
        return self.text([[self.placeholder]] * k)


def run(args) -> dict:
    from semidyn_rag.store import LatentStore

    dry = args.dry_run
    device = args.device or ("cpu" if dry else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --dry-run to check the script on the CPU")
    dtype = args.dtype or ("float32" if dry else "bfloat16")
    out_dir = args.out or os.environ.get("OUT") or None
    t_start = time.perf_counter()
    budget = args.budget_s
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    if not device.startswith("cuda"):
        from .common import configure_threads

        configure_threads(args.threads)

    comp = build_compressor(TINY if dry else QWEN3_06B, device, dtype, args.lora)
    vocab = comp.decoder.model.config.vocab_size
    n_params = sum(p.numel() for p in comp.encoder.model.parameters())
    build_s = time.perf_counter() - t_start
    ks, lengths = ([3, 5], [20, 40]) if dry else ([3, 5, 10], [150, 512])
    max_ctx = 120 if dry else 2048
    pairs = [(L, k) for L in lengths for k in ks if k * L <= max_ctx] + ([] if dry else [(512, 4)])
    reps, warmup = (1, 1) if dry else (args.reps, 3)
    new_tokens = 4 if dry else args.new_tokens
    tp_chunks = 16 if dry else args.chunks
    tp_lengths = (8, 64) if dry else (64, 2048)
    batch_sizes = [1, 4, 16] if dry else [1, 4, 16, 64]
    settings = {"shape": TINY if dry else QWEN3_06B, "dry_run": dry, "device": device, "dtype": dtype,
                "lora": args.lora, "encoder_parameters": n_params, "build_seconds": round(build_s, 1),
                "ttft_pairs": pairs, "reps": reps, "warmup": warmup, "new_tokens": new_tokens,
                "throughput_chunks": tp_chunks, "throughput_lengths": tp_lengths, "batch_sizes": batch_sizes,
                "budget_s": budget}
    rec = Run("gpu_h200" if not dry else "gpu_h200_dry_run", settings)
    print(f"GPU benchmark ({'dry run, tiny model on ' + device if dry else device}): Qwen3 shape "
          f"{n_params / 1e6:.0f}M encoder parameters, {dtype}, built in {build_s:.0f} s")

    def over_budget() -> bool:
        return time.perf_counter() - t_start > budget

    # 1. time to first token
    rng = random.Random(0)
    prompt = Prompt(rng, vocab, comp.decoder.placeholder_id)
    dec = comp.decoder
    fp = comp.feature_fingerprint
    ttft_rows, skipped = [], []
    with tempfile.TemporaryDirectory() as work:
        store = LatentStore(Path(work) / "latents.sqlite")
        need = {L: max(k for L2, k in pairs if L2 == L) for L in sorted({L for L, _ in pairs})}
        chunks = {L: [random_ids(rng, L, vocab) for _ in range(n)] for L, n in need.items()}
        keys = {L: [hashlib.sha256(str(c).encode()).hexdigest() for c in cs] for L, cs in chunks.items()}
        for L in chunks:
            store.put_many(zip(keys[L], comp.encode_ids(chunks[L], batch_size=len(chunks[L]))))

        def text_inputs(cs):
            return dec.expand([prompt.text(cs)], [[]])

        def comp_inputs(ks_):
            ctx = comp.compress_features(list(store.get_many(ks_, fp).values()))
            return dec.expand([prompt.compressed(len(ctx))], [[c.latents for c in ctx]]), ctx

        def generate(inputs):
            with torch.inference_mode():
                return dec.model.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                          pad_token_id=dec.tokenizer.pad_token_id)

        for L, k in pairs:
            if over_budget():
                skipped.append(f"ttft L={L} k={k}")
                continue
            cs, ks_ = chunks[L][:k], keys[L][:k]
            inp_c, ctx = comp_inputs(ks_)
            p_text, p_comp = int(text_inputs(cs).inputs_embeds.shape[1]), int(inp_c.inputs_embeds.shape[1])
            t = measure_interleaved({"text": lambda: first_token(dec.model, text_inputs(cs)),
                                     "compressed": lambda: first_token(dec.model, comp_inputs(ks_)[0])},
                                    warmup=warmup, reps=reps, sync=sync)
            g = measure_interleaved({"text": lambda: generate(text_inputs(cs)),
                                     "compressed": lambda: generate(comp_inputs(ks_)[0])},
                                    warmup=1, reps=max(1, reps // 3), sync=sync)
            row = {"chunk_tokens": L, "k": k, "latents": sum(c.n_latents for c in ctx),
                   "positions_text": p_text, "positions_compressed": p_comp, "ideal_speedup": p_text / p_comp,
                   "ttft_text_ms": t["text"].median * 1e3, "ttft_compressed_ms": t["compressed"].median * 1e3,
                   "ttft_speedup": t["text"].median / t["compressed"].median,
                   "e2e_text_ms": g["text"].median * 1e3, "e2e_compressed_ms": g["compressed"].median * 1e3,
                   "e2e_speedup": g["text"].median / g["compressed"].median,
                   "ttft_text": t["text"].to_dict(), "ttft_compressed": t["compressed"].to_dict()}
            row["fraction_of_ideal"] = row["ttft_speedup"] / row["ideal_speedup"]
            ttft_rows.append(row)
            print(f"  L={L:<4} k={k:<3} positions {p_text:>5} -> {p_comp:<4} ideal {row['ideal_speedup']:5.2f}x  "
                  f"TTFT {row['ttft_text_ms']:.2f} ms -> {row['ttft_compressed_ms']:.2f} ms = {row['ttft_speedup']:.2f}x"
                  f"  e2e ({new_tokens} tok) {row['e2e_speedup']:.2f}x")
        store.close()
    if ttft_rows:
        print(table(ttft_rows, [("chunk_tokens", "chunk tok", "d"), ("k", "k", "d"), ("positions_text", "prefill text", "d"),
                                ("positions_compressed", "prefill comp.", "d"), ("ideal_speedup", "ideal", ".2f"),
                                ("ttft_text_ms", "TTFT text ms", ".2f"), ("ttft_compressed_ms", "TTFT comp. ms", ".2f"),
                                ("ttft_speedup", "TTFT speed-up", ".2f"), ("fraction_of_ideal", "of ideal", ".0%"),
                                ("e2e_text_ms", f"e2e text ms ({new_tokens} tok)", ".1f"),
                                ("e2e_compressed_ms", "e2e comp. ms", ".1f"), ("e2e_speedup", "e2e speed-up", ".2f")]))

    # 2. compression throughput
    lens = [rng.randint(*tp_lengths) for _ in range(tp_chunks)]
    ids = [random_ids(rng, n, vocab) for n in lens]
    real = sum(lens)
    bare_forward(comp, bare_batches(comp, ids[:4], 4, True))  # warm up kernels for the batched shapes
    sync()
    tp_rows = []
    for bs in batch_sizes:
        for bucketed in ([True] if bs == 1 else [True, False]):
            if over_budget():
                skipped.append(f"throughput batch {bs} {'bucketed' if bucketed else 'unsorted'}")
                continue
            batches = bare_batches(comp, ids, bs, bucketed)
            slices = [ids[s : s + bs] for s in range(0, len(ids), bs)]
            if bucketed:
                compress = lambda: comp.compress_features(comp.encode_ids(ids, batch_size=bs))  # noqa: E731
            else:
                compress = lambda: [comp.compress_features(comp.encode_ids(sl, batch_size=bs)) for sl in slices]  # noqa: E731
            t = measure_interleaved({"compress": compress, "bare": lambda b=batches: bare_forward(comp, b)},
                                    warmup=1, reps=max(1, reps // 3), sync=sync)
            c, b = t["compress"].median, t["bare"].median
            padded = sum(int(x.numel()) for x, _ in batches)
            tp_rows.append({"batch_size": bs, "batching": "bucketed" if bucketed else "unsorted",
                            "padding": 1 - (real + len(ids)) / padded,
                            "compress_chunks_s": len(ids) / c, "compress_tokens_s": real / c,
                            "bare_tokens_s": real / b, "overhead": c / b,
                            "compress": t["compress"].to_dict(), "bare": t["bare"].to_dict()})
            r = tp_rows[-1]
            print(f"  batch {bs:>3} {r['batching']:<8}  compress {r['compress_tokens_s']:10.0f} tok/s  "
                  f"bare {r['bare_tokens_s']:10.0f} tok/s  ratio {r['overhead']:.3f}")
    if tp_rows:
        print(table(tp_rows, [("batch_size", "batch", "d"), ("batching", "batches", ""), ("padding", "padding", ".1%"),
                              ("compress_chunks_s", "compress chunks/s", ".1f"), ("compress_tokens_s", "compress tok/s", ",.0f"),
                              ("bare_tokens_s", "bare fwd tok/s", ",.0f"), ("overhead", "compress / bare", ".3f")]))
    at_k = [r for r in ttft_rows if r["k"] == TARGET_K]
    rec.results = {
        "ttft": ttft_rows, "throughput": tp_rows, "skipped_over_budget": skipped,
        "targets": {"ttft_fraction_at_k5": [round(r["fraction_of_ideal"], 4) for r in at_k],
                    "ttft_met": bool(at_k) and all(r["fraction_of_ideal"] >= TARGET_FRACTION for r in at_k),
                    "worst_overhead": max((r["overhead"] for r in tp_rows), default=None),
                    "throughput_met": bool(tp_rows) and max(r["overhead"] for r in tp_rows) <= THROUGHPUT_TARGET},
    }
    rec.results["vllm_serving"] = serve_on_vllm(comp, args, dry, dtype, vocab, rng, over_budget)
    if device.startswith("cuda"):
        rec.results["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if skipped:
        print(f"skipped over the {budget:.0f} s budget: {', '.join(skipped)}")
    return rec.finish(out_dir)


class IdsWorkload:
    """Tokenizer-free RAG prompts for ``vllm_serving.compare``: random-id chunks as text or as stored latents."""

    def __init__(self, comp, store, prompt: Prompt, chunks: list[list[list[int]]], keys: list[list[str]]):
        self.comp, self.store, self.prompt, self.chunks, self.keys = comp, store, prompt, chunks, keys

    def prepare(self, path: str, idx: list[int]):
        if path == "text":
            return [self.prompt.text(self.chunks[i]) for i in idx], [[] for _ in idx]
        ids, latents = [], []
        fp = self.comp.feature_fingerprint
        for i in idx:
            found = self.store.get_many(self.keys[i], fp)
            ctx = self.comp.compress_features([found[k] for k in self.keys[i]])
            ids.append(self.prompt.compressed(len(ctx)))
            latents.append([c.latents for c in ctx])
        return ids, latents


def serve_on_vllm(comp, args, dry: bool, dtype: str, vocab: int, rng: random.Random, over_budget) -> dict:
    """Section 3: text vs compressed RAG on one vLLM engine, and on the transformers backend."""
    import importlib.util

    if args.no_vllm:
        return {"skipped": "--no-vllm"}
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here (`make .venv-vllm` on a CPU, `pip install vllm` on a GPU)"}
    if over_budget():
        return {"skipped": "over the time budget"}
    from semidyn_rag.serving import TransformersBackend, export_decoder
    from semidyn_rag.serving.vllm_engine import VLLMBackend
    from semidyn_rag.store import LatentStore

    from .vllm_serving import compare, versus

    n, k, L = (4, 3, 20) if dry else (args.vllm_questions, 5, 512)
    reps, new_tokens = (1, 4) if dry else (3, 32)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine_kwargs = {"dtype": dtype, "max_model_len": 512 if dry else 4096}
    if not dry:
        engine_kwargs["gpu_memory_utilization"] = 0.5  # the compressor's own models share the GPU
    prompt = Prompt(rng, vocab, comp.decoder.placeholder_id)
    chunks = [[random_ids(rng, L, vocab) for _ in range(k)] for _ in range(n)]
    keys = [[hashlib.sha256(f"{i}/{j}".encode()).hexdigest() for j in range(k)] for i in range(n)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        store = LatentStore(Path(work) / "latents.sqlite")
        for cs, ks_ in zip(chunks, keys):
            store.put_many(zip(ks_, comp.encode_ids(cs, batch_size=k)))
        served = export_decoder(comp, Path(work) / "decoder", verify=False)
        backends = {"vllm": VLLMBackend(comp.decoder, served.path, **engine_kwargs),
                    "transformers": TransformersBackend(comp.decoder)}
        started = time.perf_counter() - t0
        try:
            rows = compare(backends, IdsWorkload(comp, store, prompt, chunks, keys), n, min(n, 8), new_tokens,
                           reps, 1)
        finally:
            for b in backends.values():
                b.close()
            store.close()
    pre = next(r for r in rows if r["backend"] == "vllm" and r["mode"] == "prefill")
    return {"questions": n, "k": k, "chunk_tokens": L, "new_tokens": new_tokens, "reps": reps,
            "engine": engine_kwargs, "setup_s": round(started, 1), "rows": rows, "vllm_vs_transformers": versus(rows),
            "target": {"prefill_rps_fraction": round(pre["rps_fraction_of_ideal"], 4),
                       "met": pre["rps_fraction_of_ideal"] >= TARGET_FRACTION}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_h200", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model of the same family, CPU, seconds")
    p.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 (float32 with --dry-run)")
    p.add_argument("--lora", action="store_true", help="wrap both models in unmerged LoRA r=16 adapters "
                                                        "(default: frozen bases, i.e. adapters merged)")
    p.add_argument("--reps", type=int, default=9, help="TTFT repetitions (end-to-end and throughput use a third)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated end-to-end")
    p.add_argument("--chunks", type=int, default=256, help="contexts per throughput pass")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    p.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/results)")
    p.add_argument("--threads", default="auto", help="torch threads when running on the CPU (--dry-run)")
    p.add_argument("--no-vllm", action="store_true", help="skip section 3 (serving on vLLM)")
    p.add_argument("--vllm-questions", type=int, default=32, help="questions served in section 3 (default 32)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
