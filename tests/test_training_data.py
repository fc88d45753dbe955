"""Batching for training: the held-out split, sharded order, collation, dynamic pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semidyn_rag.pipeline.encoder import EncoderOutput
from semidyn_rag.pipeline.placeholder import IGNORE_INDEX
from semidyn_rag.pipeline.pooling import LastTokens, MeanPooling
from semidyn_rag.training import TrainingRecord
from semidyn_rag.training.data import BatchOrder, Example, collate, fill_contexts, split_by_context
from semidyn_rag.training.dynamic import fully_dynamic_compress
from semidyn_rag.training.objective import _answer_logits


def test_split_by_context_never_shares_a_context():
    ctxs = [f"context number {i}" for i in range(60)]
    recs = [TrainingRecord(context=c, question="q", answer="a") for c in ctxs for _ in range(2)]
    recs += [TrainingRecord(context=[ctxs[i], ctxs[i + 1]], task="multi_doc_qa", question="q", answer="a")
             for i in range(0, 58, 2)]
    train, held, dropped = split_by_context(recs, 0.3, seed=1)
    assert held and train and len(train) + len(held) + dropped == len(recs)
    seen_train = {c for i in train for c in recs[i].contexts}
    seen_held = {c for i in held for c in recs[i].contexts}
    assert not seen_train & seen_held
    assert split_by_context(recs, 0.3, seed=1) == (train, held, dropped)  # deterministic


def test_batch_order_shards_cover_each_epoch_once():
    n, bs, world = 10, 2, 2
    orders = [BatchOrder(n, bs, seed=3, rank=r, world=world) for r in range(world)]
    assert orders[0].per_epoch == 3  # ceil(10 / 4) global batches, the last one wrapped around
    for epoch in range(2):
        seen = []
        for mb in range(epoch * 3, epoch * 3 + 3):
            parts = [o.batch(mb) for o in orders]
            assert all(e == epoch for e, _ in parts) and all(len(b) == bs for _, b in parts)
            seen += [i for _, b in parts for i in b]
        assert set(seen) == set(range(n)) and len(seen) == 12
    assert orders[0].batch(1) == BatchOrder(n, bs, seed=3, rank=0, world=world).batch(1)
    assert orders[0].batch(0) != BatchOrder(n, bs, seed=4, rank=0, world=world).batch(0)


def _example(where, n_ctx=1):
    return Example(where, [[1, 2, 3]] * n_ctx, [2.5] + [None] * (n_ctx - 1), [7, 99, 8] if n_ctx == 1 else
                   [7, 99, 99, 8], [40, 41, 0], recon_prompt_ids=[7, 99], recon_answer_ids=[50, 51, 52])


def test_collate_masks_prompt_and_missing_labels():
    b = collate([_example("a"), _example("b", 2)], sizes=[4, 8])
    assert b.n_contexts == [1, 2] and b.sizes == [4, 8, 8]
    assert b.y.tolist() == [2.5, 2.5, 0.0] and b.y_mask.tolist() == [1.0, 1.0, 0.0]
    assert b.input_ids[0] == [7, 99, 8, 40, 41, 0]
    assert b.labels[0] == [IGNORE_INDEX] * 3 + [40, 41, 0]
    r = collate([_example("a"), _example("b", 2)], sizes=None, recon=[False, True])
    assert r.n_contexts == [1, 1] and r.sizes is None and r.n_reconstruction == 1
    assert r.input_ids[1] == [7, 99, 50, 51, 52] and r.labels[1] == [IGNORE_INDEX] * 2 + [50, 51, 52]
    with pytest.raises(ValueError, match="no teacher prompt"):
        collate([_example("a")], None, distill=True)


def test_fill_contexts():
    assert fill_contexts("A <p> B <p> C", "<p>", ["x", "y"]) == "A x B y C"
    with pytest.raises(ValueError):
        fill_contexts("A <p>", "<p>", ["x", "y"])


@pytest.mark.parametrize("end_marker", [False, True])
def test_dynamic_windows_match_the_discrete_pooling(end_marker):
    torch.manual_seed(0)
    hidden = torch.randn(3, 30, 8)
    n = torch.tensor([27, 10, 5])
    enc = EncoderOutput(hidden, 1, n, hidden[:, 0], None)
    mp = MeanPooling((2, 4, 8), pool_end_marker=end_marker)
    feats = mp.extract(enc)
    for f in (2, 4, 8):
        want = mp.derive([x for x, _ in feats], [c for _, c in feats], [f] * 3)
        got = mp.pool_dynamic(enc, [f] * 3)
        for w, g in zip(want, got):
            assert torch.allclose(w, g, atol=1e-6)
    # any window, per row: a window of 3 over 10 tokens (+ the end marker) is 4 means
    got = mp.pool_dynamic(enc, [5, 3, 7])
    assert [g.shape[0] for g in got] == [-(-(27 + end_marker) // 5), 4, 1]
    last = hidden[1, 10:11 + end_marker].mean(0)
    assert torch.allclose(got[1][3], last)
    assert torch.allclose(got[1][0], hidden[1, 1:4].mean(0))
    with pytest.raises(ValueError):
        mp.pool_dynamic(enc, [0, 1, 1])


def test_dynamic_sizes_are_continuous_and_clamped():
    y = torch.tensor([0.0, 1.58, 2.3, 9.0])
    assert MeanPooling((2, 4, 8, 16, 32)).dynamic_sizes(y, torch.tensor([5, 5, 5, 5])) == [2, 3, 5, 32]
    assert LastTokens((16, 64)).dynamic_sizes(torch.tensor([1.0, 3.0]), torch.tensor([20, 1000])) == [10, 64]


def test_answer_logits_equal_the_full_computation(make_compressor):
    comp = make_compressor()
    model = comp.decoder.model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX] * 4 + [9, 10, 11], [IGNORE_INDEX] * 3 + [8, 9, IGNORE_INDEX, IGNORE_INDEX]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
    with torch.no_grad():
        logits, targets = _answer_logits(model, labels, input_ids=ids, attention_mask=mask)
        full = model(input_ids=ids, attention_mask=mask).logits
    want = F.cross_entropy(full[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    got = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert logits.shape[1] < full.shape[1] - 1  # the prompt was not projected to the vocabulary
    assert torch.allclose(want, got, atol=1e-6)


def test_fully_dynamic_inference_matches_the_discrete_path_at_a_candidate(make_compressor):
    comp = make_compressor(factors=(2, 4, 8))
    texts = ["The Eiffel Tower is in Paris, the capital of France.", "Mount Everest is the highest mountain."]
    feats = comp.encode(texts)
    # a scale that puts 2^(y_hat + scale) exactly on 4 makes the continuous size a candidate
    for text, f in zip(texts, feats):
        (dyn,) = fully_dynamic_compress(comp, [text], scale=2.0 - f.y_hat)
        (ref,) = comp.compress([text], factor=4)
        assert dyn.factor == 4 and torch.allclose(dyn.latents, ref.latents, atol=1e-5)
    # off the candidate set: a window of 3 gives ceil(n / 3) latents, and generate reads them
    (dyn,) = fully_dynamic_compress(comp, texts[:1], scale=1.585 - feats[0].y_hat)
    assert dyn.factor == 3 and dyn.n_latents == -(-(feats[0].n_tokens + 1) // 3)  # the end marker is pooled
    assert isinstance(comp.generate("Where?", dyn, max_new_tokens=2), str)
