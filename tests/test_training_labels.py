"""Density labels y = log2(L_ctx / L_summary), eos counted in L_ctx, against hand counts."""

from __future__ import annotations

import math

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from semidyn_rag.training import DensityLabeler, TrainingRecord, density_label


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per whitespace-separated word, so counts can be done by hand."""
    words = "the cat sat on mat a dog ran far away and back again very fast".split()
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_density_label_formula():
    assert density_label(16, 2) == 3.0
    assert density_label(8, 8) == 0.0
    with pytest.raises(ValueError):
        density_label(0, 3)
    with pytest.raises(ValueError):
        density_label(5, 0)


def test_labels_match_hand_counts(word_tokenizer):
    lab = DensityLabeler(word_tokenizer)
    # 15 words + eos = 16 context tokens; a 2-word summary: log2(16/2) = 3
    ctx = "the cat sat on the mat and a dog ran far away and back again"
    assert len(ctx.split()) == 15
    rec = TrainingRecord(context=ctx, question="q", answer="a", concise_summary="cat dog")
    assert lab.labels(rec) == [3.0]
    # 7 words + eos = 8 tokens; a 1-word summary: 3; no summary: None (masked), never 0
    multi = TrainingRecord(context=["the cat sat on the mat again", "a dog ran"], task="multi_doc_qa",
                           question="q", answer="a", concise_summary=["cat", None])
    assert lab.labels(multi) == [3.0, None]
    # without eos counted the label would differ: log2(15/2)
    assert DensityLabeler(word_tokenizer, count_eos=False).labels(rec) == [math.log2(15 / 2)]


def test_labels_use_the_lengths_the_encoder_reads(word_tokenizer):
    lab = DensityLabeler(word_tokenizer)
    rec = TrainingRecord(context="the cat sat on the mat", question="q", answer="a", concise_summary="cat")
    # a truncated context: 3 tokens read + eos = 4, summary 1 -> 2
    assert lab.labels(rec, [3]) == [2.0]


def test_proxy_fraction_gives_a_label(word_tokenizer):
    lab = DensityLabeler(word_tokenizer)
    rec = TrainingRecord(context="the cat sat on the mat and a dog ran far away and back again",
                         question="q", answer="a", pseudo_summary_fraction=0.25)
    assert lab.labels(rec) == [pytest.approx(2.0)]  # L_sum = 0.25 * 16 = 4 -> log2(16 / 4)
    # a fraction below one token clamps the pseudo summary to one token
    tiny = rec.model_copy(update={"pseudo_summary_fraction": 0.001})
    assert lab.labels(tiny) == [pytest.approx(4.0)]
    # a teacher summary wins over the proxy
    both = rec.model_copy(update={"concise_summary": "cat dog"})
    assert lab.labels(both) == [3.0]
