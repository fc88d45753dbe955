"""Training records: the schema, and bad lines rejected with their line number."""

from __future__ import annotations

import json

import pytest

from semidyn_rag.training import RecordError, TrainingRecord, load_records, write_records
from semidyn_rag.training.records import DEFAULT_SUMMARY_INSTRUCTION


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


GOOD = {"context": "The Eiffel Tower is in Paris.", "question": "Where is it?", "answer": "Paris"}


def test_round_trip(tmp_path):
    recs = [TrainingRecord(**GOOD, concise_summary="Eiffel Tower: Paris.", source="wiki"),
            TrainingRecord(context=["a b c", "d e f"], task="multi_doc_qa", question="q?", answer="a",
                           concise_summary=["a b", None]),
            TrainingRecord(context="Some text here.", task="summary", answer="Text.")]
    assert write_records(tmp_path / "r.jsonl", recs) == 3
    back = load_records(tmp_path / "r.jsonl")
    assert back == recs
    assert back[1].contexts == ["a b c", "d e f"] and back[1].summaries == ["a b", None]
    assert back[0].summary_fractions == [None]
    assert back[2].prompt == DEFAULT_SUMMARY_INSTRUCTION and back[0].prompt == "Where is it?"


@pytest.mark.parametrize("bad, message", [
    ({"question": "q", "answer": "a"}, "context: Field required"),
    ({**GOOD, "context": "   "}, "context: context is empty"),
    ({**GOOD, "context": ["ok", ""]}, "context 1 is empty"),
    ({**GOOD, "answer": ""}, "answer: answer is empty"),
    ({"context": "c", "answer": "a"}, "task 'qa' needs a question"),
    ({**GOOD, "task": "multi_doc_qa"}, "needs a list of contexts"),
    ({**GOOD, "concise_summary": ["x", "y"]}, "concise_summary has 2 entries but the record has 1"),
    ({**GOOD, "pseudo_summary_fraction": 1.5}, "must be in (0, 1]"),
    ({**GOOD, "anwser": "typo"}, "anwser: Extra inputs are not permitted"),
    ({**GOOD, "task": "chat"}, "task: Input should be"),
])
def test_bad_record_names_its_line(tmp_path, bad, message):
    path = _write(tmp_path / "d.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert "d.jsonl:4: " in str(e.value)  # line 2 is blank and skipped, but still counted
    assert message in str(e.value)


def test_invalid_json_and_non_object(tmp_path):
    with pytest.raises(RecordError, match=r"d.jsonl:2: invalid JSON"):
        load_records(_write(tmp_path / "d.jsonl", [GOOD, "{not json"]))
    with pytest.raises(RecordError, match=r"d.jsonl:1: expected a JSON object, got list"):
        load_records(_write(tmp_path / "d.jsonl", ["[1, 2]"]))
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")
