"""Compressed RAG served by vLLM: requests/s and time to first token, text RAG vs latents, one engine.

k retrieved chunks per question, n questions. The same vLLM engine serves both paths: text RAG
sends each prompt (chunks pasted in) as token ids; compressed RAG reads the chunks' features
from a ``LatentStore``, derives and projects their latents (``compress_features``) and sends the
prompt as prompt embeddings with the latents at the placeholders. Measured, interleaved
(text, compressed) per repetition:

* ``latency``: questions one at a time, one new token: TTFT = store read + projector + prompt +
  prefill + first token (text: prompt + prefill + first token);
* ``prefill``: all n questions submitted at once, one new token each: requests/s (prefill work);
* ``generate``: all n at once, exactly ``--new-tokens`` new tokens each: requests/s and the
  TTFT each request sees in the batch.

The ideal speed-up is the ratio of prefill positions; the target is a compressed-over-text
speed-up on vLLM of at least 80% of it. The same questions through the transformers backend
(Hugging Face ``generate``, one padded batch) give the speed-up of vLLM over it. Run with the
vLLM environment (``make .venv-vllm``); samples are saved as they come, so a killed run resumes::

    .venv-vllm/bin/python -m benchmarks.vllm_serving [--quick] [--questions 32] [--k 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR, Run, add_common_arguments, configure_threads, load_compressor, pyplot, save_plot
from .common import table, texts_of_tokens
from .ttft import TARGET_FRACTION, text_prompt

QUESTIONS = ("Which places, people and dates do these passages mention?", "What is the main subject here?",
             "Who is named first, and why?", "Which numbers appear in these passages?")
MODES = ("latency", "prefill", "generate")


class Workload:
    """n questions with k chunks each, as text prompts and as compressed prompts read from a store."""

    def __init__(self, comp, store, chunks: list[list[str]], keys: list[list[str]], scale: float = 0.0):
        self.comp, self.store, self.chunks, self.keys, self.scale = comp, store, chunks, keys, scale
        self.dec, self.fp = comp.decoder, comp.feature_fingerprint

    def question(self, i: int) -> str:
        return QUESTIONS[i % len(QUESTIONS)]

    def prepare(self, path: str, idx: list[int]) -> tuple[list[list[int]], list[list]]:
        """(token ids, latents) of questions ``idx`` on ``path`` (text or compressed), timed by the caller."""
        dec = self.dec
        if path == "text":
            rendered = [dec.apply_chat(text_prompt(self.question(i), self.chunks[i])) for i in idx]
            return dec.encode_prompts(rendered), [[] for _ in idx]
        ids, latents = [], []
        for i in idx:
            found = self.store.get_many(self.keys[i], self.fp)
            ctx = self.comp.compress_features([found[k] for k in self.keys[i]], scale=self.scale)
            ids.append(dec.encode_prompts([dec.render(self.question(i), len(ctx))])[0])
            latents.append([c.latents for c in ctx])
        return ids, latents


def run_once(backend, work: Workload, path: str, mode: str, idx: list[int], new_tokens: int) -> dict:
    """One timed sample: ``latency`` one request at a time, else all of ``idx`` submitted together."""
    n_new = new_tokens if mode == "generate" else 1
    kwargs = {"min_new_tokens": n_new}
    if mode == "latency":
        ttft, positions = [], []
        t_all = time.perf_counter()
        for i in idx:
            t0 = time.perf_counter()
            ids, lat = work.prepare(path, [i])
            prep = time.perf_counter() - t0
            (c,) = backend.complete(ids, lat, n_new, **kwargs)
            ttft.append(prep + (c.ttft_s if c.ttft_s is not None else c.total_s))
            positions.append(c.prompt_positions)
        wall = time.perf_counter() - t_all
    else:
        t0 = time.perf_counter()
        ids, lat = work.prepare(path, idx)
        prep = time.perf_counter() - t0
        done = backend.complete(ids, lat, n_new, **kwargs)
        wall = time.perf_counter() - t0
        ttft = [prep + (c.ttft_s if c.ttft_s is not None else c.total_s) for c in done]
        positions = [c.prompt_positions for c in done]
    return {"wall_s": wall, "requests_per_s": len(idx) / wall, "ttft_s": ttft, "positions": positions,
            "load": round(os.getloadavg()[0], 2)}


class Samples:
    """Timed samples saved after each one (``<out>/vllm_serving.partial.json``), so a rerun resumes."""

    def __init__(self, path: Path | None, settings: dict):
        self.path, self.settings = path, settings  # no path: nothing is saved
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        self.data = data.get("samples", {}) if data.get("settings") == settings else {}

    def get(self, key: str, fn) -> dict:
        if key not in self.data:
            self.data[key] = fn()
            if self.path is None:
                return self.data[key]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings": self.settings, "samples": self.data}))
            os.replace(tmp, self.path)
        return self.data[key]


def summarise(samples: list[dict], mode: str) -> dict:
    ttft = [t for s in samples for t in s["ttft_s"]]
    return {"requests_per_s": statistics.median(s["requests_per_s"] for s in samples),
            "wall_s": statistics.median(s["wall_s"] for s in samples),
            "ttft_median_s": statistics.median(ttft), "ttft_p90_s": sorted(ttft)[int(0.9 * (len(ttft) - 1))],
            "positions": sum(samples[0]["positions"]), "reps": len(samples),
            "load": [s["load"] for s in samples]}


def compare(backends: dict, work, n: int, latency_n: int, new_tokens: int, reps: int, warmup: int,
            samples: Samples | None = None) -> list[dict]:
    """Rows (backend, mode, text vs compressed) with speed-ups and their fraction of the ideal.

    ``work`` answers ``prepare(path, idx) -> (token ids, latents)`` (see ``Workload``).
    """
    samples = samples or Samples(None, {})
    rows = []
    for name, backend in backends.items():
        for mode in MODES:
            idx = list(range(latency_n if mode == "latency" else n))
            for w in range(warmup):  # untimed: first calls pay one-off costs
                for path in ("text", "compressed"):
                    samples.get(f"{name}/{mode}/{path}/warmup{w}",
                                lambda: run_once(backend, work, path, mode, idx[:2], 2))
            got = {"text": [], "compressed": []}
            for rep in range(reps):
                for path in ("text", "compressed"):
                    got[path].append(samples.get(f"{name}/{mode}/{path}/{rep}",
                                                 lambda: run_once(backend, work, path, mode, idx, new_tokens)))
            t, c = summarise(got["text"], mode), summarise(got["compressed"], mode)
            row = {"backend": name, "mode": mode, "questions": len(idx),
                   "new_tokens": new_tokens if mode == "generate" else 1,
                   "positions_text": t["positions"], "positions_compressed": c["positions"],
                   "ideal_speedup": t["positions"] / c["positions"],
                   "rps_text": t["requests_per_s"], "rps_compressed": c["requests_per_s"],
                   "ttft_text_s": t["ttft_median_s"], "ttft_compressed_s": c["ttft_median_s"],
                   "ttft_p90_text_s": t["ttft_p90_s"], "ttft_p90_compressed_s": c["ttft_p90_s"],
                   "text": t, "compressed": c}
            row["rps_speedup"] = row["rps_compressed"] / row["rps_text"]
            row["ttft_speedup"] = row["ttft_text_s"] / row["ttft_compressed_s"]
            row["rps_fraction_of_ideal"] = row["rps_speedup"] / row["ideal_speedup"]
            row["ttft_fraction_of_ideal"] = row["ttft_speedup"] / row["ideal_speedup"]
            rows.append(row)
            print(f"  {name:<12} {mode:<8} positions {t['positions']:>6} -> {c['positions']:<6} "
                  f"ideal {row['ideal_speedup']:.2f}x  req/s {row['rps_text']:.2f} -> {row['rps_compressed']:.2f} "
                  f"({row['rps_speedup']:.2f}x, {row['rps_fraction_of_ideal']:.0%})  TTFT {row['ttft_text_s']:.3f} "
                  f"-> {row['ttft_compressed_s']:.3f} s ({row['ttft_speedup']:.2f}x)", flush=True)
    return rows


def versus(rows: list[dict], a: str = "vllm", b: str = "transformers") -> list[dict]:
    """Backend ``a`` over backend ``b``, per mode and path: requests/s and TTFT ratios."""
    out = []
    by = {(r["backend"], r["mode"]): r for r in rows}
    for mode in MODES:
        if (a, mode) in by and (b, mode) in by:
            ra, rb = by[(a, mode)], by[(b, mode)]
            for path in ("text", "compressed"):
                out.append({"mode": mode, "path": path, "rps_ratio": ra[f"rps_{path}"] / rb[f"rps_{path}"],
                            "ttft_ratio": rb[f"ttft_{path}_s"] / ra[f"ttft_{path}_s"]})
    return out


def run(args) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    threads = configure_threads(args.threads)
    quick = args.quick
    n = args.questions or (8 if quick else 32)
    latency_n = min(n, args.latency_questions or (4 if quick else 8))
    reps = args.reps or (1 if quick else 3)
    warmup = 1 if args.warmup is None else args.warmup
    new_tokens = args.new_tokens or (8 if quick else 16)
    names = [b for b in args.backends.split(",") if b]
    out = Path(args.out) if args.out else RESULTS_DIR
    with tempfile.TemporaryDirectory() as workdir:
        comp, model_desc = load_compressor(args.model, workdir)
        from semidyn_rag.serving import TransformersBackend, served_decoder_path
        from semidyn_rag.serving.vllm_engine import VLLMBackend
        from semidyn_rag.store import LatentStore, chunk_key

        texts = texts_of_tokens(comp.encoder.tokenizer, n * args.k, args.chunk_tokens, seed=19)
        chunks = [texts[i * args.k:(i + 1) * args.k] for i in range(n)]
        keys = [[chunk_key(t) for t in cs] for cs in chunks]
        store = LatentStore(Path(workdir) / "latents.sqlite")
        store.put_many(zip((chunk_key(t) for t in texts), comp.encode(texts, batch_size=8)))  # the corpus store
        settings = {"model": model_desc, "questions": n, "latency_questions": latency_n, "k": args.k,
                    "chunk_tokens": args.chunk_tokens, "new_tokens": new_tokens, "reps": reps, "warmup": warmup,
                    "torch_threads": threads, "backends": names, "scale": 0.0, "dtype": "float32",
                    "vllm": {"enforce_eager": True, "prefix_caching": False, "max_model_len": args.max_model_len,
                             "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                             "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                             "engine_in_subprocess": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"}}
        rec = Run("vllm_serving", settings)
        print(f"vLLM serving: {n} questions x k={args.k} chunks of {args.chunk_tokens} tokens, {model_desc}, "
              f"load {rec.machine['loadavg'][0]:.2f}", flush=True)
        import vllm

        rec.machine["vllm"] = vllm.__version__
        backends = {}
        if "vllm" in names:
            backends["vllm"] = VLLMBackend(comp.decoder, served_decoder_path(comp), dtype="float32",
                                           max_model_len=args.max_model_len)
        if "transformers" in names:
            backends["transformers"] = TransformersBackend(comp.decoder)
        work = Workload(comp, store, chunks, keys)
        samples = Samples(out / "vllm_serving.partial.json", settings)
        try:
            rows = compare(backends, work, n, latency_n, new_tokens, reps, warmup, samples)
        finally:
            for b in backends.values():
                b.close()
            store.close()
    cols = [("backend", "backend", ""), ("mode", "mode", ""), ("questions", "questions", "d"),
            ("positions_text", "prefill text", "d"), ("positions_compressed", "prefill comp.", "d"),
            ("ideal_speedup", "ideal", ".2f"), ("rps_text", "req/s text", ".2f"), ("rps_compressed", "req/s comp.", ".2f"),
            ("rps_speedup", "req/s speed-up", ".2f"), ("rps_fraction_of_ideal", "of ideal", ".0%"),
            ("ttft_text_s", "TTFT text s", ".3f"), ("ttft_compressed_s", "TTFT comp. s", ".3f"),
            ("ttft_speedup", "TTFT speed-up", ".2f"), ("ttft_fraction_of_ideal", "of ideal", ".0%")]
    print(table(rows, cols))
    vs = versus(rows)
    if vs:
        print(table(vs, [("mode", "mode", ""), ("path", "path", ""), ("rps_ratio", "vLLM/transformers req/s", ".2f"),
                         ("ttft_ratio", "TTFT: transformers/vLLM", ".2f")]))
    target = _target(rows)
    if target:
        print(f"target: compressed RAG on vLLM >= {TARGET_FRACTION:.0%} of the ideal speed-up over text RAG: "
              f"{'met' if target['met'] else 'MISSED'} ({target['figure']})")
    rec.results = {"rows": rows, "vllm_vs_transformers": vs, "target": target}
    if not args.no_plot:
        plot(rows, vs, args.out)
    record = rec.finish(args.out)
    (out / "vllm_serving.partial.json").unlink(missing_ok=True)
    return record


def _target(rows: list[dict]) -> dict | None:
    """The prefill-throughput speed-up on vLLM against its ideal (TTFT, one request at a time, beside it)."""
    by = {(r["backend"], r["mode"]): r for r in rows}
    pre, lat = by.get(("vllm", "prefill")), by.get(("vllm", "latency"))
    if pre is None:
        return None
    out = {"fraction": TARGET_FRACTION, "prefill_rps_fraction": round(pre["rps_fraction_of_ideal"], 4),
           "met": pre["rps_fraction_of_ideal"] >= TARGET_FRACTION,
           "figure": f"{pre['rps_speedup']:.2f}x of ideal {pre['ideal_speedup']:.2f}x requests/s = "
                     f"{pre['rps_fraction_of_ideal']:.0%}"}
    if lat is not None:
        out["latency_ttft_fraction"] = round(lat["ttft_fraction_of_ideal"], 4)
        out["figure"] += f"; TTFT one at a time {lat['ttft_fraction_of_ideal']:.0%}"
    return out


def plot(rows: list[dict], vs: list[dict], out_dir) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [f"{'vLLM' if r['backend'] == 'vllm' else 'HF gen.'}\n{r['mode']}" for r in rows]
    x = list(range(len(rows)))
    w = 0.4
    axes[0].bar([i - w / 2 for i in x], [r["rps_text"] for r in rows], w, label="text RAG")
    axes[0].bar([i + w / 2 for i in x], [r["rps_compressed"] for r in rows], w, label="compressed RAG")
    axes[0].set_ylabel("requests / s")
    axes[1].bar([i - w / 2 for i in x], [r["ttft_text_s"] for r in rows], w, label="text RAG")
    axes[1].bar([i + w / 2 for i in x], [r["ttft_compressed_s"] for r in rows], w, label="compressed RAG")
    axes[1].set_ylabel("time to first token, median (s)")
    axes[1].set_yscale("log")
    axes[2].bar([i - w / 2 for i in x], [r["ideal_speedup"] for r in rows], w, label="ideal (prefill positions)",
                color="lightgray")
    axes[2].bar([i + w / 2 for i in x], [r["rps_speedup"] for r in rows], w, label="requests/s")
    axes[2].plot(x, [r["ttft_speedup"] for r in rows], "k^", label="TTFT")
    axes[2].set_ylabel("compressed over text (x)")
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("Compressed vs text RAG on one vLLM engine (and on transformers generate)")
    save_plot(fig, "vllm_serving", out_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_serving", description=__doc__.split("\n")[0])
    add_common_arguments(p)
    p.set_defaults(threads="1")
    p.add_argument("--questions", type=int, default=None, help="questions (default 32; quick 8)")
    p.add_argument("--latency-questions", type=int, default=None, help="asked one at a time (default 8; quick 4)")
    p.add_argument("--k", type=int, default=5, help="chunks per question (default 5)")
    p.add_argument("--chunk-tokens", type=int, default=150, help="tokens per chunk (default 150)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated in `generate` (default 16)")
    p.add_argument("--backends", default="vllm,transformers", help="comma list (default vllm,transformers)")
    p.add_argument("--max-model-len", type=int, default=2048)
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
