"""Cloze questions: which spans are blanked, determinism, grounding, and the ``synth cloze`` command."""

from __future__ import annotations

import json
import re

import pytest

from semidyn_rag.training import load_records
from semidyn_rag.training.cloze import BLANK, cloze_questions, cloze_records, find_spans, split_sentences
from semidyn_rag.training.prompts import normalize

TEXT = ("The Nile is a major north-flowing river in northeast Africa. At 7,088 kilometers long, it was "
        "long considered the longest river in the world. Its source was found by John Hanning Speke on "
        "3 August 1858 near Lake Victoria. The Aswan High Dam was completed in 1970 and holds about "
        "45% of the yearly flow. Dr. Smith measured it again in the 1990s.")


def spans_of(sentence: str) -> list[tuple[str, str]]:
    return [(sentence[s.start : s.end], s.kind) for s in find_spans(sentence)]


def test_spans_are_names_dates_years_and_numbers():
    assert spans_of("Its source was found by John Hanning Speke on 3 August 1858 near Lake Victoria.") == [
        ("John Hanning Speke", "name"), ("3 August 1858", "date"), ("Lake Victoria", "name")]
    assert spans_of("At 7,088 kilometers long, 45% of 2.5 million people agree.") == [
        ("7,088", "number"), ("45%", "number"), ("2.5", "number")]
    assert spans_of("The Aswan High Dam was completed in 1970, not in the 1990s.") == [
        ("Aswan High Dam", "name"), ("1970", "year")]
    # a leading article is not part of a name; a possessive is cut; a lone sentence-initial word is no name
    assert spans_of("The Pacific Ocean borders Albert Einstein's home.") == [
        ("Pacific Ocean", "name"), ("Albert Einstein", "name")]
    assert spans_of("However, rivers flow north.") == []
    assert spans_of("Paris is big.") == []


def test_sentences_keep_initials_and_abbreviations_inside():
    assert split_sentences("Dr. Smith met J. R. Tolkien. Then they left. It rained") == [
        "Dr. Smith met J. R. Tolkien.", "Then they left.", "It rained"]


def test_questions_are_deterministic_grounded_and_not_given_away():
    qs = cloze_questions(TEXT, n=3, seed=0)
    assert len(qs) == 3
    assert cloze_questions(TEXT, n=3, seed=0) == qs  # same text, same seed: same questions
    assert [cloze_questions(TEXT, n=1, seed=s) for s in range(8)] != [qs[:1]] * 8  # the seed matters
    sentences = split_sentences(TEXT)
    used = set()
    for question, answer, kind in qs:
        assert kind in ("name", "date", "year", "number")
        blanked = re.search(r'"(.*)"$', question).group(1)
        assert blanked.count(BLANK) == 1
        assert normalize(answer) in normalize(TEXT)  # the answer is in the chunk
        assert normalize(answer) not in normalize(blanked)  # and not in the question
        filled = blanked.replace(BLANK, answer)
        assert filled in sentences  # the blank was cut from one real sentence
        used.add(filled)
    assert len(used) == 3  # distinct sentences


def test_answers_repeated_in_their_own_sentence_are_not_asked():
    text = "Speke met Burton and later Burton wrote about Speke at length in a book."
    assert cloze_questions(text, n=5) == []


def test_more_questions_than_sentences_gives_what_there_is_and_bad_n_fails():
    assert len(cloze_questions(TEXT, n=50)) == len([s for s in split_sentences(TEXT) if find_spans(s)])
    with pytest.raises(ValueError, match="at least 1"):
        cloze_questions(TEXT, n=0)


def test_records_are_training_records_independent_of_order():
    other = "Mount Everest is the highest mountain on Earth. It was first climbed on 29 May 1953 by Edmund Hillary."
    recs, empty = cloze_records([("nile", TEXT), ("everest", other), ("none", "no blanks here at all, sorry.")])
    assert empty == 1 and len(recs) == 2
    assert recs[0].task == "qa" and recs[0].context == TEXT and recs[0].source == "cloze:nile"
    assert recs[0].meta["cloze"]["kind"] in ("name", "date", "year", "number")
    swapped, _ = cloze_records([("everest", other), ("nile", TEXT)])
    assert [r.question for r in swapped] == [recs[1].question, recs[0].question]


def test_cli_synth_cloze(tmp_path, capsys):
    from semidyn_rag.cli import main

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"text": t, "source": s}) for s, t in
                               [("nile", TEXT), ("short", "Too short."), ("dup", TEXT)]))
    out = tmp_path / "cloze.jsonl"
    args = ["synth", "cloze", str(seeds), "--text-field", "text", "--out", str(out), "--per-chunk", "2"]
    assert main(args) == 0
    assert "2 cloze records from 1 chunks" in capsys.readouterr().out  # short dropped, duplicate merged
    recs = load_records(out)
    assert [r.source for r in recs] == ["cloze:nile"] * 2
    first = out.read_text()
    assert main(args) == 0 and out.read_text() == first  # deterministic file
    assert main(["synth", "cloze", str(seeds), "--out", str(out), "--per-chunk", "0"]) == 2
    assert main(["synth", "cloze", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
