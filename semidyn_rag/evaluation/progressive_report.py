"""Figures of progressive reading against flat reading at matched latent budgets.

Two studies over a rag setting with a ``precompress`` corpus:

* ``report EVAL_DIR``: from the ``samples.jsonl`` of an eval run with the ``progressive_*``
  systems, per system: accuracy (95% Wilson interval), the mean budget and positions used,
  recall of the gold passage among the chunks read and among the chunks expanded, decoder
  prefill positions (answering read plus scan), time to first token (median, mean), and paired
  wins and losses against flat top-n reading at the same budget. Writes ``progressive.json``
  and ``progressive.png`` (accuracy against the mean latent budget, one curve per reading).
* ``signals``: for each question, where every relevance signal ranks the gold chunk among the
  top-k retrieved (recall@m), with the scan's positions and time; a signal that reads the
  chunks together is also run on them in reverse order (``*_reversed``), which separates
  content from position.
  One line per question in ``signals.jsonl`` (rerun to resume), summary in ``signals.json``.

A chunk is gold when its text lies inside the question's own context (the rule ``eval`` uses).
Run: ``python -m semidyn_rag.evaluation.progressive_report report|signals ...``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import atomic_path, atomic_write_text
from .metrics import sign_test_p, wilson_interval

_NAME = re.compile(r"progressive_(?:(flat)_(top|all)\d*|([a-z]+))_(?:b(\d+))?x(\d+)$")


def _norm(text: str) -> str:
    return " ".join(text.split())


def gold_flags(directory, samples, k: int) -> dict[str, list[bool]]:
    """Per question id: for each of its top-k retrieved chunks, whether it is gold."""
    out = {}
    for q in tqdm(samples, desc="gold chunks", unit="q"):
        own = _norm(q.context or "")
        out[q.id] = [bool(own) and _norm(h.chunk.text) in own for h in directory.search(q.question, k)]
    return out


def _kind(system: str) -> tuple[str, int] | None:
    """(reading kind, budget factor) of a progressive system name, or None."""
    m = _NAME.match(system)
    if not m:
        return None
    kind = f"flat_{m.group(2)}" if m.group(1) else m.group(3)
    return kind, int(m.group(5))


def budget_report(eval_dir: Path, flags: dict[str, list[bool]]) -> dict:
    """Per system figures (see the module docstring) from ``eval_dir/samples.jsonl``."""
    rows: dict[str, list[dict]] = defaultdict(list)
    with open(eval_dir / "samples.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[r["system"]].append(r)
    systems = {}
    for name, rs in sorted(rows.items()):
        kind = _kind(name)
        rs = [r for r in rs if r["sample_id"] in flags]
        n, c = len(rs), sum(r["correct"] for r in rs)
        s = {"system": name, "kind": kind[0] if kind else name, "budget_factor": kind[1] if kind else None,
             "n": n, "accuracy": c / n if n else None, "accuracy_ci95": list(wilson_interval(c, n)) if n else None,
             "f1": statistics.fmean(r["f1"] for r in rs) if n else None,
             "ttft_s_median": statistics.median(r["ttft_s"] for r in rs) if n else None,
             "ttft_s_mean": statistics.fmean(r["ttft_s"] for r in rs) if n else None,
             "prefill_s_median": statistics.median(r["prefill_s"] for r in rs) if n else None}
        ex = [r for r in rs if r.get("extra")]
        if ex:
            read = [[i for i, fac, _ in r["extra"]["reads"] if fac] for r in ex]
            # flat readings expand nothing (runs before that fix flagged sizes finer than 16x)
            grown = [[i for i, _, e in r["extra"]["reads"] if e and not s["kind"].startswith("flat")] for r in ex]
            fl = [flags[r["sample_id"]] for r in ex]
            s.update(
                budget=statistics.fmean(r["extra"]["budget"] for r in ex),
                used=statistics.fmean(r["extra"]["used"] for r in ex),
                chunks_read=statistics.fmean(len(x) for x in read),
                chunks_expanded=statistics.fmean(len(x) for x in grown),
                chunks_as_text=statistics.fmean(sum(fac == 1 for _, fac, _ in r["extra"]["reads"]) for r in ex),
                gold_recall_read=statistics.fmean(any(f[i] for i in x if i < len(f)) for x, f in zip(read, fl)),
                gold_recall_expanded=statistics.fmean(any(f[i] for i in x if i < len(f)) for x, f in zip(grown, fl)),
                scan_positions=statistics.fmean(r["extra"]["scan_positions"] for r in ex),
                prefill_positions=statistics.fmean(r["prefill_tokens"] + r["extra"]["scan_positions"] for r in ex),
                answer_prefill_positions=statistics.fmean(r["prefill_tokens"] for r in ex),
                scan_s_median=statistics.median(r["extra"]["scan_s"] for r in ex),
            )
        else:
            s["prefill_positions"] = statistics.fmean(r["prefill_tokens"] for r in rs) if n else None
        systems[name] = s
    for name, s in systems.items():  # paired against flat top-n at the same budget
        ref = next((o for o in systems.values() if o["kind"] == "flat_top" and o["budget_factor"] == s["budget_factor"]
                    and o is not s), None)
        if ref is None or s["budget_factor"] is None:
            continue
        mine = {r["sample_id"]: r["correct"] for r in rows[name]}
        theirs = {r["sample_id"]: r["correct"] for r in rows[ref["system"]]}
        both = [q for q in mine if q in theirs and q in flags]
        wins = sum(mine[q] and not theirs[q] for q in both)
        losses = sum(theirs[q] and not mine[q] for q in both)
        s["vs_flat_top"] = {"reference": ref["system"], "wins": wins, "losses": losses,
                            "sign_test_p": sign_test_p(wins, losses)}
    return {"eval_dir": str(eval_dir), "questions": len(flags), "systems": list(systems.values())}


def markdown(report: dict) -> str:
    """One row per system, grouped by budget: the figures of ``budget_report`` as a Markdown table."""
    head = ("| budget (mean latents) | reading | acc | 95% CI | F1 | chunks read | expanded (as text) | "
            "gold among read | gold among expanded | prefill positions (answer + scan) | "
            "vs flat top: wins / losses (p) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {"flat_top": 0, "flat_all": 1, "retriever": 2, "attention": 3, "likelihood": 4}
    rows = sorted((s for s in report["systems"] if s.get("budget") is not None),
                  key=lambda s: (s["budget_factor"] and -s["budget_factor"], order.get(s["kind"], 9)))
    for s in rows:
        vs = s.get("vs_flat_top")
        lo, hi = s["accuracy_ci95"]
        scan = f" ({s['answer_prefill_positions']:.0f} + {s['scan_positions']:.0f})" if s["scan_positions"] else ""
        lines.append(
            f"| {s['budget']:.0f} (top 5 at {s['budget_factor']}x) | {s['kind']} | {s['accuracy']:.1%} | "
            f"{lo:.1%}-{hi:.1%} | {s['f1']:.3f} | {s['chunks_read']:.1f} | {s['chunks_expanded']:.2f} "
            f"({s['chunks_as_text']:.2f}) | "
            f"{s['gold_recall_read']:.1%} | {s['gold_recall_expanded']:.1%} | {s['prefill_positions']:.0f}{scan} | "
            + (f"{vs['wins']} / {vs['losses']} ({vs['sign_test_p']:.2f})" if vs else "-") + " |")
    base = next((s for s in report["systems"] if s["system"] == "no_context"), None)
    if base:
        lines.append(f"\nNo context: {base['accuracy']:.1%} ({base['n']} questions).")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy against the mean latent budget, a curve per reading, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"flat_top": "flat, top 5 at F (reference)", "flat_all": "flat, all 20 at the factor that fits",
              "retriever": "progressive, retriever scores", "attention": "progressive, attention mass",
              "likelihood": "progressive, question likelihood"}
    ticks = {}
    for j, (kind, label) in enumerate(labels.items()):
        pts = sorted((s["budget"], s["accuracy"], s["accuracy_ci95"], s["budget_factor"]) for s in report["systems"]
                     if s["kind"] == kind and s.get("budget") is not None)
        if not pts:
            continue
        ticks.update({p[0]: p[3] for p in pts if kind == "flat_top"})
        xs, ys = [p[0] * 2 ** ((j - 2) * 0.025) for p in pts], [p[1] for p in pts]  # side by side, not stacked
        err = [[y - p[2][0] for y, p in zip(ys, pts)], [p[2][1] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, alpha=0.85)
    base = next((s for s in report["systems"] if s["system"] == "no_context"), None)
    if base and base["accuracy"] is not None:
        ax.axhline(base["accuracy"], color="grey", ls="--", lw=1, label="no context")
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(list(ticks), [f"{b:.0f}\n(top 5 at {f}x)" for b, f in ticks.items()])
        ax.minorticks_off()
    ax.set_xlabel("latent budget per question (decoder positions for chunks, mean)")
    ax.set_ylabel("substring accuracy")
    ax.set_title(f"Flat vs progressive reading at equal budgets ({report['questions']} questions)")
    ax.grid(alpha=0.3)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.35 * (hi - lo))  # room for the legend above the curves
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def signal_study(args) -> dict:
    """Rank of the gold chunk under each signal, per question (resumable), and recall@m."""
    import torch

    from ..compressor import SemiDynamicCompressor
    from ..corpus import CorpusDirectory
    from ..progressive import ProgressiveReader, make_signal
    from .datasets import load_qa_dataset, sample_subset

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "signals.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    done = {row["id"]: row for row in map(json.loads, filter(str.strip, lines))}
    samples = sample_subset(load_qa_dataset(args.dataset), args.limit, args.seed)
    comp = SemiDynamicCompressor.from_pretrained(args.compressor, device="cpu")
    signals = [make_signal(s) for s in args.signals]
    with CorpusDirectory(args.corpus, readonly_store=True) as cd, open(log, "a", encoding="utf-8") as f:
        for q in tqdm([q for q in samples if q.id not in done], desc="signals", unit="q"):
            hits = cd.search(q.question, args.k)
            own = _norm(q.context or "")
            gold = [_norm(h.chunk.text) in own for h in hits]
            feats = cd.features(hits, comp, write_back=False).features
            coarse = comp.compress_features(feats, **{comp.pooling.takes: ProgressiveReader(comp).coarse})
            row = {"id": q.id, "gold": gold}
            for sig in signals:
                # a signal that reads the chunks together also reads them in reverse order: what follows
                # position, not content, flips
                for name, flip in ((sig.name, False), (f"{sig.name}_reversed", True)) if sig.order_matters else (
                        (sig.name, False),):
                    t0 = time.perf_counter()
                    rel, pos = sig.relevance(comp, q.question + args.question_suffix,
                                             (coarse[::-1] if flip else coarse) if sig.needs_scan else None,
                                             [h.score for h in hits], len(hits))
                    rel = rel[::-1] if flip else rel
                    order = sorted(range(len(rel)), key=lambda i: (-rel[i], i))
                    ranks = [order.index(i) + 1 for i, g in enumerate(gold) if g]
                    row[name] = {"gold_rank": min(ranks) if ranks else None, "positions": pos,
                                 "seconds": round(time.perf_counter() - t0, 4), "top": order[:3]}
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[q.id] = row
    rows = list(done.values())
    summary = {"questions": len(rows), "gold_in_top_k": sum(any(r["gold"]) for r in rows), "k": args.k}
    names = [n for s in signals for n in ((s.name, f"{s.name}_reversed") if s.order_matters else (s.name,))]
    for sig in names:
        got = [r[sig] for r in rows if sig in r]
        summary[sig] = {f"recall@{m}": sum(g["gold_rank"] is not None and g["gold_rank"] <= m for g in got) / len(got)
                        for m in (1, 2, 3, 5, 10)} | {
            "scan_positions": statistics.fmean(g["positions"] for g in got),
            "seconds_median": statistics.median(g["seconds"] for g in got),
            "top1_position": dict(sorted(Counter(g["top"][0] for g in got).most_common(5)))}
    atomic_write_text(out / "signals.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="figures and Pareto plot from an eval folder")
    r.add_argument("eval_dir", type=Path)
    s = sub.add_parser("signals", help="where each relevance signal ranks the gold chunk")
    s.add_argument("--compressor", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--signals", default="retriever,attention,likelihood", type=lambda t: t.split(","))
    s.add_argument("--threads", type=int, default=1)
    for p in (r, s):
        p.add_argument("--corpus", required=True)
        p.add_argument("--dataset", required=True)
        p.add_argument("--k", type=int, default=20)
        p.add_argument("--limit", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--question-suffix", default="")
    args = ap.parse_args(argv)
    if args.cmd == "signals":
        print(json.dumps(signal_study(args), indent=2))
        return 0
    from ..corpus import CorpusDirectory
    from .datasets import load_qa_dataset, sample_subset

    samples = sample_subset(load_qa_dataset(args.dataset), args.limit, args.seed)
    with CorpusDirectory(args.corpus, readonly_store=True) as cd:
        flags = gold_flags(cd, samples, args.k)
    rep = budget_report(args.eval_dir, flags)
    atomic_write_text(args.eval_dir / "progressive.json", json.dumps(rep, indent=2) + "\n")
    plot(rep, args.eval_dir / "progressive.png")
    atomic_write_text(args.eval_dir / "progressive.md", markdown(rep))
    for s in rep["systems"]:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
