"""Per target ratio: which system is most accurate and which is cheapest at query time.

A user choosing a compressor asks "at 4x, what should I use?". The table answers it from the
run's own summaries: every system run at that factor (and a semi-dynamic point whose achieved
ratio lies within the tolerance of it) competes, but only if it actually reached the ratio; a
peer that cannot cut that far (a sentence filter stops at whole sentences) is listed as short
of it instead of winning with less compression. Systems whose 95% interval overlaps the best
one's are named beside it (``not_told_apart``): the run's questions do not clearly separate them.
"""

from __future__ import annotations

from collections.abc import Sequence

from .records import SystemSummary

# families run at a target factor (``param``); semi-dynamic runs at a scale and joins by its ratio
TARGETED = ("fixed", "truncate", "sentence_optimizer", "longllmlingua", "llmlingua2")
TOLERANCE = 0.2  # a system "reaches" F when its achieved ratio is at least (1 - TOLERANCE) * F


def achieved(s: SystemSummary) -> float | None:
    """The ratio a system reached: source tokens per decoder position over every question with context."""
    return s.ratio_all if s.ratio_all is not None else s.ratio_of_sums


def query_cost(s: SystemSummary) -> float:
    """Seconds per question spent compressing at query time; features cached when that was measured."""
    return s.compress_cached_s if s.compress_cached_s is not None else s.compress_s


def _overlaps(a: SystemSummary, b: SystemSummary) -> bool:
    if a.accuracy_ci95 is None or b.accuracy_ci95 is None:
        return a.accuracy == b.accuracy
    return a.accuracy_ci95[0] <= b.accuracy_ci95[1] and b.accuracy_ci95[0] <= a.accuracy_ci95[1]


def per_ratio(summaries: Sequence[SystemSummary], tolerance: float = TOLERANCE) -> list[dict]:
    """One entry per target factor of the run, as plain data (``results.json``'s ``per_ratio``)."""
    factors = sorted({s.param for s in summaries if s.family in TARGETED and s.param})
    rows = []
    for f in factors:
        near = [s for s in summaries
                if (s.family in TARGETED and s.param == f)
                or (s.family == "semi_dynamic" and (r := achieved(s)) and abs(r - f) <= tolerance * f)]
        reached = [s for s in near if (achieved(s) or 0) >= (1 - tolerance) * f]
        short = [{"system": s.system, "ratio": achieved(s)} for s in near if s not in reached]
        row = {"factor": f, "systems": [s.system for s in reached], "short_of_ratio": short,
               "most_accurate": None, "accuracy": None, "accuracy_ci95": None, "not_told_apart": [],
               "cheapest": None, "cheapest_ms": None}
        if reached:
            best = max(reached, key=lambda s: (s.accuracy, -query_cost(s)))
            cheap = min(reached, key=query_cost)
            row.update(most_accurate=best.system, accuracy=best.accuracy,
                       accuracy_ci95=list(best.accuracy_ci95) if best.accuracy_ci95 else None,
                       not_told_apart=[s.system for s in reached if s is not best and _overlaps(s, best)],
                       cheapest=cheap.system, cheapest_ms=1000 * query_cost(cheap))
        rows.append(row)
    return rows


def per_ratio_markdown(rows: Sequence[dict]) -> str:
    """The per-ratio answer as a Markdown section (empty when the run compared no target factors)."""
    if not rows:
        return ""
    lines = ["## Per target ratio", "",
             "| target | most accurate (acc, 95% CI) | 95% interval overlaps its | cheapest at query time | "
             "short of the ratio |", "|---|---|---|---|---|"]
    for r in rows:
        if r["most_accurate"] is None:
            best = cheap = "-"
        else:
            ci = r["accuracy_ci95"]
            best = f"{r['most_accurate']} {100 * r['accuracy']:.1f}%" + (
                f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")
            cheap = f"{r['cheapest']} ({r['cheapest_ms']:.1f} ms/q)"
        short = ", ".join(f"{x['system']} (reaches {x['ratio']:.1f}x)" if x["ratio"] else x["system"]
                          for x in r["short_of_ratio"]) or "-"
        lines.append(f"| {r['factor']:g}x | {best} | {', '.join(r['not_told_apart']) or '-'} | {cheap} | {short} |")
    lines += ["", f"A system competes at a target when its achieved ratio (all questions) is at least "
              f"{100 * (1 - TOLERANCE):.0f}% of it; semi-dynamic points join the target their ratio is within "
              f"{100 * TOLERANCE:.0f}% of. Query-time cost: with features cached for latent systems.", ""]
    return "\n".join(lines)
