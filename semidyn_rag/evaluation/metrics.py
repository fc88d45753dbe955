"""Answer scores and compression statistics, exactly as the comparison needs them.

Substring accuracy follows the authors' evaluation: output and reference are lower-cased and
stripped of every non-word character (spaces included), and the answer counts as correct when
some reference is a substring of the output. Because a long output that lists many candidates
can game it, SQuAD-style exact match and token F1 are reported next to it. The average
compression ratio is taken over correctly answered questions only (the paper's validity
filter), both as a mean of per-question ratios and as a ratio of sums. Accuracy comes with a
95% Wilson interval: on 500 questions it is about +-3 points, which decides whether two
systems differ at all.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

from .records import SampleResult, SystemSummary

_NON_WORD = re.compile(r"\W+", re.UNICODE)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_substring(text: str) -> str:
    """The authors' normalisation: lower-case, then drop every non-word character (spaces too)."""
    return _NON_WORD.sub("", text.lower())


def substring_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """True when some normalised reference is a substring of the normalised prediction.

    References that normalise to nothing (pure punctuation) are skipped: the empty string is a
    substring of everything and would count any output as correct.
    """
    pred = normalize_substring(prediction)
    refs = [normalize_substring(a) for a in _as_list(answers)]
    return any(r and r in pred for r in refs)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the SQuAD-normalised prediction equals some normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _as_list(answers)))


def f1_score(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD token F1 against the best-matching reference (1.0 when both are empty)."""
    return max(_token_f1(prediction, a) for a in _as_list(answers))


def _token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _as_list(answers: str | Sequence[str]) -> list[str]:
    out = [answers] if isinstance(answers, str) else list(answers)
    if not out:
        raise ValueError("no reference answers to score against")
    return out


def correct_only_ratios(results: Iterable[SampleResult]) -> tuple[float | None, float | None]:
    """(mean of per-question ratios, sum of source tokens / sum of positions), correct ones only.

    Questions answered without any context have no ratio and are left out; None when no
    correctly answered question had context.
    """
    kept = [r for r in results if r.correct and r.context_positions]
    if not kept:
        return None, None
    mean = sum(r.source_tokens / r.context_positions for r in kept) / len(kept)
    return mean, sum(r.source_tokens for r in kept) / sum(r.context_positions for r in kept)


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of ``correct / n``; sound near 0 and 1, unlike p +- z*se."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got {correct} of {n}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's, for two systems on the same questions): the
    questions only one of them gets right, taken as a fair coin's tosses. Ties carry no signal."""
    n = wins + losses
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n)


def log2_factor_variance(factors: Iterable[int | None]) -> float | None:
    """Population variance of log2 of the chosen factors (None entries skipped; None if none)."""
    logs = [math.log2(f) for f in factors if f is not None]
    if not logs:
        return None
    mean = sum(logs) / len(logs)
    return sum((x - mean) ** 2 for x in logs) / len(logs)


def factor_histogram(factors: Iterable[int | None]) -> dict[str, int]:
    """How many chunks got each factor, keys in ascending factor order."""
    counts = Counter(f for f in factors if f is not None)
    return {str(f): counts[f] for f in sorted(counts)}


def summarize(results: Sequence[SampleResult], family: str, param: float | None) -> SystemSummary:
    """Aggregate one system's results. Raises ValueError for an empty list or mixed systems."""
    if not results:
        raise ValueError("no results to summarise")
    names = {r.system for r in results}
    if len(names) != 1:
        raise ValueError(f"results of several systems mixed: {sorted(names)}")
    n = len(results)
    n_correct = sum(r.correct for r in results)
    mean_ratio, ratio_of_sums = correct_only_ratios(results)
    factors = [f for r in results for f in r.factors]
    positions = [p for r in results for p in r.chunk_positions]
    with_ctx = [r for r in results if r.context_positions]
    recall = [r.gold_retrieved for r in results if r.gold_retrieved is not None]

    def avg(attr: str) -> float:
        return sum(getattr(r, attr) for r in results) / n

    def avg_known(attr: str) -> float | None:
        known = [v for r in results if (v := getattr(r, attr)) is not None]
        return sum(known) / len(known) if known else None

    return SystemSummary(
        system=results[0].system, family=family, param=param, n=n,
        n_correct=n_correct, accuracy=n_correct / n, accuracy_ci95=wilson_interval(n_correct, n),
        exact_match=avg("exact_match"), f1=avg("f1"),
        mean_ratio=mean_ratio, ratio_of_sums=ratio_of_sums,
        ratio_all=(sum(r.source_tokens for r in with_ctx) / sum(r.context_positions for r in with_ctx)
                   if with_ctx else None),
        positions_per_chunk=sum(positions) / len(positions) if positions else None,
        log2_factor_var=log2_factor_variance(factors),
        factor_histogram=factor_histogram(factors),
        prefill_tokens=avg("prefill_tokens"), new_tokens=avg("new_tokens"),
        retrieve_s=avg("retrieve_s"), compress_s=avg("compress_s"), prefill_s=avg("prefill_s"),
        decode_s=avg("decode_s"), ttft_s=avg("ttft_s"),
        total_s=sum(r.ttft_s + r.decode_s for r in results) / n,
        gold_recall=sum(recall) / len(recall) if recall else None,
        compress_cached_s=avg_known("compress_cached_s"), compress_uncached_s=avg_known("compress_uncached_s"),
    )
