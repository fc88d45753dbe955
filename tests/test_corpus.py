"""Corpus: document loading and skips, chunking, dedup, FAISS indexes, the corpus directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from semidyn_rag.corpus import (
    Chunker,
    CorpusDirectory,
    CorpusError,
    Document,
    Embedder,
    IndexParams,
    LoadReport,
    build_index,
    decode_text,
    load_documents,
    load_index,
    precompress,
    save_index,
    split_sentences,
    tokenizer_counter,
)
from semidyn_rag.corpus.build import collect_chunks
from semidyn_rag.store import chunk_key
from semidyn_rag.testing import build_tokenizer


@pytest.fixture(scope="module")
def count():
    return tokenizer_counter(build_tokenizer())


# -- documents ------------------------------------------------------------------------------------

def _messy_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("The Eiffel Tower is in Paris. It was built in 1889.")
    (root / "sub" / "b.md").write_text("# Title\n\nMount Everest is high.")
    (root / "bom.txt").write_bytes("\ufeffWith a byte order mark.".encode("utf-8"))
    (root / "empty.txt").write_text("")
    (root / "blank.md").write_text(" \n\t\n")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "control.txt").write_bytes(bytes(range(1, 9)) * 20)
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (root / "paper.pdf").write_bytes(b"%PDF-1.4 ...")
    (root / ".hidden.txt").write_text("not corpus content")
    rows = [{"id": "j1", "text": "Photosynthesis makes sugar.", "lang": "en", "tags": ["bio"]},
            {"text": "   "}, {"title": "no text"}, [1, 2]]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n")
    return root


def test_load_documents_skips_unusable_inputs_with_reasons(tmp_path):
    report = LoadReport()
    docs = {d.doc_id: d for d in load_documents(_messy_folder(tmp_path), report)}
    assert set(docs) == {"a.txt", "sub/b.md", "bom.txt", "j1"}
    assert docs["bom.txt"].text == "With a byte order mark."
    assert docs["j1"].metadata == {"id": "j1", "lang": "en", "tags": ["bio"], "source": "docs.jsonl"}
    assert report.documents == 4
    assert report.by_reason == {"bad-record": 3, "binary": 2, "empty": 3, "not-utf8": 1, "unsupported": 1}
    msgs = {s.source: s.message() for s in report.skipped}
    assert msgs["latin1.txt"] == "skipped latin1.txt: not valid UTF-8 (byte 0xe9 at offset 3)"
    assert msgs["image.txt"] == "skipped image.txt: binary content (NUL bytes)"
    assert "control characters" in msgs["control.txt"]
    assert msgs["empty.txt"].endswith("empty or whitespace only") and "docs.jsonl:2" in msgs
    assert "unsupported file type '.pdf'" in msgs["paper.pdf"]
    assert "invalid JSON" in msgs["docs.jsonl:5"] and "no string 'text' field" in msgs["docs.jsonl:3"]


def test_decode_text():
    assert decode_text(b"plain")[0] == "plain"
    assert decode_text(b"\xff\xfe")[1] == "not-utf8"
    assert decode_text(b"a\x00b")[1] == "binary"
    assert decode_text(b"\n\n")[1] == "empty"


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"body": ["First doc.", "", "Third doc."], "year": [2001, 2002, 2003]})
    pq.write_table(table, tmp_path / "t.parquet")
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "u.parquet")
    report = LoadReport()
    docs = list(load_documents(tmp_path, report, text_field="body"))
    assert [(d.doc_id, d.text, d.metadata["year"]) for d in docs] == [("t.parquet:1", "First doc.", 2001),
                                                                       ("t.parquet:3", "Third doc.", 2003)]
    assert report.by_reason == {"bad-record": 1, "empty": 1}
    assert "no 'body' column" in report.skipped[-1].detail or "no 'body' column" in report.skipped[0].detail
    with pytest.raises(FileNotFoundError):
        list(load_documents(tmp_path / "absent"))


# -- chunking -------------------------------------------------------------------------------------

TEXT = ("The Eiffel Tower is in Paris.  It was built in 1889 for the World's Fair! Was it popular? "
        "At first many artists disliked it.\n\nMount Everest is the highest mountain. It lies in the Himalayas.\n"
        "- a list item here\n- another item. Photosynthesis converts light energy into chemical energy.")


def test_split_sentences():
    assert split_sentences(TEXT)[:4] == ["The Eiffel Tower is in Paris.", "It was built in 1889 for the World's Fair!",
                                         "Was it popular?", "At first many artists disliked it."]
    assert "- a list item here" in split_sentences(TEXT)


@pytest.mark.parametrize("budget", [12, 30, 80])
def test_chunks_respect_the_budget_and_keep_sentences(count, budget):
    chunks = Chunker(count, chunk_tokens=budget).split(TEXT)
    sents = split_sentences(TEXT)
    assert all(n == count([t])[0] and n <= budget for t, n in chunks)
    assert " ".join(t for t, _ in chunks) == " ".join(sents)  # nothing lost, order kept
    if budget >= max(count(sents)):  # no sentence needed cutting: chunks end at sentence ends
        ends = {s for s in sents}
        assert all(any(t.endswith(s) for s in ends) for t, _ in chunks)
    if budget == 80:
        assert len(chunks) < len(sents)  # sentences were packed together


def test_overlap_repeats_trailing_sentences(count):
    sents = split_sentences(TEXT)
    assert max(count(sents)) <= 40  # no sentence is cut: chunks are whole sentences
    plain = Chunker(count, chunk_tokens=40).split(TEXT)
    over = Chunker(count, chunk_tokens=40, overlap=15).split(TEXT)
    assert len(over) >= len(plain) and over != plain
    shared = 0
    for (a, _), (b, _) in zip(over, over[1:]):
        a_s = [s for s in sents if s in a]
        b_s = [s for s in sents if s in b]
        common = [s for s in b_s if s in a_s]
        assert sum(count(common)) <= 15 if common else True
        assert any(s not in a_s for s in b_s)  # every chunk adds new text
        shared += bool(common)
    assert shared > 0
    assert all(n <= 40 for _, n in over)
    assert over[-1][0].endswith(sents[-1])


def test_long_sentences_and_words_are_cut(count):
    long = " ".join(["word"] * 80) + "."
    chunks = Chunker(count, chunk_tokens=10).split(long)
    assert len(chunks) > 1 and all(n <= 10 for _, n in chunks)
    assert " ".join(t for t, _ in chunks) == long
    word = "x" * 300
    pieces = Chunker(count, chunk_tokens=8).split(word)
    assert "".join(t for t, _ in pieces) == word and all(n <= 8 for _, n in pieces)


class _Tally:
    """A token counter that adds up the characters it tokenizes (with or without offsets)."""

    def __init__(self, inner, offsets: bool):
        self.inner, self.chars = inner, 0
        if offsets:
            self.offsets = self._offsets

    def __call__(self, texts):
        self.chars += sum(map(len, texts))
        return self.inner(texts)

    def _offsets(self, text):
        self.chars += len(text)
        return self.inner.offsets(text)


@pytest.mark.parametrize("offsets", [True, False])
def test_cutting_a_long_word_tokenizes_it_about_once(count, offsets):
    """Issue 17.8: the cut re-tokenized the rest of the word at every probe (quadratic: a 1 MB
    line never finished). With offsets it reads the word a bounded number of times; without
    them (a plain counter) each probe is about one piece long. Timings: benchmarks/chunking.py."""
    import random
    import string

    rng = random.Random(0)
    word = "".join(rng.choice(string.ascii_letters + string.digits + "éü漢") for _ in range(20_000))
    tally = _Tally(count, offsets)
    pieces = Chunker(tally, chunk_tokens=64).split(word)
    assert "".join(t for t, _ in pieces) == word
    assert all(0 < n <= 64 for _, n in pieces) and [n for _, n in pieces] == count([t for t, _ in pieces])
    assert tally.chars <= (6 if offsets else 40) * len(word), tally.chars / len(word)


def test_cut_at_offsets_never_splits_a_character():
    from semidyn_rag.corpus.chunking import cut_at_offsets

    # a byte-level tokenizer gives the two tokens of one 2-byte character the same span
    spans = [(0, 1), (1, 2), (2, 3), (2, 3), (3, 4), (4, 5)]
    assert cut_at_offsets("abcde", spans, 3) == ["ab", "cd", "e"]  # backs off from inside "c"
    assert cut_at_offsets("abcde", spans, 10) == ["abcde"]


def test_chunking_benchmark_runs(tmp_path):
    from benchmarks import chunking

    rec = chunking.main(["--sizes", "2000,4000", "--reps", "1", "--threads", "1", "--legacy-max", "2000",
                         "--chunk-tokens", "64", "--out", str(tmp_path), "--no-plot"])
    assert [r["chars"] for r in rec["rows"]] == [2000, 4000]
    assert "legacy_seconds" in rec["rows"][0] and "legacy_seconds" not in rec["rows"][1]
    assert (tmp_path / "chunking.json").is_file()


def test_chunker_rejects_bad_settings(count):
    with pytest.raises(ValueError, match="chunk_tokens"):
        Chunker(count, chunk_tokens=0)
    with pytest.raises(ValueError, match="overlap"):
        Chunker(count, chunk_tokens=10, overlap=10)


def test_identical_chunks_are_stored_once(tmp_path, count):
    (tmp_path / "a.txt").write_text("Same text here. And more of it.")
    (tmp_path / "b.txt").write_text("Same   text here.\nAnd more of it.")  # differs only in layout
    (tmp_path / "c.txt").write_text("Different text.")
    chunks, copies, meta = collect_chunks(tmp_path, Chunker(count, 64), LoadReport())
    assert [c.doc_id for c in chunks] == ["a.txt", "c.txt"]
    assert copies[chunk_key("Same text here. And more of it.")] == 2
    assert set(meta) == {"a.txt", "b.txt", "c.txt"}


# -- FAISS ----------------------------------------------------------------------------------------

def _unit(n, d=32, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_indexes_find_each_vector_and_round_trip(tmp_path, kind):
    vecs = _unit(400)
    params = IndexParams(kind=kind, nprobe=4)
    index = build_index(vecs, params)
    save_index(index, tmp_path / "i.faiss")
    loaded = load_index(tmp_path / "i.faiss", params)
    assert loaded.ntotal == 400 and not list(tmp_path.glob(".*tmp"))
    scores, ids = loaded.search(vecs[:50], 3)
    recall = float(np.mean(ids[:, 0] == np.arange(50)))
    assert recall == 1.0 if kind == "flat" else recall >= 0.9
    np.testing.assert_allclose(scores[:, 0][ids[:, 0] == np.arange(50)], 1.0, atol=1e-5)
    exact = vecs @ vecs[:5].T
    assert ids[0, 1] == np.argsort(-exact[:, 0])[1] or kind != "flat"


def test_ivf_needs_enough_vectors():
    with pytest.raises(ValueError, match="at least"):
        build_index(_unit(3), IndexParams(kind="ivf", nlist=8))


# -- the corpus directory -------------------------------------------------------------------------

DOCS = {
    "eiffel.txt": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. "
                  "It is named after Gustave Eiffel.",
    "everest.txt": "Mount Everest is Earth's highest mountain above sea level. It is in the Himalayas.",
    "photo.txt": "Photosynthesis is the process plants use to convert light energy into chemical energy.",
    "fox.md": "The quick brown fox jumps over the lazy dog. The dog sleeps all day long in the sun.",
}


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_config, embedder):
    from semidyn_rag import SemiDynamicCompressor

    root = tmp_path_factory.mktemp("corpus")
    src = root / "docs"
    src.mkdir()
    for name, text in DOCS.items():
        (src / name).write_text(text)
    comp = SemiDynamicCompressor(tiny_config)
    stats = precompress(src, root / "out", comp, chunk_tokens=24, batch_size=4, embedder=embedder, progress=False)
    return root / "out", comp, stats


def test_search_finds_the_relevant_chunk(built, embedder):
    out, comp, stats = built
    with CorpusDirectory(out, embedder=embedder) as corpus:
        hits = corpus.search("Where is the Eiffel Tower?", k=3)
        assert hits[0].chunk.doc_id == "eiffel.txt" and [h.rank for h in hits] == [0, 1, 2]
        assert hits[0].score >= hits[1].score >= hits[2].score
        assert corpus.search("highest mountain on Earth", k=1)[0].chunk.doc_id == "everest.txt"
        assert len(corpus.search("anything", k=100)) == len(corpus) == stats.chunks
        with pytest.raises(ValueError):
            corpus.search("x", k=0)
        with pytest.raises(IndexError):
            corpus.chunks([len(corpus)])


def test_contexts_at_any_scale_come_from_the_store_without_encoding(built, embedder, monkeypatch):
    out, comp, _ = built
    calls = []
    real = comp.encode

    def counting(texts, batch_size=16):
        calls.append(len(texts))
        return real(texts, batch_size)

    monkeypatch.setattr(comp, "encode", counting)
    with CorpusDirectory(out, embedder=embedder) as corpus:
        hits = corpus.search("Where is the Eiffel Tower?", k=3)
        texts = [h.chunk.text for h in hits]
        for scale in (-1.0, 0.0, 2.0):
            ctxs, fetched = corpus.contexts(hits, comp, scale=scale)
            assert (fetched.hits, fetched.encoded) == (3, 0)
            assert calls == []  # no encoder run for any scale
            fresh = comp.compress_features(real(texts), scale=scale)
            for a, b in zip(ctxs, fresh):
                assert a.factor == b.factor
                torch.testing.assert_close(a.latents, b.latents, rtol=3e-2, atol=3e-2)
        ctxs, _ = corpus.contexts(hits, comp, factor=4)
        assert {c.factor for c in ctxs} == {4}


def test_misses_are_encoded_and_written_back(built, embedder):
    out, comp, _ = built
    with CorpusDirectory(out, embedder=embedder) as corpus:
        hit = corpus.search("quick brown fox", k=1)
        fp = comp.feature_fingerprint
        assert corpus.store.delete([hit[0].chunk.key], fp) == 1
        _, fetched = corpus.contexts(hit, comp)
        assert (fetched.hits, fetched.encoded) == (0, 1)
        assert corpus.store.contains(hit[0].chunk.key, fp)
        assert corpus.contexts(hit, comp)[1].hits == 1


def test_inconsistent_or_missing_directory_is_refused(built, tmp_path):
    out, _, _ = built
    with pytest.raises(CorpusError, match="not a corpus directory"):
        CorpusDirectory(tmp_path)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "corpus.json").read_text())
    manifest["chunks_digest"] = "0" * 64
    (copy / "corpus.json").write_text(json.dumps(manifest))
    with CorpusDirectory(copy) as corpus, pytest.raises(CorpusError, match="does not match"):
        corpus.chunks([0])
    (copy / "index.faiss").unlink()
    with pytest.raises(CorpusError, match="lacks index.faiss"):
        CorpusDirectory(copy)


def test_document_dataclass_defaults():
    assert Document("d", "t").metadata == {}
