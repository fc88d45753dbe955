"""Hidden-state alignment: window membership, teacher-to-encoder token maps, the loss, and training with it."""

from __future__ import annotations

import json

import pytest
import torch

from semidyn_rag.pipeline.pooling import LastTokens, MeanPooling
from semidyn_rag.testing import build_tokenizer
from semidyn_rag.training import TrainConfig, write_records
from semidyn_rag.training.align import (
    alignment_sums,
    resolve_layers,
    row_distance,
    shared_suffix,
    teacher_alignment,
)
from semidyn_rag.training.data import collate, fill_contexts, load_examples
from semidyn_rag.training.trainer import Trainer, train

from .test_training_trainer import make_config, make_records

CONTEXTS = ["The Eiffel Tower is in Paris, the capital of France.",
            "Mount Everest is the highest mountain above sea level, in the Himalayas."]


# -- window membership (the pooling stage) ---------------------------------------------------------

@pytest.mark.parametrize("align", ["start", "end"])
@pytest.mark.parametrize("end_marker", [True, False])
def test_window_index_is_the_pooling_rule(align, end_marker):
    pool = MeanPooling((2, 4, 8), pool_end_marker=end_marker, pool_align=align)
    table = torch.randn(40, 5, dtype=torch.float64)
    for n in (1, 3, 7, 8, 13):
        for size in (2, 4, 8, 3):
            win = pool.window_index(n, size)
            assert win.shape == (n + end_marker,)
            assert int(win.max()) + 1 == pool.n_latents(n, size)
            assert bool((win[1:] >= win[:-1]).all()) and int(win[0]) == 0
            rows = pool.pool_ids(list(range(n)), 39, table, size)  # the stage's own pooling of these ids
            ids = torch.tensor(list(range(n)) + [39] * end_marker)
            sums = torch.zeros(rows.shape, dtype=torch.float64).index_add_(0, win, table[ids])
            counts = torch.bincount(win, minlength=rows.shape[0]).double()
            expect = sums / (size if align == "end" else counts[:, None])
            torch.testing.assert_close(rows, expect)
    with pytest.raises(ValueError, match="positive"):
        pool.window_index(5, 0)
    with pytest.raises(TypeError, match="windows"):
        LastTokens((4, 8)).window_index(5, 4)


# -- the teacher's tokens mapped onto encoder positions ---------------------------------------------

def test_teacher_map_with_one_tokenizer_maps_each_token_to_itself(compressor):
    dec, enc = compressor.decoder, compressor.encoder
    prompt = dec.render("Where is the tower?", 2)
    ctx_ids = enc.tokenize(CONTEXTS)
    ids, maps = teacher_alignment(dec.tokenizer, enc.tokenizer, prompt, dec.placeholder, CONTEXTS, ctx_ids)
    assert ids == dec.encode_prompts([fill_contexts(prompt, dec.placeholder, CONTEXTS)])[0]
    for m, c in zip(maps, ctx_ids):
        enc_pos = [e for _, e in m]
        assert enc_pos == sorted(enc_pos) and len(m) >= len(c) - 1
        same = sum(ids[t] == c[e] for t, e in m)
        assert same >= len(c) - 1  # only the first token may merge with the text before it
        assert set(range(1, len(c))) <= set(enc_pos)
    assert max(t for t, _ in maps[0]) < min(t for t, _ in maps[1])  # contexts in prompt order


def test_teacher_map_across_different_tokenizers_follows_characters(compressor):
    dec = compressor.decoder
    other = build_tokenizer(vocab_size=300)  # fewer merges: a finer, different tokenization
    ctx_ids = other(CONTEXTS, add_special_tokens=False)["input_ids"]
    assert ctx_ids[0] != dec.encode_prompts(CONTEXTS[:1])[0]
    prompt = dec.render("Where?", 2)
    ids, maps = teacher_alignment(dec.tokenizer, other, prompt, dec.placeholder, CONTEXTS, ctx_ids)
    full = fill_contexts(prompt, dec.placeholder, CONTEXTS)
    t_off = dec.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for k, (m, ctx) in enumerate(zip(maps, CONTEXTS)):
        start = full.index(ctx)
        e_off = other(ctx, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for t, e in m:
            last = t_off[t][1] - 1 - start  # the teacher token's last character, in the context
            assert e_off[e][0] <= last < e_off[e][1] or (e + 1 < len(e_off) and last < e_off[e + 1][0])
        assert "".join(full[t_off[t][0] : t_off[t][1]] for t, _ in m).strip() == ctx


def test_teacher_map_stops_at_a_truncated_context(compressor):
    dec, enc = compressor.decoder, compressor.encoder
    full_ids = enc.tokenize(CONTEXTS[:1])[0]
    _, (m,) = teacher_alignment(dec.tokenizer, enc.tokenizer, dec.render("Q?", 1), dec.placeholder,
                                CONTEXTS[:1], [full_ids[:5]])
    assert {e for _, e in m} <= set(range(5)) and len(m) <= 5


def test_slow_tokenizers_and_bad_prompts_are_refused(compressor):
    dec, enc = compressor.decoder, compressor.encoder

    class Slow:
        is_fast = False

    ids = enc.tokenize(CONTEXTS[:1])
    with pytest.raises(ValueError, match="fast encoder tokenizer"):
        teacher_alignment(dec.tokenizer, Slow(), dec.render("Q?", 1), dec.placeholder, CONTEXTS[:1], ids)
    with pytest.raises(ValueError, match="placeholders for 2 contexts"):
        teacher_alignment(dec.tokenizer, enc.tokenizer, dec.render("Q?", 1), dec.placeholder, CONTEXTS, ids * 2)


# -- the loss ------------------------------------------------------------------------------------

def _case(n_layers=2, d=6):
    """One sample: a 6-token context at size 2 with the end marker pooled (windows 0,0,1,1,2,2,3).

    Teacher: 10 positions, context tokens at 2..7, shared suffix at 7..9. Student: 8 positions,
    latents at 1..4 (row 4 = the end-marker-only window), shared suffix at 5..7. The student's
    states equal the targets exactly.
    """
    torch.manual_seed(0)
    teacher = [torch.randn(1, 10, d) for _ in range(n_layers)]
    student = [torch.randn(1, 8, d) for _ in range(n_layers)]
    win = MeanPooling((2, 4), pool_end_marker=True).window_index(6, 2)
    assert win.tolist() == [0, 0, 1, 1, 2, 2, 3]
    pairs = [(2 + i, i) for i in range(6)]
    for t, s in zip(teacher, student):
        for w in range(3):
            s[0, 1 + w] = t[0, [2 + 2 * w, 3 + 2 * w]].mean(0)
        s[0, 5:8] = t[0, 7:10]
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 1:5] = True
    kw = dict(latent_mask=mask, student_lengths=torch.tensor([8]), teacher_lengths=torch.tensor([10]),
              n_latents=[4], n_contexts=[1], windows=[win], maps=[pairs], suffix=[3])
    return student, teacher, kw


@pytest.mark.parametrize("metric", ["nmse", "cosine"])
def test_loss_is_zero_when_the_student_matches_and_counts_rows(metric):
    student, teacher, kw = _case()
    out = alignment_sums(student, teacher, metric=metric, **kw)
    assert float(out.loss_sum) == pytest.approx(0.0, abs=1e-5)
    assert (out.n_latent_rows, out.n_token_rows) == (3, 3)  # the end-marker-only window has no target
    student[0][0, 4] += 100.0  # that window's row: not aligned
    assert float(alignment_sums(student, teacher, metric=metric, **kw).loss_sum) == pytest.approx(0.0, abs=1e-5)


def test_loss_measures_each_row_per_layer():
    student, teacher, kw = _case()
    target = student[0][0, 2].clone()
    student[0][0, 2] = target + torch.ones_like(target)  # latent row of window 1, layer 0 only
    out = alignment_sums(student, teacher, metric="nmse", **kw)
    expect = float(((student[0][0, 2] - target) ** 2).sum() / (target**2).sum()) / 2  # mean over 2 layers
    assert float(out.loss_sum) == pytest.approx(expect, rel=1e-5)
    student, teacher, kw = _case()
    student[1][0, 6] *= 3.0  # a question/answer token: scale changes nmse, not cosine
    assert float(alignment_sums(student, teacher, metric="cosine", **kw).loss_sum) == pytest.approx(0.0, abs=1e-5)
    assert float(alignment_sums(student, teacher, metric="nmse", **kw).loss_sum) == pytest.approx(4.0 / 2, rel=1e-4)
    with pytest.raises(ValueError, match="unknown alignment metric"):
        row_distance(student[0][0], teacher[0][0, :8], "l1")


def test_shared_suffix_stops_at_the_placeholder_and_layers_resolve():
    assert shared_suffix([1, 9, 5, 6, 7], [1, 2, 3, 5, 6, 7], stop_id=9) == 3
    assert shared_suffix([1, 9, 6, 7], [1, 9, 6, 7], stop_id=9) == 2
    assert resolve_layers(None, 3) == [1, 2, 3]
    assert resolve_layers([-1, 0, 2, 2], 3) == [0, 2, 3]
    with pytest.raises(ValueError, match="not a layer"):
        resolve_layers([4], 3)


# -- data and training ----------------------------------------------------------------------------

def test_batches_carry_one_map_per_context_for_answers_and_reconstruction(compressor, tmp_path):
    path = tmp_path / "train.jsonl"
    write_records(path, make_records())
    examples, _ = load_examples([str(path)], compressor, max_answer_tokens=16, reconstruction=True, distill=False,
                                recon_instruction="Repeat.", progress=False, align=True)
    multi = examples[-1]
    assert len(multi.teacher_map) == 2 and len(multi.recon_teacher_map) == 1
    batch = collate(examples[-3:], [2, 2, 2], recon=[True, False, False], distill=True)
    maps = batch.extra["teacher_maps"]
    assert len(maps) == len(batch.context_ids) == 4
    for m, ids in zip(maps, batch.context_ids):
        assert m and max(e for _, e in m) == len(ids) - 1
    no_maps, _ = load_examples([str(path)], compressor, max_answer_tokens=16, reconstruction=False, distill=True,
                               progress=False)
    assert collate(no_maps[:2], None, distill=True).extra == {}


def test_training_with_alignment_lowers_it_and_logs_it(tiny_dirs, tmp_path):
    path = tmp_path / "train.jsonl"
    write_records(path, make_records())
    cfg = make_config(tiny_dirs, path, tmp_path / "run",
                      objective={"hidden_align_weight": 1.0, "hidden_align_layers": [1, -1],
                                 "reconstruction_prob": 0.5},
                      optim={"max_steps": 24, "warmup_steps": 2, "lr": 3e-3}, eval_every=24,
                      data={"train": str(path), "eval_fraction": 0.25})
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in rows if r["split"] == "train"]
    first, last = sum(r["align"] for r in tr[:4]) / 4, sum(r["align"] for r in tr[-4:]) / 4
    print(f"align {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first
    assert all(r["align_rows"] > 0 for r in tr)
    ev = [r for r in rows if r["split"] == "eval"][-1]
    assert ev["align"] > 0 and ev["loss"] == pytest.approx(ev["lm"] + (ev["mse"] or 0.0) + ev["align"], rel=1e-6)


def test_alignment_config_errors(tiny_dirs, tmp_path):
    path = tmp_path / "train.jsonl"
    write_records(path, make_records(4))
    with pytest.raises(ValueError, match="windows of tokens"):
        make_config(tiny_dirs, path, tmp_path / "a", compressor={"backbone": "last_tokens"},
                    objective={"hidden_align_weight": 1.0})
    with pytest.raises(ValueError, match="LoRA or frozen"):
        make_config(tiny_dirs, path, tmp_path / "b", compressor={"decoder_training": "full"},
                    objective={"hidden_align_weight": 1.0})
    with pytest.raises(ValueError, match="not a layer of a 2-layer decoder"):
        Trainer(make_config(tiny_dirs, path, tmp_path / "c", objective={"hidden_align_weight": 1.0,
                                                                        "hidden_align_layers": [3]}))
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"data": {"train": str(path)}, "optim": {"max_steps": 1},
                                    "objective": {"hidden_align_metric": "l1"}})
