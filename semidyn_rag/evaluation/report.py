"""The report of a run: ``results.json``, ``results.md`` (a Markdown table) and ``pareto.png``.

The Pareto plot is the paper's main figure: accuracy against the average compression ratio
(over correctly answered questions), one curve per compressing system family (the text-pruning
peers each their own), with horizontal lines for the uncompressed and no-context baselines,
the 95% interval of every accuracy (error bars, shaded bands) and a labelled tick at every
factor the run compared. The table gives each system's query-time compression cost in ms
per question; for latent systems also with the features cached (a latent-store read) and
without (an encoder pass). For semi-dynamic points the table also gives the accuracy gain
over the fixed-factor curve at the same ratio (interpolated in log2 ratio) next to the
variance of log2 factor, the two axes of the paper's Figure 5. Below the table, per target
ratio, the most accurate and the cheapest system (``per_ratio``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..atomic import atomic_path, atomic_write_text
from .per_ratio import per_ratio, per_ratio_markdown
from .records import SystemSummary

CURVES = {"fixed": ("fixed factor (soft)", "o"), "semi_dynamic": ("semi-dynamic (soft)", "s"),
          "llmlingua2": ("LLMLingua-2", "^"), "longllmlingua": ("LongLLMLingua (text)", "v"),
          "sentence_optimizer": ("SentenceEmbeddingOptimizer (text)", "D"), "truncate": ("truncate (text)", "x")}


def plot_ratio(s: SystemSummary) -> float | None:
    """The x of a point: the correct-only ratio of sums, else the all-question one (hollow marker)."""
    return s.ratio_of_sums if s.ratio_of_sums is not None else s.ratio_all


def gain_over_fixed(summaries: Sequence[SystemSummary]) -> list[SystemSummary]:
    """Copies of ``summaries`` with ``gain_over_fixed`` set on semi-dynamic points inside the fixed curve."""
    fixed = sorted((math.log2(r), s.accuracy) for s in summaries
                   if s.family == "fixed" and (r := plot_ratio(s)))
    out = []
    for s in summaries:
        r = plot_ratio(s)
        gain = None
        if s.family == "semi_dynamic" and r and len(fixed) >= 2:
            x = math.log2(r)
            for (x0, y0), (x1, y1) in zip(fixed, fixed[1:]):
                if x0 <= x <= x1:
                    y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                    gain = s.accuracy - y
                    break
        out.append(replace(s, gain_over_fixed=gain))
    return out


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _fmt_interval(ci: Sequence[float] | None) -> str:
    return "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def markdown_table(summaries: Sequence[SystemSummary]) -> str:
    """One row per system: scores, correct-only ratios, selector statistics, sizes and latencies."""
    head = ("| system | n | acc | acc 95% CI | EM | F1 | ratio (mean) | ratio (sums) | ratio (all q) | latents/chunk | var log2 F | "
            "gain vs fixed | factors | prefill tok | compress ms/q | cached ms/q | encoder ms/q | "
            "retrieve s | compress s | prefill s | decode s | TTFT s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        hist = " ".join(f"{k}:{v}" for k, v in s.factor_histogram.items()) or "-"
        lines.append(
            f"| {s.system} | {s.n} | {s.accuracy:.3f} | {_fmt_interval(s.accuracy_ci95)} | {s.exact_match:.3f} | "
            f"{s.f1:.3f} | "
            f"{_fmt(s.mean_ratio, '.2f')} | {_fmt(s.ratio_of_sums, '.2f')} | {_fmt(s.ratio_all, '.2f')} | "
            f"{_fmt(s.positions_per_chunk, '.1f')} | "
            f"{_fmt(s.log2_factor_var)} | {_fmt(s.gain_over_fixed, '+.3f')} | {hist} | {s.prefill_tokens:.1f} | "
            f"{_ms(s.compress_s)} | {_ms(s.compress_cached_s)} | {_ms(s.compress_uncached_s)} | "
            f"{s.retrieve_s:.4f} | {s.compress_s:.4f} | {s.prefill_s:.4f} | {s.decode_s:.4f} | {s.ttft_s:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot_pareto(summaries: Sequence[SystemSummary], path: Path, title: str = "") -> None:
    """Accuracy vs average compression ratio (log2 axis), a curve per family, baseline lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    hollow_any = False
    ticks: set[float] = set()
    for family, (label, marker) in CURVES.items():
        pts = sorted((plot_ratio(s), s.accuracy, s.ratio_of_sums is None, s.accuracy_ci95) for s in summaries
                     if s.family == family and plot_ratio(s))
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ticks.update(s.param for s in summaries if s.family == family and s.family != "semi_dynamic" and s.param)
        (line,) = ax.plot(xs, ys, marker=marker, label=label)
        bars = [(x, y, ci) for x, y, _, ci in pts if ci is not None]
        if bars:  # the 95% interval: points closer than this are not told apart by the data
            ax.errorbar([b[0] for b in bars], [b[1] for b in bars], fmt="none", ecolor=line.get_color(),
                        alpha=0.45, capsize=2, yerr=[[y - ci[0] for _, y, ci in bars], [ci[1] - y for _, y, ci in bars]])
        for x, y, hollow, _ in pts:
            if hollow:
                hollow_any = True
                ax.plot([x], [y], marker=marker, markerfacecolor="white", color=line.get_color())
    styles = {"uncompressed": ("uncompressed text", "--", "black"), "no_context": ("no context", ":", "grey")}
    for family, (label, style, color) in styles.items():
        for s in summaries:
            if s.family == family:
                ax.axhline(s.accuracy, linestyle=style, color=color, label=f"{label} ({s.accuracy:.3f})")
                if s.accuracy_ci95 is not None:
                    ax.axhspan(*s.accuracy_ci95, color=color, alpha=0.08, linewidth=0)
    top = max((s.accuracy_ci95[1] if s.accuracy_ci95 else s.accuracy for s in summaries), default=0.0)
    ax.set_ylim(0, min(1.0, max(0.05, top * 1.15)))
    ax.set_xscale("log", base=2)
    if ticks:  # a labelled tick at every factor compared, not only at the powers matplotlib picks
        from matplotlib.ticker import NullFormatter, NullLocator

        lo, hi = ax.get_xlim()
        shown = sorted(t for t in ticks if lo <= t <= hi) or sorted(ticks)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(shown, [f"{t:g}x" for t in shown])
    ax.set_xlabel("average compression ratio (correctly answered questions)")
    ax.set_ylabel("substring accuracy")
    if hollow_any:
        ax.text(0.01, 0.01, "hollow: no correct answer; ratio over all questions", transform=ax.transAxes,
                fontsize=7, color="grey")
    ax.set_title(title or "Accuracy vs compression")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_report(out: str | Path, summaries: Sequence[SystemSummary], meta: dict) -> dict[str, Path]:
    """Write results.json, results.md and pareto.png into ``out``; return their paths."""
    out = Path(out)
    summaries = gain_over_fixed(summaries)
    files = {"json": out / "results.json", "markdown": out / "results.md", "pareto": out / "pareto.png"}
    by_ratio = per_ratio(summaries)
    payload = {"meta": meta, "systems": [s.to_json() for s in summaries], "per_ratio": by_ratio}
    atomic_write_text(files["json"], json.dumps(payload, indent=2) + "\n")
    run = meta.get("run", {})
    title = f"{Path(str(run.get('dataset', ''))).name} ({run.get('setting', '')}, {meta.get('n_questions', '?')} q)"
    notes = ["", f"{meta.get('n_questions', '?')} questions, setting {run.get('setting')}; "
             "ratio (mean) and ratio (sums) are source tokens per decoder position over correctly "
             "answered questions only, ratio (all q) over every question with context; "
             "latencies are means in seconds per question.", ""]
    notes.append("compress ms/q is the query-time compression cost per question as this run paid it; for "
                 "latent systems, cached = with the features in a latent store (a read), encoder = without "
                 "(an encoder pass), both plus selection, pooling and projection.")
    for fam, why in meta.get("skipped_systems", {}).items():
        notes.append(f"- {fam} not run: {why}")
    ov = meta.get("overflow")
    if ov and ov.get("contexts_over_limit"):
        what = {"skip": f"{ov['questions_skipped']} question(s) reading them were skipped by every system",
                "truncate": "they were truncated to the limit for every system"}.get(ov["mode"], ov["mode"])
        notes.append(f"- {ov['contexts_over_limit']} context(s) over the encoder limit of {ov['limit']} tokens: {what}.")
    atomic_write_text(files["markdown"], f"# {title}\n\n" + markdown_table(summaries) + "\n".join(notes) + "\n\n"
                      + per_ratio_markdown(by_ratio))
    with atomic_path(files["pareto"]) as tmp:
        plot_pareto(summaries, tmp, title)
    return files
