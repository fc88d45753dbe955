"""Scores and compression statistics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from semidyn_rag.evaluation.metrics import (
    correct_only_ratios,
    exact_match,
    f1_score,
    factor_histogram,
    log2_factor_variance,
    normalize_answer,
    normalize_substring,
    substring_match,
    summarize,
    wilson_interval,
)
from semidyn_rag.evaluation.records import SampleResult


def _r(system="s", sid="0", correct=True, tokens=(), positions=(), factors=None, **kw) -> SampleResult:
    return SampleResult(system=system, sample_id=sid, prediction="p", answers=["a"], correct=correct,
                        exact_match=kw.pop("em", 0.0), f1=kw.pop("f1", 0.0), chunk_tokens=list(tokens),
                        chunk_positions=list(positions),
                        factors=list(factors) if factors is not None else [None] * len(tokens), **kw)


def test_authors_normalisation_drops_case_spaces_and_punctuation():
    assert normalize_substring("Hello, World!  It's 1,000 km.") == "helloworldits1000km"
    assert normalize_substring("Zürich — Nov. 3rd") == "zürichnov3rd"
    assert normalize_substring("snake_case") == "snake_case"  # underscore is a word character


def test_substring_match_any_reference_after_normalisation():
    assert substring_match("The answer is New York City.", "new-york")
    assert substring_match("It is in NEWYORK", ["Boston", "New York"])
    assert not substring_match("It is in Boston", ["New York", "Chicago"])
    # spaces are stripped too, so a reference can match across word boundaries
    assert substring_match("a new yorker", "ewyork")
    # a reference that normalises to nothing never counts (it would match everything)
    assert not substring_match("anything at all", ["...", "?"])
    assert substring_match("anything at all", ["...", "all"])


def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("the Paris.", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("Paris, France", ["Lyon", "paris france"]) == 1.0


def test_f1_is_token_overlap_against_best_reference():
    # pred tokens [big, red, dog] vs [red, dog]: p = 2/3, r = 1, f1 = 0.8
    assert f1_score("The big red dog", "red dog") == pytest.approx(0.8)
    assert f1_score("The big red dog", ["cat", "big red dog"]) == pytest.approx(1.0)
    assert f1_score("dog dog dog", "dog") == pytest.approx(0.5)  # p = 1/3, r = 1
    assert f1_score("nothing", "else") == 0.0
    assert f1_score("the", "a") == 1.0  # both empty after normalisation
    with pytest.raises(ValueError, match="no reference"):
        f1_score("x", [])


def test_ratios_count_correct_answers_only_both_ways():
    results = [
        _r(sid="a", correct=True, tokens=[60, 40], positions=[6, 4]),  # 100 / 10 = 10x
        _r(sid="b", correct=True, tokens=[30], positions=[15]),  # 2x
        _r(sid="c", correct=False, tokens=[1000], positions=[10]),  # 100x, wrong: must not count
        _r(sid="d", correct=True),  # answered without context: no ratio
    ]
    mean, sums = correct_only_ratios(results)
    assert mean == pytest.approx((10 + 2) / 2)
    assert sums == pytest.approx(130 / 25)
    assert correct_only_ratios([_r(correct=False, tokens=[5], positions=[1])]) == (None, None)


def test_log2_factor_variance_and_histogram():
    assert log2_factor_variance([2, 8]) == pytest.approx(1.0)  # log2: 1, 3 -> mean 2, var 1
    assert log2_factor_variance([4, 4, None]) == 0.0
    m = 8 / 3  # log2: 1, 2, 5
    assert log2_factor_variance([2, 4, 32]) == pytest.approx(((1 - m) ** 2 + (2 - m) ** 2 + (5 - m) ** 2) / 3)
    assert log2_factor_variance([None]) is None
    hist = factor_histogram([8, 2, 8, None, 16])
    assert hist == {"2": 1, "8": 2, "16": 1} and list(hist) == ["2", "8", "16"]


def test_summarize_aggregates_one_system():
    results = [
        _r(sid="a", correct=True, tokens=[40], positions=[10], factors=[4], em=1.0, f1=1.0,
           prefill_tokens=30, retrieve_s=0.1, compress_s=0.2, prefill_s=0.3, decode_s=1.0, ttft_s=0.6,
           gold_retrieved=True),
        _r(sid="b", correct=False, tokens=[80, 20], positions=[5, 10], factors=[16, 2], em=0.0, f1=0.5,
           prefill_tokens=50, retrieve_s=0.1, compress_s=0.4, prefill_s=0.5, decode_s=2.0, ttft_s=1.0,
           gold_retrieved=False),
    ]
    s = summarize(results, "semi_dynamic", 0.5)
    assert (s.system, s.family, s.param, s.n, s.n_correct) == ("s", "semi_dynamic", 0.5, 2, 1)
    assert s.accuracy == 0.5 and s.exact_match == 0.5 and s.f1 == 0.75
    assert s.mean_ratio == 4.0 and s.ratio_of_sums == 4.0  # only "a" is correct
    assert s.ratio_all == pytest.approx(140 / 25)
    assert s.positions_per_chunk == pytest.approx(25 / 3)
    assert s.log2_factor_var == pytest.approx(log2_factor_variance([4, 16, 2]))
    assert s.factor_histogram == {"2": 1, "4": 1, "16": 1}
    assert s.prefill_tokens == 40 and s.ttft_s == pytest.approx(0.8) and s.total_s == pytest.approx(2.3)
    assert s.gold_recall == 0.5
    assert s.accuracy_ci95 == wilson_interval(1, 2)
    assert math.isclose(s.compress_s, 0.3)
    with pytest.raises(ValueError, match="no results"):
        summarize([], "fixed", 2)
    with pytest.raises(ValueError, match="several systems"):
        summarize([_r(system="x"), _r(system="y")], "fixed", 2)


def test_wilson_interval_against_hand_computed_values():
    # 5 of 10: centre 0.5, half-width 1.96 * sqrt(0.025 + 0.0096) / 1.384 = 0.2634
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # never below 0, and not the degenerate [0, 0] of p +- z*se
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)  # the mirror image of 0 of 10
    assert lo == pytest.approx(1 - 0.2775, abs=1e-4) and hi == pytest.approx(1.0) and hi <= 1.0
    lo, hi = wilson_interval(95, 500)  # 19% of 500: about +-3.5 points
    assert lo == pytest.approx(0.1580, abs=1e-4) and hi == pytest.approx(0.2267, abs=1e-4)
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="correct <= n"):
            wilson_interval(*bad)
