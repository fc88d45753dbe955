"""The evaluation harness end to end on tiny models: datasets, systems, runner, report, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.cli import main
from semidyn_rag.cli.evaluate import parse_scales
from semidyn_rag.evaluation import DatasetError, EvalConfig, load_qa_dataset, run_evaluation, substring_match
from semidyn_rag.evaluation.datasets import HF_DATASETS, parse_row
from semidyn_rag.evaluation.errors import EvalError
from semidyn_rag.evaluation.metrics import summarize
from semidyn_rag.evaluation.records import SampleResult
from semidyn_rag.evaluation.report import gain_over_fixed, markdown_table
from semidyn_rag.evaluation.systems import text_prompt
from tests.conftest import TEXTS

ROWS = [
    {"id": "q0", "context": TEXTS[0], "question": "Where is the Eiffel Tower?", "answer": "Paris"},
    {"id": "q1", "context": TEXTS[0], "question": "What is the capital of France?", "answers": ["Paris"]},
    {"id": "q2", "context": TEXTS[1], "question": "Which is the highest mountain?",
     "answers": ["Everest", "Mt Everest"]},
    {"id": "q3", "context": TEXTS[2], "question": "What does photosynthesis convert?", "answer": "light energy"},
    {"id": "q4", "context": TEXTS[3], "question": "What jumps over the dog?", "answers": {"text": ["fox"]}},
]
N_SYSTEMS = 7  # uncompressed, no_context, fixed x2, x8, semi -1, 0, +1
TIMING = {"retrieve_s", "compress_s", "prefill_s", "decode_s", "ttft_s", "compress_cached_s", "compress_uncached_s"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ckpt(tiny_config, tmp_path_factory):
    """A saved tiny compressor whose decoder LoRA is non-zero, so base and tuned decoders differ."""
    torch.manual_seed(0)
    comp = SemiDynamicCompressor(tiny_config)
    with torch.no_grad():
        for n, p in comp.decoder.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "comp"
    comp.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def comp(ckpt):
    return SemiDynamicCompressor.from_pretrained(str(ckpt))


@pytest.fixture
def dataset(tmp_path):
    return _write_jsonl(tmp_path / "qa.jsonl", ROWS)


def _config(dataset, out, **kw) -> EvalConfig:
    base = dict(dataset=str(dataset), out=str(out), scales=[-1.0, 0.0, 1.0], factors=[2, 8], max_new_tokens=3,
                warmup=0, progress=False, llmlingua="off")
    return EvalConfig(**{**base, **kw})


def _lines(out) -> list[dict]:
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMING}


# -- datasets -------------------------------------------------------------------------------------


def test_jsonl_parquet_and_answer_layouts(tmp_path, dataset):
    got = load_qa_dataset(dataset)
    assert [s.id for s in got] == ["q0", "q1", "q2", "q3", "q4"]
    assert got[0].answers == ("Paris",) and got[2].answers == ("Everest", "Mt Everest")
    assert got[4].answers == ("fox",) and got[4].context == TEXTS[3]
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("context", "question")} | {"answer": "x"} for r in ROWS]),
                   tmp_path / "qa.parquet")
    par = load_qa_dataset(tmp_path / "qa.parquet")
    assert [s.id for s in par] == ["0", "1", "2", "3", "4"] and par[3].question == ROWS[3]["question"]
    # a seeded subset: same seed, same questions, file order kept
    a, b = load_qa_dataset(dataset, limit=3, seed=1), load_qa_dataset(dataset, limit=3, seed=1)
    assert a == b and len(a) == 3 and [s.id for s in a] == sorted(s.id for s in a)


def test_malformed_rows_are_named(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], {"context": "c", "answer": "a"}])
    with pytest.raises(DatasetError, match=r"bad\.jsonl line 3: 'question' must be a non-empty string"):
        load_qa_dataset(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"broken\.jsonl line 2: invalid JSON"):
        load_qa_dataset(broken)
    pq.write_table(pa.Table.from_pylist([{"question": "q?", "answers": ["a"]}, {"question": "q2?", "answers": []}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match=r"bad\.parquet row 1: 'answers' must be a string or a non-empty list"):
        load_qa_dataset(tmp_path / "bad.parquet")
    dup = _write_jsonl(tmp_path / "dup.jsonl", [ROWS[0], ROWS[0]])
    with pytest.raises(DatasetError, match=r"line 2: id 'q0' already used at .*line 1"):
        load_qa_dataset(dup)
    with pytest.raises(DatasetError, match="no 'answer' or 'answers'"):
        parse_row({"question": "q"}, "here", "0")
    with pytest.raises(DatasetError, match="'context' must be a non-empty string"):
        parse_row({"question": "q", "answer": "a", "context": "  "}, "here", "0")
    with pytest.raises(DatasetError, match="neither an existing file nor one of the dataset names"):
        load_qa_dataset(tmp_path / "nope.jsonl")


def test_cli_reports_the_malformed_row(tmp_path, ckpt, caplog):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"question": "q", "answer": 3}])
    rc = main(["eval", "--dataset", str(bad), "--compressor", str(ckpt), "--out", str(tmp_path / "o"),
               "--no-progress", "--llmlingua", "off"])
    assert rc == 2
    assert "bad.jsonl line 2: 'answer' must be a string" in caplog.text


def test_named_datasets_convert_rows(monkeypatch):
    hotpot = HF_DATASETS["hotpot_qa"][1]({"id": "h", "question": "q?", "answer": "b",
                                          "context": {"title": ["A", "B"], "sentences": [["x.", " y."], ["z."]]}})
    assert parse_row(hotpot, "h", "0").context == "A: x. y.\n\nB: z."
    nq = parse_row(HF_DATASETS["nq"][1]({"question": "who?", "answer": ["me", "you"]}), "n", "0")
    assert nq.answers == ("me", "you") and nq.context is None
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DatasetError, match="needs the `datasets` package"):
            load_qa_dataset("squad")


# -- runner -----------------------------------------------------------------------------------------


def test_cli_end_to_end_writes_outputs_and_resumes(tmp_path, dataset, ckpt, comp):
    out = tmp_path / "gold"
    argv = ["eval", "--dataset", str(dataset), "--compressor", str(ckpt), "--out", str(out),
            "--scales", "-1:1:1", "--factors", "2,8", "--max-new-tokens", "3", "--no-progress", "--llmlingua", "off"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    names = [s["system"] for s in results["systems"]]
    assert names == ["uncompressed", "no_context", "fixed_x2", "fixed_x8",
                     "semi_dynamic_s-1", "semi_dynamic_s+0", "semi_dynamic_s+1"]
    md = (out / "results.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    for row in results["systems"]:  # every accuracy carries its 95% interval, in JSON and the table
        lo, hi = row["accuracy_ci95"]
        assert lo <= row["accuracy"] <= hi and f"{lo:.3f}-{hi:.3f}" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = _lines(out)
    assert len(lines) == N_SYSTEMS * len(ROWS)
    by_sys = {}
    for d in lines:
        r = SampleResult.from_json(d)
        assert r.correct == substring_match(r.prediction, r.answers)
        assert r.ttft_s == pytest.approx(r.retrieve_s + r.compress_s + r.prefill_s)
        assert r.prefill_s > 0 and r.decode_s >= 0 and 1 <= r.new_tokens <= 3
        by_sys.setdefault(r.system, []).append(r)
    for s in results["systems"]:
        rs = by_sys[s["system"]]
        assert s["n"] == len(ROWS) and s["accuracy"] == pytest.approx(sum(r.correct for r in rs) / len(rs))
        assert s == {**summarize(rs, s["family"], s["param"]).to_json(), "gain_over_fixed": s["gain_over_fixed"]}
    assert all(r.chunk_positions == [] and r.prefill_tokens > 0 for r in by_sys["no_context"])
    assert all(r.factors == [8] for r in by_sys["fixed_x8"])
    assert all(r.chunk_positions == r.chunk_tokens for r in by_sys["uncompressed"])

    # same run again: nothing recomputed, nothing rewritten
    before = (out / "samples.jsonl").read_bytes()
    again = run_evaluation(_config(dataset, out, compressor=str(ckpt), warmup=2))
    assert (again.computed, again.reused) == (0, N_SYSTEMS * len(ROWS))
    assert (out / "samples.jsonl").read_bytes() == before
    # killed mid-write: the last 3 lines lost and a partial one left behind -> only those are redone
    raw = before.decode().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(raw[:-3]) + raw[-3][:20])
    resumed = run_evaluation(_config(dataset, out, compressor=str(ckpt)))
    assert resumed.computed == 3
    assert [_untimed(d) for d in _lines(out)] == [_untimed(json.loads(x)) for x in raw]  # deterministic


def test_answers_equal_the_core_api(tmp_path, dataset, comp):
    out = tmp_path / "o"
    run_evaluation(_config(dataset, out, systems=["uncompressed", "fixed", "semi_dynamic"], factors=[8],
                           scales=[-1.0]), compressor=comp)
    pred = {(d["system"], d["sample_id"]): d["prediction"] for d in _lines(out)}
    dec = comp.decoder
    for row in ROWS:
        q, ctx = row["question"], row["context"]
        assert pred[("fixed_x8", row["id"])] == comp.generate(q, comp.compress(ctx, factor=8), max_new_tokens=3)
        assert pred[("semi_dynamic_s-1", row["id"])] == comp.generate(q, comp.compress(ctx, scale=-1.0),
                                                                      max_new_tokens=3)
    # the uncompressed baseline is the BASE decoder (adapters off) reading the text in the same prompt
    ids = dec.encode_prompts([text_prompt(comp, ROWS[2]["question"], [ROWS[2]["context"]])])
    assert ids[0].count(dec.placeholder_id) == 0
    assert dec.render(ROWS[2]["question"], 1).replace(dec.placeholder, ROWS[2]["context"]) == \
        text_prompt(comp, ROWS[2]["question"], [ROWS[2]["context"]])
    x = torch.tensor(ids)
    with torch.no_grad():
        tuned_logits = dec.model(input_ids=x).logits
        with dec.model.disable_adapter():
            base_logits = dec.model(input_ids=x).logits
            base = dec.model.generate(input_ids=x, max_new_tokens=3, do_sample=False,
                                      pad_token_id=dec.tokenizer.pad_token_id)
        tuned = dec.model.generate(input_ids=x, max_new_tokens=3, do_sample=False,
                                   pad_token_id=dec.tokenizer.pad_token_id)
    assert not torch.allclose(tuned_logits, base_logits)  # the two decoders really differ
    decode = lambda t: dec.tokenizer.decode(t[0, x.shape[1]:], skip_special_tokens=True)  # noqa: E731
    assert pred[("uncompressed", "q2")] == decode(base)
    tuned_out = tmp_path / "tuned"
    run_evaluation(_config(dataset, tuned_out, systems=["uncompressed"], baseline_decoder="tuned"), compressor=comp)
    tuned_pred = {d["sample_id"]: d["prediction"] for d in _lines(tuned_out)}
    assert tuned_pred["q2"] == decode(tuned)
    assert any(tuned_pred[r["id"]] != pred[("uncompressed", r["id"])] for r in ROWS)  # the flag changes answers


def test_batched_decoding_gives_the_same_answers(tmp_path, dataset, comp):
    single, batched = tmp_path / "single", tmp_path / "batched"
    kw = dict(systems=["uncompressed", "no_context", "fixed", "semi_dynamic"], max_new_tokens=4)
    run_evaluation(_config(dataset, single, **kw), compressor=comp)
    out = run_evaluation(_config(dataset, batched, decode_batch_size=3, **kw), compressor=comp)
    one, many = _lines(single), _lines(batched)
    assert len(many) == len(one) == N_SYSTEMS * len(ROWS)
    assert [_untimed(d) for d in many] == [_untimed(d) for d in one]  # prefill lengths and answers too
    assert json.loads((batched / "run.json").read_text())["decode_batch_size"] == 3
    assert out.computed == len(many)
    with pytest.raises(EvalError, match="decode_batch_size"):  # batching is part of what a run is
        run_evaluation(_config(dataset, batched, **kw), compressor=comp)


def test_baselines_are_reused_from_another_checkpoints_run(tmp_path, dataset, ckpt, comp):
    first = tmp_path / "first"
    kw = dict(systems=["uncompressed", "no_context", "fixed"], factors=[4], max_new_tokens=3)
    run_evaluation(_config(dataset, first, **kw), compressor=comp)
    other = SemiDynamicCompressor.from_pretrained(str(ckpt))
    with torch.no_grad():
        other.projector.down_proj.weight.mul_(2.0)  # another checkpoint of the same base models
    assert other.fingerprint != comp.fingerprint
    second = tmp_path / "second"
    out = run_evaluation(_config(dataset, second, reuse_baselines=str(first), **kw), compressor=other)
    assert out.computed == len(ROWS) and out.reused == 2 * len(ROWS)  # only fixed_x4 is answered anew
    a = {(d["system"], d["sample_id"]): d for d in _lines(first)}
    b = {(d["system"], d["sample_id"]): d for d in _lines(second)}
    for k in b:
        if k[0] != "fixed_x4":
            assert b[k] == a[k]
    with pytest.raises(EvalError, match="differs in: max_new_tokens"):
        run_evaluation(_config(dataset, tmp_path / "third", reuse_baselines=str(first), **{**kw, "max_new_tokens": 2}),
                       compressor=other)
    with pytest.raises(EvalError, match="not an eval folder"):
        run_evaluation(_config(dataset, tmp_path / "fourth", reuse_baselines=str(tmp_path), **kw), compressor=other)


def test_each_context_is_encoded_once(tmp_path, dataset, comp, monkeypatch):
    encoded: list[str] = []
    real = comp.encode

    def counting(texts, batch_size=16):
        encoded.extend(texts)
        return real(texts, batch_size)

    monkeypatch.setattr(comp, "encode", counting)
    run_evaluation(_config(dataset, tmp_path / "o", systems=["fixed", "semi_dynamic"], max_new_tokens=1),
                   compressor=comp)  # 2 factors + 3 scales
    assert sorted(encoded) == sorted(set(TEXTS))  # 4 unique contexts for 5 questions, once each


def test_rag_setting_retrieves_top_k(tmp_path, dataset, comp):
    out = tmp_path / "rag"
    outcome = run_evaluation(_config(dataset, out, setting="rag", k=2, systems=["uncompressed", "no_context", "fixed"],
                                     factors=[4]), compressor=comp)
    lines = [SampleResult.from_json(d) for d in _lines(out)]
    for r in lines:
        if r.system == "no_context":
            assert r.retrieve_s == 0 and r.gold_retrieved is None and r.chunk_tokens == []
        else:
            assert len(r.chunk_tokens) == 2 and r.retrieve_s > 0 and isinstance(r.gold_retrieved, bool)
    unc = {r.sample_id: r for r in lines if r.system == "uncompressed"}
    assert unc["q0"].gold_retrieved  # "Eiffel Tower" finds its own sentence
    recall = {s.system: s.gold_recall for s in outcome.summaries}
    assert recall["uncompressed"] == recall["fixed_x4"] == sum(r.gold_retrieved for r in unc.values()) / len(ROWS)
    assert list(out.glob("corpus_embeddings-*.npy"))


def test_rag_from_a_corpus_directory(tmp_path, comp):
    from semidyn_rag.corpus import CorpusDirectory, precompress

    docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in TEXTS])
    corpus = tmp_path / "corpus"
    precompress(docs, corpus, comp, progress=False)
    open_domain = _write_jsonl(tmp_path / "nq.jsonl", [{k: r[k] for k in r if k != "context"} for r in ROWS[:3]])
    out = tmp_path / "o"
    outcome = run_evaluation(_config(open_domain, out, setting="rag", k=1, corpus=str(corpus),
                                     systems=["fixed", "no_context"], factors=[2]), compressor=comp)
    reads = json.loads((out / "results.json").read_text())["meta"]["last_invocation"]
    assert reads["store_misses_encoded"] == 0 and reads["store_hits"] == reads["contexts_encoded_or_read"] > 0
    pred = {(d["system"], d["sample_id"]): d for d in _lines(out)}
    with CorpusDirectory(corpus) as cd:
        for row in ROWS[:3]:
            hits = cd.search(row["question"], 1)
            ctxs, _ = cd.contexts(hits, comp, factor=2)
            assert pred[("fixed_x2", row["id"])]["prediction"] == comp.generate(row["question"], ctxs, max_new_tokens=3)
    assert outcome.computed == 6
    with pytest.raises(EvalError, match="no context: the gold setting needs one"):
        run_evaluation(_config(open_domain, tmp_path / "g"), compressor=comp)
    with pytest.raises(EvalError, match="no contexts to retrieve from; pass --corpus"):
        run_evaluation(_config(open_domain, tmp_path / "r", setting="rag"), compressor=comp)
    with pytest.raises(ValueError, match="--corpus is for the rag setting"):
        _config(open_domain, tmp_path / "x", corpus=str(corpus))


def test_a_resumed_folder_must_hold_the_same_run(tmp_path, dataset, comp):
    out = tmp_path / "o"
    run_evaluation(_config(dataset, out, systems=["no_context"]), compressor=comp)
    with pytest.raises(EvalError, match="differs in: max_new_tokens"):
        run_evaluation(_config(dataset, out, systems=["no_context"], max_new_tokens=4), compressor=comp)
    done = run_evaluation(_config(dataset, out, systems=["no_context"], max_new_tokens=4, overwrite=True),
                          compressor=comp)
    assert done.computed == len(ROWS)
    # more systems over the same run reuse what is there
    more = run_evaluation(_config(dataset, out, systems=["no_context", "fixed"], factors=[4], max_new_tokens=4),
                          compressor=comp)
    assert (more.computed, more.reused) == (len(ROWS), len(ROWS))


def test_answers_from_another_decoder_backend_are_not_mixed_in(tmp_path, dataset, comp):
    from semidyn_rag.evaluation.decoding import decoding_backends
    from semidyn_rag.serving import TransformersBackend

    class OtherBackend(TransformersBackend):  # stands for vLLM: same answers, another engine
        name = "vllm"

    out = tmp_path / "o"
    run_evaluation(_config(dataset, out, systems=["fixed"], factors=[4]), compressor=comp)
    with decoding_backends(OtherBackend(comp.decoder)):
        with pytest.raises(EvalError, match="differs in: decoder_backend"):
            run_evaluation(_config(dataset, out, systems=["fixed"], factors=[4]), compressor=comp)
        done = run_evaluation(_config(dataset, tmp_path / "v", systems=["fixed"], factors=[4]), compressor=comp)
    assert done.computed == len(ROWS)
    assert json.loads((tmp_path / "v" / "run.json").read_text())["decoder_backend"] == "vllm"
    assert "decoder_backend" not in json.loads((out / "run.json").read_text())


# -- report and CLI parsing --------------------------------------------------------------------------


def _summary(system, family, acc, ratio):
    r = SampleResult(system, "0", "p", ["a"], True, 0.0, 0.0, [int(ratio * 10)], [10], [None])
    return dataclasses.replace(summarize([r], family, None), accuracy=acc)


def test_per_ratio_names_the_most_accurate_and_the_cheapest_that_reach_the_ratio():
    from semidyn_rag.evaluation.per_ratio import per_ratio, per_ratio_markdown

    def at(system, family, param, acc, ratio, ci, cost, cached=None):
        return dataclasses.replace(_summary(system, family, acc, ratio), param=param, ratio_all=ratio,
                                   accuracy_ci95=ci, compress_s=cost, compress_cached_s=cached)

    rows = per_ratio([
        at("fixed_x4", "fixed", 4, 0.10, 3.96, (0.08, 0.125), 0.19, cached=0.008),
        at("truncate_x4", "truncate", 4, 0.16, 4.0, (0.13, 0.20), 0.002),
        at("sentence_optimizer_x4", "sentence_optimizer", 4, 0.18, 3.1, (0.15, 0.21), 0.15),  # short of 4x
        at("semi_dynamic_s0", "semi_dynamic", 0.0, 0.14, 4.6, (0.11, 0.17), 0.2, cached=0.01),
        at("semi_dynamic_s2", "semi_dynamic", 2.0, 0.05, 12.0, (0.03, 0.07), 0.2, cached=0.004),  # near no target
        at("uncompressed", "uncompressed", None, 0.19, 1.0, (0.16, 0.23), 0.0),
    ])
    (r,) = rows
    assert r["factor"] == 4 and r["systems"] == ["fixed_x4", "truncate_x4", "semi_dynamic_s0"]
    assert r["short_of_ratio"] == [{"system": "sentence_optimizer_x4", "ratio": 3.1}]
    assert (r["most_accurate"], r["not_told_apart"]) == ("truncate_x4", ["semi_dynamic_s0"])
    assert r["cheapest"] == "truncate_x4" and abs(r["cheapest_ms"] - 2.0) < 1e-9
    md = per_ratio_markdown(rows)
    assert "| 4x | truncate_x4 16.0% (13.0-20.0) | semi_dynamic_s0 | truncate_x4 (2.0 ms/q) |" in md
    assert "sentence_optimizer_x4 (reaches 3.1x)" in md
    assert per_ratio_markdown(per_ratio([at("uncompressed", "uncompressed", None, 0.2, 1.0, None, 0.0)])) == ""


def test_gain_over_fixed_interpolates_in_log_ratio():
    fixed = [_summary("f2", "fixed", 0.6, 2.0), _summary("f8", "fixed", 0.2, 8.0)]
    semi = _summary("s", "semi_dynamic", 0.5, 4.0)  # log2 4 is halfway between 1 and 3: fixed there = 0.4
    outside = _summary("t", "semi_dynamic", 0.1, 16.0)
    got = {s.system: s.gain_over_fixed for s in gain_over_fixed(fixed + [semi, outside])}
    assert got["s"] == pytest.approx(0.1) and got["t"] is None and got["f2"] is None
    table = markdown_table(gain_over_fixed(fixed + [semi]))
    assert table.count("\n") == 2 + 3 and "| s | 1 | 0.500 |" in table and "+0.100" in table


def test_parse_scales():
    assert parse_scales("-2:4:0.5") == [x / 2 for x in range(-4, 9)]
    assert parse_scales("0,1.5, 3") == [0.0, 1.5, 3.0]
    assert parse_scales("0:1:0.4") == [0.0, 0.4, 0.8]
    for bad in ("1:0:0.5", "a:b", "0:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_scales(bad)


def test_a_damaged_result_log_names_its_line(tmp_path):
    from semidyn_rag.evaluation.records import ResultLog

    log = tmp_path / "samples.jsonl"
    for text, problem in (("\nnot json\n", "invalid JSON"), ('{"a": 1}\n', "result line lacks")):
        log.write_text(text)
        with pytest.raises(ValueError, match=rf"samples.jsonl line {text.count(chr(10))}: not a result line "
                                             rf"\({problem}.*delete the file"):
            ResultLog(log)
