"""Text-pruning peers (truncate, SentenceEmbeddingOptimizer, LongLLMLingua) and --on-overflow."""

from __future__ import annotations

import json
import socket

import pytest

from semidyn_rag.cli import main
from semidyn_rag.evaluation import EvalConfig, run_evaluation
from semidyn_rag.evaluation.errors import EvalError
from semidyn_rag.evaluation.peers import (
    LongLLMLinguaText,
    ScorerMemo,
    SentenceOptimizerText,
    TruncateText,
    default_scorer,
    load_prompt_compressor,
    make_embedding,
)
from semidyn_rag.evaluation.records import SystemSummary
from semidyn_rag.evaluation.report import plot_pareto
from semidyn_rag.evaluation.systems import ContextItem, build_systems

# Sixteen short sentences of similar length; one of them answers the question.
ANIMALS = ["cat", "dog", "cow", "pig", "hen", "fox", "elk", "bee", "ant", "bat", "rat", "yak", "emu", "eel", "ape"]
FILLER = [f"The {a} walks to the green field and eats grass there." for a in ANIMALS]
ANSWER = "The owl sleeps all day inside the old red barn roof."
LONG = " ".join(FILLER[:9] + [ANSWER] + FILLER[9:])
QUESTION = "Where does the owl sleep?"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails: the peers must load and run from local files only."""

    def refuse(*a, **k):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _ratio(prep) -> float:
    return sum(prep.chunk_tokens) / sum(prep.chunk_positions)


def _decoder_text(comp, prep) -> str:
    return comp.decoder.tokenizer.decode(prep.prompt_ids)


def _check(comp, prep, factor):
    """Ratio within 20% of the target, and the decoder's prompt holds exactly the pruned text."""
    assert _ratio(prep) == pytest.approx(factor, rel=0.2)
    assert prep.texts and prep.texts[0] and prep.texts[0] != LONG
    prompt = _decoder_text(comp, prep)
    assert prep.texts[0] in prompt and LONG not in prompt and QUESTION in prompt
    assert prep.latents == [] and prep.compress_s > 0


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_truncate_keeps_the_first_tokens(compressor, factor):
    prep = TruncateText(factor).prepare(compressor, QUESTION, [ContextItem(LONG)])
    _check(compressor, prep, factor)
    assert LONG.startswith(prep.texts[0])


def test_sentence_optimizer_keeps_the_closest_sentences(compressor, no_network):
    emb = make_embedding()
    for factor in (2, 4, 8):
        prep = SentenceOptimizerText(factor, emb).prepare(compressor, QUESTION, [ContextItem(LONG)])
        _check(compressor, prep, factor)
        # MiniLM ranks the owl sentence first: it survives even at 8x (2 of 16 sentences)
        assert ANSWER in prep.texts[0]
        kept = [s for s in FILLER + [ANSWER] if s in prep.texts[0]]
        assert len(kept) == round(16 / factor)


def test_longllmlingua_prunes_tokens_with_a_local_scorer(compressor, no_network):
    scorer = default_scorer(compressor)
    assert scorer == compressor.config.decoder  # the decoder's own base model
    lingua = load_prompt_compressor(scorer, "cpu")
    for factor in (2, 4):
        prep = LongLLMLinguaText(factor, lingua).prepare(compressor, QUESTION, [ContextItem(LONG)])
        _check(compressor, prep, factor)
        # token deletion: what is kept is a subsequence of the original (spaces aside)
        rest = iter(LONG.replace(" ", ""))
        assert all(ch in rest for ch in prep.texts[0].replace(" ", ""))


def test_scorer_memo_gives_the_same_text_and_charges_the_time(compressor, no_network):
    plain = load_prompt_compressor(default_scorer(compressor), "cpu")
    memo_pc = load_prompt_compressor(default_scorer(compressor), "cpu")
    memo = ScorerMemo(memo_pc)
    for factor in (2, 4):
        want = LongLLMLinguaText(factor, plain).prune(compressor, QUESTION, LONG)
        system = LongLLMLinguaText(factor, memo_pc)
        prep = system.prepare(compressor, QUESTION, [ContextItem(LONG)])
        assert prep.texts == [want]
    # the 4x call reused both scorer passes (conditional and plain) of the 2x call, and paid for them
    assert len(memo.memo) == 2 and memo.replayed_s > 0 and prep.compress_s >= memo.replayed_s


def test_peers_in_an_eval_run(tmp_path, compressor, no_network):
    rows = [{"id": f"q{i}", "context": LONG, "question": q, "answer": a}
            for i, (q, a) in enumerate([(QUESTION, "barn"), ("What does the cat eat?", "grass")])]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(dataset=str(data), out=str(tmp_path / "out"), factors=[2, 4], max_new_tokens=3, warmup=0,
                     progress=False, systems=["uncompressed", "fixed", "truncate", "sentence_optimizer",
                                              "longllmlingua"])
    outcome = run_evaluation(cfg, compressor)
    rows_by = {s.system: s for s in outcome.summaries}
    assert list(rows_by) == ["uncompressed", "fixed_x2", "fixed_x4", "truncate_x2", "truncate_x4",
                             "sentence_optimizer_x2", "sentence_optimizer_x4", "longllmlingua_x2", "longllmlingua_x4"]
    for name, s in rows_by.items():
        if name == "uncompressed":
            continue
        assert s.ratio_all == pytest.approx(s.param, rel=0.2)
        assert s.prefill_tokens < rows_by["uncompressed"].prefill_tokens
        assert s.compress_s > 0
        latent = name.startswith("fixed")  # both query-time costs for the soft compressor only
        assert (s.compress_cached_s is not None) == latent and (s.compress_uncached_s is not None) == latent
        if latent:
            assert 0 < s.compress_cached_s and 0 < s.compress_uncached_s
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| compress ms/q | cached ms/q | encoder ms/q |" in md and "| longllmlingua_x4 |" in md


def test_pareto_labels_every_factor(tmp_path, monkeypatch):
    import matplotlib.figure

    seen = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: seen.update(ax=fig.axes[0], labels=fig.axes[0].get_legend_handles_labels()[1]))

    def row(system, family, param, ratio, acc):
        return SystemSummary(system, family, param, 10, int(acc * 10), acc, 0.0, 0.0, ratio, ratio, ratio, None, None,
                             {}, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, accuracy_ci95=(0.0, 1.0))

    rows = [row(f"{fam}_x{f}", fam, float(f), f * 1.05, 0.1) for fam in ("fixed", "truncate", "longllmlingua")
            for f in (2, 4, 8, 16)] + [row("fixed_x2", "fixed", 2.0, 2.0, 0.2)]
    plot_pareto(rows[:-1], tmp_path / "p.png")
    labels = [t.get_text() for t in seen["ax"].get_xticklabels()]
    assert labels == ["2x", "4x", "8x", "16x"]
    assert {"fixed factor (soft)", "truncate (text)", "LongLLMLingua (text)"} <= set(seen["labels"])


def test_peers_need_ratio_factors(make_compressor):
    comp = make_compressor(backbone="last_tokens", lengths=(4, 8))
    with pytest.raises(ValueError, match="need a mean-pooling compressor"):
        build_systems(comp, ["truncate"], factors=[4])


def test_a_peer_that_cannot_load_says_why(compressor, tmp_path):
    from semidyn_rag.evaluation.peers import build_peers

    with pytest.raises(EvalError, match="longllmlingua cannot run with scorer"):
        build_peers(compressor, ["longllmlingua"], [2], scorer=str(tmp_path / "missing"))


# -- --on-overflow --------------------------------------------------------------------------------

SHORT = "The Eiffel Tower is in Paris."


@pytest.fixture
def overflow_data(tmp_path):
    rows = [{"id": "ok", "context": SHORT, "question": "Where is the tower?", "answer": "Paris"},
            {"id": "long", "context": LONG, "question": QUESTION, "answer": "barn"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def small_limit(make_compressor):
    comp = make_compressor(max_context_tokens=40)
    assert len(comp.encoder.tokenizer(LONG)["input_ids"]) > comp.encoder.max_tokens
    assert len(comp.encoder.tokenizer(SHORT)["input_ids"]) <= comp.encoder.max_tokens
    return comp


def _run(data, out, comp, mode):
    cfg = EvalConfig(dataset=str(data), out=str(out), factors=[2], scales=[0.0], max_new_tokens=2, warmup=0,
                     progress=False, llmlingua="off", systems=["uncompressed", "no_context", "fixed", "truncate"],
                     on_overflow=mode)
    return run_evaluation(cfg, comp)


def test_overflow_skip_drops_the_question_for_every_system(tmp_path, overflow_data, small_limit):
    out = tmp_path / "skip"
    outcome = _run(overflow_data, out, small_limit, "skip")
    assert all(s.n == 1 for s in outcome.summaries)  # no_context too: the same questions for all
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {d["sample_id"] for d in lines} == {"ok"}
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["overflow"]["questions_skipped"] == 1 and meta["overflow"]["contexts_over_limit"] == 1
    assert meta["n_questions"] == 1
    assert "1 question(s) reading them were skipped" in (out / "results.md").read_text()
    again = _run(overflow_data, out, small_limit, "skip")  # resumed: nothing to do, same count
    assert again.computed == 0 and json.loads((out / "results.json").read_text())["meta"]["overflow"] == meta["overflow"]


def test_overflow_truncate_cuts_the_context_for_every_system(tmp_path, overflow_data, small_limit):
    out = tmp_path / "cut"
    outcome = _run(overflow_data, out, small_limit, "truncate")
    assert all(s.n == 2 for s in outcome.summaries)
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    limit = small_limit.encoder.max_tokens
    for d in lines:
        if d["sample_id"] == "long" and d["system"] in ("uncompressed", "fixed_x2"):
            assert sum(d["chunk_tokens"]) <= limit + 2  # the cut text, read by text and latent systems alike
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["overflow"]["contexts_truncated"] == 1


def test_overflow_error_names_the_question(tmp_path, overflow_data, small_limit, ckpt, caplog):
    with pytest.raises(EvalError, match=r"exceed the encoder limit.*'long'"):
        _run(overflow_data, tmp_path / "err", small_limit, "error")
    # the CLI: flag parsed, refused in one line, exit code 2 (ckpt's limit is large: no overflow there)
    argv = ["eval", "--dataset", str(overflow_data), "--compressor", str(ckpt), "--out", str(tmp_path / "cli"),
            "--factors", "2", "--scales", "0", "--max-new-tokens", "1", "--no-progress", "--llmlingua", "off",
            "--on-overflow", "error", "--systems", "uncompressed"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["on_overflow"] == "error"


def test_llamaindex_benchmark_runs_every_setup(tmp_path, no_network):
    from benchmarks import llamaindex_peers

    record = llamaindex_peers.main(["--model", "tiny", "--quick", "--threads", "1", "--max-new-tokens", "2",
                                    "--out", str(tmp_path)])
    summary = {s["setup"]: s for s in record["summary"]}
    assert list(summary) == list(llamaindex_peers.SETUPS)
    for name, s in summary.items():
        assert s["questions"] == 2 and s["prefill_ms"] > 0 and s["retrieve_ms"] > 0
        if name != "none":  # every postprocessor shortens what the LLM reads, and costs time to do so
            assert s["prefill_positions"] < summary["none"]["prefill_positions"] and s["compress_ms"] > 0
    # the same features, read from the store or encoded: the same positions
    assert summary["semidyn"]["prefill_positions"] == summary["semidyn_cold"]["prefill_positions"]
    assert (tmp_path / "llamaindex_peers.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "llamaindex_peers.json").read_text())["settings"]["k"] == 5
