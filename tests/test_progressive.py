"""Progressive reading: the budget, reads from the store without the encoder, determinism, and
the fine latents in the decoder's input embeddings."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from semidyn_rag import CompressionSession, LatentStore
from semidyn_rag.pipeline.pooling import MeanPooling
from semidyn_rag.progressive import (TEXT, AttentionSignal, LikelihoodSignal, ProgressiveReader, Sizes, flat_reads,
                                     plan_reads)
from semidyn_rag.progressive.signals import attention_modules

CHUNKS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France, named after Gustave Eiffel.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas, on the border of Nepal.",
    "Photosynthesis converts light energy into chemical energy in plants, with water and carbon dioxide.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up and leaves.",
    "Paris is the capital of France and its largest city, on the river Seine.",
    "The Amazon is the largest river in South America by the volume of water it carries to the sea.",
]
QUESTION = "Where is the Eiffel Tower?"


def _sizes(allow_text=True):
    pooling = MeanPooling((2, 4, 8, 16))
    return Sizes((2, 4, 8, 16), pooling.n_latents, pooling.factor_of, allow_text)


# -- the planner ------------------------------------------------------------------------------


@pytest.mark.parametrize("allow_text", [True, False])
def test_the_budget_is_never_exceeded(allow_text):
    sizes = _sizes(allow_text)
    lengths = [[7, 90, 33, 150, 61, 12, 240, 88, 19, 64], [300] * 6, [3, 5, 8, 1]]
    for tokens, budget, m, share in itertools.product(lengths, (0, 1, 7, 25, 60, 140, 400, 2000),
                                                      (0, 1, 2, 5), (0.0, 0.3, 0.5, 1.0)):
        text = [int(t * 1.2) for t in tokens]
        relevance = [((i * 7) % 5) / 5 for i in range(len(tokens))]
        reads = plan_reads(tokens, text, relevance, sizes, max_latents=budget, max_expand=m, expand_share=share)
        used = sum(r.positions for r in reads)
        assert used <= budget
        for r in reads:  # every position is what its read costs
            want = (0 if r.read == "dropped" else text[r.index] if r.read == "text"
                    else sizes.cost(tokens[r.index], 0, r.size))
            assert r.positions == want
            if r.expanded:
                assert r.relevance_rank <= m and (r.read == "text" or r.size < 16)
        # nothing is dropped while its coarse read would still fit
        assert all(used + sizes.cost(tokens[r.index], 0, 16) > budget for r in reads if r.read == "dropped")
        flat = flat_reads(tokens, text, sizes, max_latents=budget)
        assert sum(r.positions for r in flat) <= budget
        assert len({r.size for r in flat if r.read == "latents"}) <= 1 and not any(r.expanded for r in flat)


def test_depth_goes_to_the_most_relevant_chunks_first():
    sizes = _sizes()
    tokens, text = [60] * 8, [70] * 8
    relevance = [0.1, 0.9, 0.2, 0.8, 0.0, 0.0, 0.0, 0.0]
    reads = plan_reads(tokens, text, relevance, sizes, max_latents=100, max_expand=2, expand_share=0.5)
    assert [r.relevance_rank for r in reads[:4]] == [4, 1, 3, 2]
    # share 50: rank 1 at 2x (31; text at 70 does not fit), rank 2 at 4x (16); the other six
    # at 16x (4 each) make 71; the 29 left refine rank 2 to 2x (+15), not rank 1 to text (+39)
    assert reads[1].factor == 2 and "expanded: relevance rank 1" in reads[1].reason
    assert reads[3].factor == 2 and "left after the coarse reads" in reads[3].reason
    assert [r.factor for r in reads[4:]] == [16] * 4 and sum(r.positions for r in reads) == 86
    assert "outside the top 2" in reads[0].reason and not reads[0].expanded
    roomy = plan_reads(tokens, text, relevance, sizes, max_latents=1000)
    assert roomy[1].read == roomy[3].read == TEXT and roomy[1].factor == 1  # leftovers refine to text
    tight = plan_reads(tokens, text, relevance, sizes, max_latents=12)  # 3 chunks at 16x, by relevance
    assert [r.index for r in tight if r.read != "dropped"] == [1, 2, 3]
    assert all("budget" in r.reason for r in tight if r.read == "dropped")


def test_planner_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_latents"):
        plan_reads([5], [5], [1.0], _sizes(), max_latents=-1)
    with pytest.raises(ValueError, match="expand_share"):
        plan_reads([5], [5], [1.0], _sizes(), max_latents=10, expand_share=1.5)
    with pytest.raises(ValueError, match="one token count"):
        plan_reads([5, 6], [5], [1.0], _sizes(), max_latents=10)


# -- the reader on a store ------------------------------------------------------------------------


@pytest.fixture
def stored(compressor, tmp_path):
    """A compressor, features of CHUNKS in an on-disk store, and an encoder-call counter."""
    store = LatentStore(tmp_path / "latents.sqlite")
    store.fetch_or_encode(compressor, CHUNKS)
    calls = []
    real = compressor._encode_batch

    def counting(ids):
        calls.append(len(ids))
        return real(ids)

    compressor._encode_batch = counting
    feats = store.fetch_or_encode(compressor, CHUNKS).features
    assert calls == []
    return compressor, store, feats, calls


def _capture_generate(comp, monkeypatch):
    seen = {}

    def fake_generate(inputs_embeds=None, attention_mask=None, **kwargs):
        seen["embeds"] = inputs_embeds.detach().clone()
        return torch.full((inputs_embeds.shape[0], 1), comp.decoder.tokenizer.eos_token_id)

    monkeypatch.setattr(comp.decoder.model, "generate", fake_generate)
    return seen


def _find(rows: torch.Tensor, block: torch.Tensor) -> bool:
    m = block.shape[0]
    return any(torch.allclose(rows[s : s + m], block, atol=1e-5, rtol=1e-4) for s in range(rows.shape[0] - m + 1))


@pytest.mark.parametrize("signal", ["retriever", "attention", "likelihood"])
def test_expanded_chunks_carry_fine_latents_from_the_store(stored, monkeypatch, signal):
    comp, _, feats, calls = stored
    seen = _capture_generate(comp, monkeypatch)
    reader = ProgressiveReader(comp, signal=signal, max_expand=2, allow_text=False)
    budget = 24
    _, plan = reader.answer(QUESTION, feats, max_latents=budget, texts=CHUNKS)
    assert calls == []  # neither the scan nor the re-read ran the encoder
    assert plan.used <= budget
    assert (plan.scan_positions > 0) == (signal != "retriever")
    expanded = [c for c in plan.chunks if c.expanded]
    assert expanded, plan.to_dict()
    rows = seen["embeds"][0]
    assert rows.shape[0] == len(reader.inputs(QUESTION, plan, feats, CHUNKS)[0]) - len(plan.read_chunks) + plan.used
    for c in plan.chunks:
        fine = comp.compress_features([feats[c.index]], factor=c.factor or reader.coarse)[0].latents.to(rows.dtype)
        coarse = comp.compress_features([feats[c.index]], factor=reader.coarse)[0].latents.to(rows.dtype)
        if c.expanded:
            assert _find(rows, fine) and not _find(rows, coarse)
        elif c.read == "latents":
            assert _find(rows, coarse)
        else:
            assert not _find(rows, coarse)


def test_text_reads_put_the_chunk_text_in_the_prompt(stored, monkeypatch):
    comp, _, feats, _ = stored
    seen = _capture_generate(comp, monkeypatch)
    reader = ProgressiveReader(comp, max_expand=1)
    _, plan = reader.answer(QUESTION, feats, max_latents=200, texts=CHUNKS)
    assert plan.chunks[0].read == "text" and plan.chunks[0].factor == 1
    ids, contexts = reader.inputs(QUESTION, plan, feats, CHUNKS)
    assert CHUNKS[0] in comp.decoder.tokenizer.decode(ids)
    assert len(contexts) == sum(c.read == "latents" for c in plan.chunks)
    chunk_ids = comp.decoder.tokenizer(CHUNKS[0], add_special_tokens=False)["input_ids"]
    with torch.inference_mode():  # the text's own token embeddings sit in the decoder input
        rows = comp.decoder.model.get_input_embeddings()(torch.tensor(chunk_ids[1:-1]))
    assert _find(seen["embeds"][0], rows)


@pytest.mark.parametrize("signal", ["retriever", "attention", "likelihood"])
def test_same_question_and_store_give_the_same_expansions(ckpt, tmp_path, signal):
    from semidyn_rag import SemiDynamicCompressor

    plans = []
    for _ in range(2):  # two loads of one checkpoint, as two processes would
        comp = SemiDynamicCompressor.from_pretrained(str(ckpt))
        store = LatentStore(tmp_path / "latents.sqlite")
        feats = store.fetch_or_encode(comp, CHUNKS).features
        plan = ProgressiveReader(comp, signal=signal).plan(QUESTION, feats, max_latents=30, texts=CHUNKS)
        plans.append([(c.read, c.factor, c.relevance_rank, c.reason) for c in plan.chunks])
        store.close()
    assert plans[0] == plans[1]


def test_attention_signal_restores_the_decoder(stored):
    comp, _, feats, _ = stored
    model = comp.decoder.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    ctx = comp.compress_features(feats, factor=16)
    mass, positions = AttentionSignal().relevance(comp, QUESTION, ctx, None, len(ctx))
    assert len(mass) == len(CHUNKS) and all(m >= 0 for m in mass) and sum(mass) <= 1 + 1e-6
    assert positions == len(comp.decoder.encode_prompts([comp.decoder.render(QUESTION, len(ctx))])[0]) \
        - len(ctx) + sum(c.n_latents for c in ctx)
    assert base.config._attn_implementation == before
    assert all(not m._forward_hooks for m in attention_modules(model))


def test_likelihood_signal_is_the_question_log_probability(stored):
    comp, _, feats, _ = stored
    ctx = comp.compress_features(feats[:3], factor=16)
    got, _ = LikelihoodSignal(batch_size=2).relevance(comp, QUESTION, ctx, None, 3)
    dec = comp.decoder
    tok = dec.tokenizer
    for c, score in zip(ctx, got):  # one row at a time, by hand
        full = dec.apply_chat(f"Context: {dec.placeholder}\n\nQuestion: {QUESTION}")
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        inp = dec.expand([ids], [[c.latents]])
        with torch.inference_mode():
            logp = torch.log_softmax(dec.model(inputs_embeds=inp.inputs_embeds).logits[0].float(), -1)
        start = full.rindex(QUESTION)
        js = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < start + len(QUESTION)]
        shift = c.n_latents - 1  # the placeholder became n_latents rows
        want = torch.stack([logp[j + shift - 1, ids[j]] for j in js]).mean()
        assert abs(float(want) - score) < 1e-4


# -- the session ---------------------------------------------------------------------------------


def test_session_registers_the_planned_reads(stored):
    comp, store, _, calls = stored
    session = CompressionSession(comp, store)
    session.compress_chunks(CHUNKS, scale=0.0)  # an earlier query registered every chunk
    plan = session.read_progressive(QUESTION, CHUNKS + [""], max_latents=40, max_expand=1,
                                    scores=[0.9, 0.2, 0.1, 0.05, 0.5, 0.3, 0.0])
    assert calls == [] and session.encoder_calls == 0
    assert plan.used <= 40 and len(plan.chunks) == len(CHUNKS) + 1
    assert plan.chunks[-1].read == "dropped" and "empty" in plan.chunks[-1].reason
    for c, text in zip(plan.chunks, CHUNKS):
        got = session.registered(text)
        if c.read == "latents":
            assert got is not None and got.factor == c.factor and got.n_latents == c.positions
        else:
            assert got is None  # an earlier latent read can never stand in for it
    assert plan.chunks[0].expanded and plan.chunks[0].relevance_rank == 1
    prompt = "Context:\n" + "\n".join(CHUNKS[::-1]) + f"\n\nQuestion: {QUESTION}"
    notes = session.progress_notes(prompt)
    assert [n["key"] for n in notes] == [c["key"] for c in reversed(session.progress_notes("\n".join(CHUNKS)))]
    assert notes[-1]["read"] == plan.chunks[0].read and "reason" in notes[-1]
    json.dumps(plan.to_dict()), json.dumps([c.to_metadata() for c in plan.chunks])  # JSON-able
    ids, contexts, usage = session.splice(prompt)
    assert usage.latent_slots == sum(c.positions for c in plan.chunks if c.read == "latents")


def test_reader_rejects_bad_options(compressor):
    with pytest.raises(ValueError, match="unknown relevance signal"):
        ProgressiveReader(compressor, signal="vibes")
    with pytest.raises(ValueError, match="expand_share"):
        ProgressiveReader(compressor, expand_share=2)
    with pytest.raises(ValueError, match="fine size"):
        ProgressiveReader(compressor, coarse=4, fine=16)
    with pytest.raises(ValueError, match="factor"):
        ProgressiveReader(compressor, coarse=3)
    with pytest.raises(ValueError, match="empty"):
        ProgressiveReader(compressor).plan(" ", [], max_latents=4)


def test_notes_of_a_chunk_registered_again_are_stale(stored):
    comp, store, _, _ = stored
    session = CompressionSession(comp, store)
    session.read_progressive(QUESTION, CHUNKS, max_latents=30)
    assert len(session.progress_notes("\n".join(CHUNKS))) == len(CHUNKS)
    session.compress_chunks(CHUNKS[:2])  # a plain query reads the first two at the selector's factor
    assert [n["key"] for n in session.progress_notes("\n".join(CHUNKS))] == \
        [n["key"] for n in session.progress_notes("\n".join(CHUNKS[2:]))]


# -- the eval systems, the CLI and LlamaIndex ----------------------------------------------------


def test_eval_systems_share_one_budget(stored):
    from semidyn_rag.evaluation.progressive import question_budget
    from semidyn_rag.evaluation.systems import FAMILIES, ContextItem, build_systems

    comp, _, feats, calls = stored
    fams = [f for f in FAMILIES if f.startswith("progressive")]
    systems, _ = build_systems(comp, fams, factors=[4, 8], budget_k=2)
    names = [s.name for s in systems]
    assert "progressive_flat_top2_x4" in names and "progressive_attention_b2x8" in names and len(names) == 10
    items = [ContextItem(t, f) for t, f in zip(CHUNKS, feats)]
    for s in systems:
        prep = s.prepare(comp, QUESTION, items)
        budget = question_budget(comp, items, 2, int(s.param))
        assert prep.extra["budget"] == budget and sum(prep.chunk_positions) == prep.extra["used"] <= budget
        assert len(prep.latents) == sum(r[1] not in (0, 1) for r in prep.extra["reads"])
        if "flat_top" in s.name:
            assert prep.factors == [int(s.param)] * 2 and prep.extra["used"] == budget
        assert (prep.extra["scan_positions"] > 0) == any(x in s.name for x in ("attention", "likelihood"))
    assert calls == []


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, ckpt):
    from semidyn_rag.cli import main

    root = tmp_path_factory.mktemp("progressive")
    docs = root / "docs"
    docs.mkdir()
    for i, text in enumerate(CHUNKS):
        (docs / f"doc{i}.txt").write_text(text)
    assert main(["precompress", str(docs), "--out", str(root / "corpus"), "--compressor", str(ckpt),
                 "--chunk-tokens", "64", "--no-progress"]) == 0
    return root / "corpus"


def test_query_progressive_reads_within_the_budget(corpus_dir, capsys):
    from semidyn_rag.cli import main

    args = ["query", str(corpus_dir), QUESTION, "--progressive", "--max-latents", "20", "--max-new-tokens", "4"]
    assert main([*args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    p = res["progressive"]
    assert len(res["sources"]) == len(CHUNKS)  # -k defaults to 20 in progressive mode: every chunk here
    assert p["used"] <= 20 and (p["store_hits"], p["encoded"]) == (len(CHUNKS), 0)
    assert sum(s["positions"] for s in res["sources"]) == p["used"]
    assert any(s["expanded"] for s in res["sources"]) and all(s["reason"] for s in res["sources"])
    assert main([*args, "--signal", "attention", "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "Progressive (attention)" in text and "scanned at" in text
    assert main(["query", str(corpus_dir), QUESTION, "--progressive"]) == 2
    assert "needs --max-latents" in capsys.readouterr().err
    assert main(["query", str(corpus_dir), QUESTION, "--max-latents", "9"]) == 2
    assert main(["query", str(corpus_dir), QUESTION, "--progressive", "--max-latents", "9", "--factor", "4"]) == 2


def test_llama_index_progressive_nodes_and_usage(stored, monkeypatch):
    pytest.importorskip("llama_index.postprocessor.semidyn_rag")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.llms.semidyn_rag import SemiDynamicLLM
    from llama_index.postprocessor.semidyn_rag import SemiDynamicCompressPostprocessor

    comp, store, feats, calls = stored
    session = CompressionSession(comp, store)
    pp = SemiDynamicCompressPostprocessor(session=session, progressive=True, max_latents=10, max_expand=1)
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"source": i}), score=1.0 - i / 10)
             for i, t in enumerate(CHUNKS)]
    kept = pp.postprocess_nodes(nodes, QueryBundle(QUESTION))
    assert calls == [] and 0 < len(kept) < len(nodes)  # the budget holds only some chunks
    assert sum(n.node.metadata["semidyn_positions"] for n in kept) <= 10
    top = kept[0].node
    assert top.node_id == "n0" and top.metadata["semidyn_expanded"] and top.metadata["source"] == 0
    assert "semidyn_reason" in top.excluded_llm_metadata_keys
    assert nodes[0].node.metadata == {"source": 0}  # the caller's node is untouched
    seen = _capture_generate(comp, monkeypatch)
    llm = SemiDynamicLLM(session=session, max_new_tokens=2)
    prompt = "Context:\n" + "\n".join(n.node.get_content() for n in kept) + f"\n\nQuestion: {QUESTION}"
    llm.complete(prompt)
    usage = llm.last_usage
    assert [n["key"] for n in usage["progressive"]] == [c["key"] for c in usage["chunks"]][: len(kept)]
    assert usage["progressive"][0]["expanded"] and usage["latent_slots"] <= 10
    fine = session.registered(CHUNKS[0]).latents.to(seen["embeds"].dtype)
    assert _find(seen["embeds"][0], fine) and session.registered(CHUNKS[0]).factor == top.metadata["semidyn_factor"]
    with pytest.raises(ValueError, match="max_latents"):
        SemiDynamicCompressPostprocessor(session=session, progressive=True).postprocess_nodes(nodes, QueryBundle("q"))


def test_budget_report_counts_gold_reads_and_paired_wins(tmp_path):
    from semidyn_rag.evaluation.progressive_report import budget_report, markdown, plot

    def line(system, qid, correct, reads, scan=0):
        return json.dumps({"system": system, "sample_id": qid, "prediction": "", "answers": ["a"], "correct": correct,
                           "exact_match": 0.0, "f1": float(correct), "prefill_tokens": 50, "prefill_s": 0.1,
                           "ttft_s": 0.2, "extra": {"budget": 40, "used": 38, "scan_positions": scan, "scan_s": 0.0,
                                                    "signal": "x", "reads": reads}})

    flat = [[0, 4, 0], [1, 4, 0]]
    prog = [[0, 1, 1], [1, 16, 0], [2, 0, 0], [3, 16, 0]]
    rows = [line("progressive_flat_top2_x4", "q1", False, flat), line("progressive_flat_top2_x4", "q2", True, flat),
            line("progressive_attention_b2x4", "q1", True, prog, scan=70),
            line("progressive_attention_b2x4", "q2", True, prog, scan=70)]
    (tmp_path / "samples.jsonl").write_text("\n".join(rows) + "\n")
    flags = {"q1": [False, False, False, True], "q2": [True, False, False, False]}  # q1's gold is read coarse
    rep = budget_report(tmp_path, flags)
    by = {s["system"]: s for s in rep["systems"]}
    att, top = by["progressive_attention_b2x4"], by["progressive_flat_top2_x4"]
    assert (att["kind"], att["budget_factor"], top["kind"]) == ("attention", 4, "flat_top")
    assert att["gold_recall_read"] == 1.0 and att["gold_recall_expanded"] == 0.5 and top["gold_recall_read"] == 0.5
    assert att["chunks_read"] == 3 and att["chunks_expanded"] == 1 and att["chunks_as_text"] == 1
    assert att["prefill_positions"] == 120 and att["vs_flat_top"]["wins"] == 1 and att["vs_flat_top"]["losses"] == 0
    assert "| attention | 100.0% |" in markdown(rep)
    plot(rep, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
