"""Data synthesis against a local OpenAI-compatible HTTP teacher; the offline density proxy."""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from semidyn_rag.training import load_records, write_records
from semidyn_rag.training.prompts import Limits, check_qa, check_summary, normalize, parse_phase1
from semidyn_rag.training.proxy import SurprisalProxy, annotate_with_proxy, densities_to_labels, zlib_bits_per_char
from semidyn_rag.training.records import TrainingRecord
from semidyn_rag.training.synth import chunk_text, load_seeds, summarize_records, synthesize
from semidyn_rag.training.teachers import OpenAITeacher, TeacherError, TransformersTeacher

TOPICS = ["volcano", "glacier", "desert", "forest", "river", "island"]


def seed_text(i: int) -> str:
    t = TOPICS[i]
    return (f"The {t} near town {i} is famous. Visitors to the {t} arrive every spring to watch the "
            f"light change. Local guides number {10 + i} and they lead walks that last {i + 2} hours.")


class FakeTeacher(BaseHTTPRequestHandler):
    """Answers like a well-behaved teacher, plus one ungrounded answer and one duplicate question."""

    def do_POST(self):  # noqa: N802
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.calls += 1
            fail = srv.fail_next > 0
            srv.fail_next -= fail
            srv.auth.append(self.headers.get("Authorization"))
        if fail:
            self.send_response(503)
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        text = prompt.split("Text:\n", 1)[1]
        words = text.split()
        if "question-answer pairs" in prompt:
            srv.phase1.append(text)
            if "BROKEN" in text:
                reply = "I cannot help with that."
            else:
                qa = [{"question": f"How many guides are there near {words[1]}?", "answer": words[-9]},
                      {"question": "Who arrives every spring?", "answer": "Visitors"},
                      {"question": "Who arrives every spring?", "answer": "Visitors"},  # duplicate
                      {"question": "What is the capital?", "answer": "Zanzibar"}]  # not in the text
                reply = "Here you go:\n```json\n" + json.dumps({"qa": qa, "summary": " ".join(words[:8])}) + "\n```"
        else:
            srv.phase2.append(text)
            reply = "Summary: " + " ".join(words[1:4])
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    srv.lock, srv.calls, srv.fail_next, srv.auth, srv.phase1, srv.phase2 = threading.Lock(), 0, 0, [], [], []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _teacher(srv, **kw):
    return OpenAITeacher(f"http://127.0.0.1:{srv.server_address[1]}/v1", "fake", api_key="k", **kw)


@pytest.fixture
def seed_file(tmp_path):
    rows = [{"text": seed_text(i), "source": f"doc{i}"} for i in range(5)]
    rows.append({"text": seed_text(0).upper().replace(" ", "  "), "source": "dup"})  # same text, other case
    rows.append({"text": "BROKEN " + seed_text(5), "source": "broken"})
    p = tmp_path / "seeds.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_synth_against_http_teacher_is_valid_and_resumable(server, seed_file, tmp_path):
    seeds = load_seeds([seed_file], text_field="text", min_words=10)
    assert len(seeds) == 6  # the upper-cased duplicate is dropped
    out = tmp_path / "synth"
    server.fail_next = 1  # a transient 503 is retried
    s1 = synthesize(seeds[:3], _teacher(server), out, batch_size=2, progress=False)
    assert server.calls == 1 + 3 + 3 and server.auth[-1] == "Bearer k"
    assert s1.kept_qa == 6 and s1.rejected["duplicate question"] == 3
    assert s1.rejected["answer not found in the context"] == 3

    # simulate a crash mid-write: a cut last line makes that seed be asked again
    p1 = out / "phase1.jsonl"
    lines = p1.read_text().splitlines()
    p1.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    server.phase1.clear()
    server.phase2.clear()
    s2 = synthesize(seeds, _teacher(server), out, batch_size=2, progress=False)
    assert s2.done_before[1] == 2 and len(server.phase1) == 4  # seed 3 (cut) and seeds 4, 5, 6
    assert {normalize(t) for t in server.phase1} == {normalize(s.text) for s in seeds[2:]}
    # phase 2 is asked for the new useful seeds only (3 and 4; not the broken one)
    assert len(server.phase2) == 2 and s2.done_before[2] == 3

    records = load_records(out / "records.jsonl")
    qa = [r for r in records if r.task == "qa"]
    summaries = [r for r in records if r.task == "summary"]
    assert len(qa) == 10 and len(summaries) == 5  # 5 good seeds x 2 kept QA pairs, 1 summary each
    for r in records:
        assert "BROKEN" not in r.context
        assert r.concise_summary and len(r.concise_summary.split()) == 3
        assert not r.concise_summary.lower().startswith("summary")
    for r in qa:
        assert normalize(r.answer) in normalize(r.context)
    assert len({(r.question, r.context) for r in qa}) == len(qa)
    # nothing left to do: a third run asks nothing
    server.calls = 0
    synthesize(seeds, _teacher(server), out, progress=False)
    assert server.calls == 0
    phase1 = [json.loads(x) for x in p1.read_text().splitlines() if x.strip().startswith("{") and x.endswith("}")]
    broken = [r for r in phase1 if "BROKEN" in r["context"]]
    assert broken and broken[0]["failed"] and "unparseable reply" in broken[0]["rejected"]


def test_multi_document_records(server, seed_file, tmp_path):
    seeds = load_seeds([seed_file], text_field="text", min_words=10)[:4]
    synthesize(seeds, _teacher(server), tmp_path, multi_doc_fraction=1.0, multi_doc_contexts=3, progress=False)
    multi = [r for r in load_records(tmp_path / "records.jsonl") if r.task == "multi_doc_qa"]
    assert multi
    for r in multi:
        assert len(r.contexts) == 3 and len(set(r.contexts)) == 3
        assert any(normalize(r.answer) in normalize(c) for c in r.contexts)
        assert len(r.summaries) == 3


def test_summarize_existing_records(server, tmp_path):
    recs = [TrainingRecord(context=seed_text(i), question="q?", answer="town") for i in range(3)]
    recs.append(recs[0].model_copy(update={"question": "another?"}))  # same context: asked once
    write_records(tmp_path / "in.jsonl", recs)
    stats = summarize_records(tmp_path / "in.jsonl", _teacher(server), tmp_path / "out.jsonl", progress=False)
    assert stats.asked[2] == 3 and server.calls == 3
    out = load_records(tmp_path / "out.jsonl")
    assert [r.question for r in out] == [r.question for r in recs]
    assert all(r.concise_summary for r in out)
    summarize_records(tmp_path / "in.jsonl", _teacher(server), tmp_path / "out.jsonl", progress=False)
    assert server.calls == 3  # resumed: nothing asked again


def test_unreachable_teacher_fails_clearly(tmp_path):
    teacher = OpenAITeacher("http://127.0.0.1:9/v1", "x", retries=0, timeout=2)
    with pytest.raises(TeacherError, match="failed after 1 attempts"):
        teacher.complete(["hello"])


def test_parse_and_validate():
    qa, summary = parse_phase1('noise {"qa": [{"question": "Q1?", "answer": "A1"}], "summary": "S."} more')
    assert qa == [("Q1?", "A1")] and summary == "S."
    qa, summary = parse_phase1("Q: Who?\nA: Bob\n2. Question: Where?\nAnswer: Rome\nSummary: Bob in Rome.")
    assert qa == [("Who?", "Bob"), ("Where?", "Rome")] and summary == "Bob in Rome."
    assert parse_phase1("nothing") == ([], None)
    ctx = "Marie Curie won the Nobel Prize in 1903, with Pierre Curie."
    lim = Limits(max_answer_words=4)
    assert check_qa("When?", "1903", ctx, lim) is None
    assert check_qa("Who?", "marie  CURIE", ctx, lim) is None  # normalized substring
    assert check_qa("Who?", "Albert Einstein", ctx, lim) == "answer not found in the context"
    assert check_qa("Who?", "Marie Curie and Pierre Curie together", ctx, lim) == "answer too long"
    assert check_qa("", "x", ctx, lim) == "empty question or answer"
    over = Limits(grounding="overlap", min_overlap=0.6)
    assert check_qa("Who?", "Pierre and Marie Curie", ctx, over) is None
    assert check_summary(ctx, ctx, Limits(), concise=True) == "summary copies the context"
    assert check_summary("Curie: Nobel 1903.", ctx, Limits(), concise=True) is None
    assert "too long" in check_summary(" ".join(["w"] * 8), ctx, Limits(max_concise_ratio=0.5), concise=True)


def test_seed_loading_chunks_and_formats(tmp_path):
    para = " ".join(f"word{i}." for i in range(120))
    (tmp_path / "a.txt").write_text(para + "\n\n" + "short para here.")
    chunks = chunk_text(para, 50)
    assert all(len(c.split()) <= 50 for c in chunks) and sum(len(c.split()) for c in chunks) == 120
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"context": ["alpha beta gamma delta " * 5, "short"]}), tmp_path / "b.parquet")
    seeds = load_seeds([tmp_path], min_words=10, max_words=50)
    assert len(seeds) == 4  # three chunks of the long paragraph (short para joins the last), one parquet row
    assert {s.source.split("#")[0].rsplit("/", 1)[-1].split(":")[0] for s in seeds} == {"a.txt", "b.parquet"}
    with pytest.raises(FileNotFoundError):
        load_seeds([tmp_path / "nope"])
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1: no field"):
        load_seeds([tmp_path / "c.jsonl"])


def test_zlib_proxy_ranks_redundant_text_as_more_compressible():
    redundant = "the same words again and again " * 12
    dense = "Quartz, jade, obsidian; 1789 Paris; 1815 Waterloo; DNA helix 1953; Everest 8849 m; pH 7.4 blood."
    d = zlib_bits_per_char([redundant, dense])
    assert d[0] < d[1]
    ys = densities_to_labels(d, y_mid=3.0)
    assert ys[0] > 3.0 > ys[1]  # redundant text: a higher log2 factor
    assert densities_to_labels([2.0, 4.0], reference=4.0) == [4.0, 3.0]
    recs = [TrainingRecord(context=redundant, question="q", answer="a"),
            TrainingRecord(context=dense, question="q", answer="a", concise_summary="gems, dates")]
    out = annotate_with_proxy(recs, "zlib", progress=False)
    assert out[0].pseudo_summary_fraction == pytest.approx(2 ** -ys[0])
    assert out[1].pseudo_summary_fraction is None  # a teacher summary is kept, not overridden
    assert out[0].meta["density_proxy"]["method"] == "zlib"


def test_lm_surprisal_proxy_with_a_tiny_lm(tiny_dirs, tmp_path):
    _, dec = tiny_dirs
    proxy = SurprisalProxy(str(dec), device="cpu")
    texts = ["The Eiffel Tower is in Paris, the capital of France.", "Mount Everest is the highest mountain."]
    bits = proxy.bits_per_token(texts)
    assert all(math.isfinite(b) and b > 0 for b in bits)
    # a random 442-token LM is close to uniform: about log2(vocab) bits per token
    assert all(abs(b - math.log2(len(proxy.tokenizer))) < 1.5 for b in bits)
    # batching and order do not change the numbers
    assert proxy.bits_per_token(texts[::-1]) == pytest.approx(bits[::-1], abs=1e-5)
    recs = [TrainingRecord(context=t, question="q", answer="a") for t in texts]
    out = annotate_with_proxy(recs, "lm", proxy=proxy, progress=False)
    assert all(0 < r.pseudo_summary_fraction <= 1 for r in out)
    with pytest.raises(ValueError, match="needs a SurprisalProxy"):
        annotate_with_proxy(recs, "lm")


def test_transformers_teacher_generates_per_prompt(tiny_dirs):
    _, dec = tiny_dirs
    teacher = TransformersTeacher(str(dec), device="cpu", max_new_tokens=4, batch_size=2)
    replies = teacher.complete(["Where is the Eiffel Tower?", "Hi", "A third prompt here"])
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    # greedy, left-padded batches: a prompt's reply does not depend on its batch mates
    assert teacher.complete(["Hi"]) == [replies[1]]


def test_cli_synth_proxy(tmp_path, capsys):
    from semidyn_rag.cli import main

    write_records(tmp_path / "in.jsonl", [TrainingRecord(context=seed_text(i), question="q", answer="a")
                                          for i in range(3)])
    assert main(["synth", "proxy", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                 "--method", "zlib"]) == 0
    assert all(r.pseudo_summary_fraction for r in load_records(tmp_path / "out.jsonl"))
    assert re.search(r"3 records with proxy density labels", capsys.readouterr().out)
    assert main(["synth", "generate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "g")]) == 2


def test_cli_synth_generate_http(server, seed_file, tmp_path, capsys):
    from semidyn_rag.cli import main

    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    args = ["synth", "generate", str(seed_file), "--text-field", "text", "--min-words", "10", "--out",
            str(tmp_path / "g"), "--teacher-url", url, "--teacher-model", "fake", "--concurrency", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kept 10 new QA pairs" in out and "15 records" in out
    assert main(args) == 0
    assert "kept 0 new QA pairs" in capsys.readouterr().out
