"""Are teacher-summary density labels from the decoder itself better than the zlib proxy? (issue 20)

The paper labels a context with y = log2(context tokens / ultra-concise summary tokens), from a
strong teacher. Here the only local LLM is SmolLM2-135M, so this checks on a sample whether its
own summaries carry a density signal: it asks it for the ultra-concise summary of each sampled
context (``semidyn-rag synth summarize``, the same prompt and limits), computes the paper's
label from the reply, and compares it with the two offline proxies (zlib bits per char, and LM
surprisal under the same model) by rank correlation. A label is worth training on only if it is
stable and agrees with *some* independent notion of density; a label that correlates with
nothing but context length is noise to the head.

    python recipes/embedded_default/label_check.py --data /work/runs/20/data --n 96 --out label_check

Writes OUT/label_check.json (correlations, acceptance, examples) and OUT/label_check.png.
Resumable: the teacher's replies are kept in OUT (``synth summarize``'s state file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def sample(data: Path, n: int) -> list[dict]:
    """n/2 recipe training contexts (AdversarialQA, news) and n/2 wiki (trainable half) texts, one record each.

    Drawn in the order of a salted hash: ``prepare_data.py`` picks its news chunks by the plain
    sha256 of their text, so unsalted order would draw news chunks only.
    """
    out = []
    for name in ("train_proxy.jsonl", "wiki_recon_proxy.jsonl"):
        seen: dict[str, dict] = {}
        for line in open(data / name):
            r = json.loads(line)
            if isinstance(r["context"], str) and len(r["context"].split()) >= 40:
                seen.setdefault(hashlib.sha256(b"label-check\n" + r["context"].encode()).hexdigest(), r)
        out += [seen[k] for k in sorted(seen)[: n // 2]]
    return out


def _rho(rows: list[dict], a: str, b: str) -> float | None:
    """Spearman's rank correlation of two fields, None when undefined (too few rows, a constant)."""
    xs, ys = [x[a] for x in rows], [x[b] for x in rows]
    if len(rows) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    value = spearmanr(xs, ys).statistic
    return round(float(value), 3) if math.isfinite(value) else None


def compare(rows: list[dict]) -> dict:
    """Acceptance and rank correlations of the teacher's labels with the proxies and with length."""
    kept = [x for x in rows if x["y_teacher"] is not None]
    for x in rows:
        x["log_len"] = math.log2(x["context_tokens"])
    ys = [x["y_teacher"] for x in kept]
    return {"n": len(rows), "accepted": len(kept),
            "spearman": {"teacher_vs_zlib": _rho(kept, "y_teacher", "y_zlib"),
                         "teacher_vs_lm": _rho(kept, "y_teacher", "y_lm"),
                         "zlib_vs_lm": _rho(rows, "y_zlib", "y_lm"),
                         "teacher_vs_context_length": _rho(kept, "y_teacher", "log_len"),
                         "zlib_vs_context_length": _rho(rows, "y_zlib", "log_len")},
            "y_teacher": {"mean": round(float(np.mean(ys)), 3), "std": round(float(np.std(ys)), 3)} if ys else None,
            "y_zlib_std": round(float(np.std([x["y_zlib"] for x in rows])), 3) if rows else None,
            "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the head-to-head data folder (prepare_data.py + synth proxy)")
    ap.add_argument("--n", type=int, default=96, help="contexts sampled (half QA contexts, half wiki)")
    ap.add_argument("--model", default="embedded:smollm2", help="the teacher (default: the decoder itself)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    records = sample(args.data, args.n)
    src = args.out / "sample.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    summarized = args.out / "summarized.jsonl"
    cli = [sys.executable, "-m", "semidyn_rag.cli", "synth"]
    subprocess.run(cli + ["summarize", str(src), "--out", str(summarized), "--teacher-model", args.model,
                          "--max-tokens", str(args.max_tokens), "--batch-size", "8", "--device", "cpu"], check=True)
    lm = args.out / "lm_proxy.jsonl"
    if not lm.is_file():
        subprocess.run(cli + ["proxy", str(src), "--out", str(lm), "--method", "lm", "--model", args.model,
                              "--device", "cpu"], check=True)

    from semidyn_rag.loading import load_tokenizer
    from semidyn_rag.training import load_records
    from semidyn_rag.training.labels import DensityLabeler

    labeler = DensityLabeler(load_tokenizer(args.model))  # the trainer's counting rule (end marker included)
    rows = []
    for r, s, p in zip(records, load_records(summarized), load_records(lm)):
        summary = s.concise_summary  # when set, the label is the summary's (not the zlib fraction's)
        rows.append({"source": r.get("source"), "context_tokens": labeler.count(r["context"]) + 1, "summary": summary,
                     "y_teacher": labeler.labels(s)[0] if summary else None,
                     "y_zlib": -math.log2(r["pseudo_summary_fraction"]),
                     "y_lm": -math.log2(p.pseudo_summary_fraction)})
    result = {"teacher": args.model, **compare(rows)}
    (args.out / "label_check.json").write_text(json.dumps(result, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    kept = [x for x in rows if x["y_teacher"] is not None]
    for ax, proxy in zip(axes, ("y_zlib", "y_lm")):
        for src_name, marker in (("wiki", "o"), ("", "s")):
            pts = [x for x in kept if (x["source"] or "").startswith("wiki") == bool(src_name)]
            ax.scatter([x[proxy] for x in pts], [x["y_teacher"] for x in pts], marker=marker, s=18,
                       label="wiki summaries" if src_name else "recipe contexts (QA, news)")
        ax.set_xlabel(f"{proxy[2:]} proxy label")
        ax.set_ylabel("SmolLM2 summary label log2(ctx/summary)")
        ax.set_title(f"Spearman {result['spearman']['teacher_vs_' + proxy[2:]]}")
        ax.legend(fontsize=8)
    fig.suptitle(f"Density labels on {len(rows)} contexts ({len(kept)} summaries accepted)")
    fig.tight_layout()
    fig.savefig(args.out / "label_check.png", dpi=110)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
