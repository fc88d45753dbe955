"""What every benchmark shares: timing (medians after warm-up), machine facts, models, texts, output.

Times are medians over repetitions after warm-up, and paired measurements are interleaved
(A B A B ...) so that a change in machine load hits both sides alike; the ratio of the two
medians is the figure to read. The 1-minute load average is recorded at the start and end of
every benchmark, because these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = ("embedded", "tiny")


# -- timing -------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock samples of one measured operation (seconds), warm-up excluded."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the range between the 25th and 75th percentiles, relative to the median."""
        if len(self.samples) < 2 or self.median == 0:
            return 0.0
        q = np.percentile(self.samples, [25, 75])
        return float((q[1] - q[0]) / 2 / self.median)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.samples), "spread": round(self.spread, 4),
                "samples_s": [round(s, 6) for s in self.samples]}


def measure(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5, sync: Callable[[], None] | None = None) -> Timing:
    """Time ``fn`` ``reps`` times after ``warmup`` untimed calls."""
    return measure_interleaved({"_": fn}, warmup=warmup, reps=reps, sync=sync)["_"]


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, reps: int = 5,
                        sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time several operations round-robin (A B A B ...), each ``reps`` times after warm-up."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t)
    return {k: Timing(v) for k, v in samples.items()}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


# -- machine ------------------------------------------------------------------------------------


def configure_threads(spec: str | int) -> int:
    """Set torch's intra-op threads: a number, or ``auto`` = the cores not busy right now.

    On a shared machine, OpenMP threads that outnumber the free cores spin against other
    processes and run many times slower than one thread would, so ``auto`` subtracts the
    1-minute load average from the core count (at least one thread).
    """
    import torch

    cores = os.cpu_count() or 1
    if str(spec) == "auto":
        n = max(1, min(cores, round(cores - os.getloadavg()[0])))
    else:
        n = int(spec)
        if n < 1:
            raise ValueError(f"--threads must be positive or 'auto', got {spec}")
    torch.set_num_threads(n)
    return n


def machine_info() -> dict:
    """CPU, software versions and the current load: what a reader needs to compare runs."""
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@dataclass
class Run:
    """One benchmark's record: its settings, machine facts at start and end, and results."""

    name: str
    settings: dict
    machine: dict = field(default_factory=machine_info)
    results: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def finish(self, out_dir: Path | str | None = None) -> dict:
        """Close the record (end load, duration), write ``<name>.json``; return the record."""
        record = {"benchmark": self.name, "settings": self.settings, "machine": self.machine,
                  "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                  "seconds": round(time.perf_counter() - self.started, 2), **self.results}
        path = write_json(self.name, record, out_dir)
        print(f"wrote {path}  (load {self.machine['loadavg'][0]:.2f} -> {record['loadavg_end'][0]:.2f}, "
              f"{record['seconds']:.0f} s)")
        return record


def write_json(name: str, data: dict, out_dir: Path | str | None = None) -> Path:
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def save_plot(fig, name: str, out_dir: Path | str | None = None) -> Path:
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- tables -------------------------------------------------------------------------------------


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table: ``columns`` are (key, header, format spec) triples."""
    head = [h for _, h, _ in columns]
    body = []
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, spec) if spec and isinstance(v, (int, float)) else str(v))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


# -- arguments ----------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, default_model: str = "embedded") -> None:
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--model", choices=MODELS, default=default_model,
                        help="embedded: the untrained SmolLM2-135M default compressor (speed does not "
                             "depend on training); tiny: a random 2-layer 64-d Qwen3 (test model)")
    parser.add_argument("--threads", default="auto", help="torch threads, or 'auto' (free cores now)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default per benchmark)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls")
    parser.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--no-plot", action="store_true", help="skip PNG plots")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# -- models -------------------------------------------------------------------------------------


def load_compressor(model: str, workdir: Path | str):
    """(compressor, description) for ``embedded`` (SmolLM2-135M default) or ``tiny`` (test models)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from semidyn_rag import CompressorConfig, SemiDynamicCompressor

    if model == "embedded":
        from semidyn_rag.default_compressor import default_compressor_path

        path, trained = default_compressor_path()
        comp = SemiDynamicCompressor.from_pretrained(str(path), device="cpu")
        return comp, describe(comp, "embedded default, " + ("trained" if trained else "untrained"))
    if model != "tiny":
        raise ValueError(f"unknown model {model!r}; use one of {', '.join(MODELS)}")
    from semidyn_rag.testing import build_tiny_model

    root = Path(workdir) / "tiny-models"
    enc, dec = root / "encoder", root / "decoder"
    if not (enc / "config.json").is_file():
        build_tiny_model(enc, hidden_size=64, seed=1)
    if not (dec / "config.json").is_file():
        build_tiny_model(dec, hidden_size=96, seed=2)
    cfg = CompressorConfig(encoder=str(enc), decoder=str(dec), projector_hidden_size=128, device="cpu")
    torch_seed(0)
    comp = SemiDynamicCompressor(cfg)
    return comp, describe(comp, "tiny random Qwen3 test models")


def describe(comp, what: str) -> str:
    """One line naming the models and the settings that decide speed."""
    c = comp.config
    enc, dec = comp.encoder.model.config, comp.decoder.model.config
    lora = lambda side, s: f"LoRA r={s.r}" if side == "lora" else side  # noqa: E731
    return (f"{what}: encoder {enc.model_type} {enc.num_hidden_layers} layers {enc.hidden_size}-d "
            f"({lora(c.encoder_training, c.encoder_lora)}), decoder {dec.model_type} {dec.num_hidden_layers} layers "
            f"{dec.hidden_size}-d ({lora(c.decoder_training, c.decoder_lora)}), factors {list(c.factors)}, "
            f"projector {c.projector_hidden_size}, {str(comp.dtype).removeprefix('torch.')}")


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def decoder_kv_bytes_per_token(model_config, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token occupies: 2 (K and V) x layers x kv heads x head dim x bytes."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv * head_dim * bytes_per_value


# -- texts --------------------------------------------------------------------------------------


def source_text(min_chars: int = 200_000) -> str:
    """Real prose to cut chunks from: the embedded Wikipedia summaries, else generated text."""
    try:
        from semidyn_rag.embedded import demo_corpus

        parts, total = [], 0
        for rec in demo_corpus(split="reserved"):  # the half never trained on
            parts.append(rec["text"])
            total += len(rec["text"])
            if total >= min_chars:
                break
        if total >= min_chars // 4:
            return "\n\n".join(parts)
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    gen = TextGenerator(seed=0)
    return " ".join(gen.document(i, 60) for i in range(max(1, min_chars // 400)))


def texts_of_tokens(tokenizer, n: int, tokens: int | list[int], *, seed: int = 0, source: str | None = None) -> list[str]:
    """``n`` normalised texts of about ``tokens`` tokens each (one count, or one per text).

    Windows of the source's token ids are decoded back to text (shortened where re-tokenising
    would exceed the count), so a text may come out a token or two short; callers report the
    counts they measure.
    """
    from semidyn_rag.store import normalize_text

    want = [tokens] * n if isinstance(tokens, int) else list(tokens)
    if len(want) != n:
        raise ValueError(f"{n} texts but {len(want)} token counts")
    ids = tokenizer(source or source_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for t in want:
        if t >= len(ids):
            raise ValueError(f"the source text has only {len(ids)} tokens; cannot cut {t}")
        s = rng.randrange(0, len(ids) - t)
        for cut in range(t, 0, -1):  # re-tokenising may add a token or two: never exceed ``t``
            text = normalize_text(tokenizer.decode(ids[s : s + cut], skip_special_tokens=True))
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= t:
                break
        out.append(text or "empty window")
    return out


class TextGenerator:
    """Seeded topical pseudo-text: documents of a topic share most of their words.

    Used where real text would be too slow or too scarce (100k chunks); topics give the
    retrieval embeddings some structure, as real corpora have.
    """

    def __init__(self, seed: int = 0, vocab: int = 4000, topics: int = 64, topic_words: int = 80):
        rng = random.Random(seed)
        syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "da", "fe", "go", "hu", "pi", "ze", "bo", "ti",
                "an", "er", "in", "on", "ur", "el", "is", "ar"]
        words: set[str] = set()
        while len(words) < vocab:
            words.add("".join(rng.choice(syll) for _ in range(rng.randint(1, 4))))
        self.words = sorted(words)
        self.topics = [rng.sample(self.words, topic_words) for _ in range(topics)]
        self.seed = seed

    def document(self, i: int, n_words: int) -> str:
        rng = random.Random(self.seed * 1_000_003 + i)
        topic = self.topics[i % len(self.topics)]
        words = [rng.choice(topic) if rng.random() < 0.7 else rng.choice(self.words) for _ in range(n_words)]
        out, s = [f"Record {i}."], 0
        while s < len(words):
            e = s + rng.randint(6, 12)
            sent = " ".join(words[s:e])
            out.append(sent[0].upper() + sent[1:] + ".")
            s = e
        return " ".join(out)

    def query(self, doc: int, n_words: int, doc_words: int) -> str:
        """A known-item query: ``n_words`` words drawn from document ``doc``."""
        rng = random.Random(self.seed * 7_919 + doc + 17)
        words = self.document(doc, doc_words).lower().replace(".", "").split()[2:]
        return " ".join(rng.sample(words, min(n_words, len(words))))


class HashingEmbedder:
    """Signed feature hashing of words into unit vectors: a retrieval embedder that costs microseconds.

    Scaling runs embed 100k chunks; a neural embedder would dominate the build time there
    and say nothing about the compressor. Duck-types ``semidyn_rag.corpus.Embedder``.
    """

    def __init__(self, dim: int = 384):
        self.dim = dim
        self.name = f"bench-hashing-{dim}"

    def embed(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in t.lower().replace(".", " ").split():
                h = zlib.crc32(w.encode())
                out[r, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)
