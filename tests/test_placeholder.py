import pytest
import torch
from torch import nn

from semidyn_rag import PlaceholderCountError
from semidyn_rag.pipeline.placeholder import IGNORE_INDEX, expand_placeholders

PH = 99


@pytest.fixture
def emb():
    torch.manual_seed(0)
    return nn.Embedding(100, 6)


def test_embeddings_are_latents_at_latent_positions_and_tokens_elsewhere(emb):
    lat_a, lat_b, lat_c = torch.randn(3, 6), torch.randn(1, 6), torch.randn(2, 6)
    ids = [[5, PH, 7, PH, 8], [1, 2, PH]]
    out = expand_placeholders(ids, [[lat_a, lat_b], [lat_c]], PH, emb, padding_side="left")
    # row 0: 5, a0 a1 a2, 7, b0, 8 -> 7 positions; row 1: 1 2 c0 c1 -> 4 positions, left-padded by 3
    assert out.inputs_embeds.shape == (2, 7, 6)
    e = out.inputs_embeds
    torch.testing.assert_close(e[0, 0], emb.weight[5])
    torch.testing.assert_close(e[0, 1:4], lat_a)
    torch.testing.assert_close(e[0, 4], emb.weight[7])
    torch.testing.assert_close(e[0, 5:6], lat_b)
    torch.testing.assert_close(e[0, 6], emb.weight[8])
    assert out.attention_mask.tolist() == [[1] * 7, [0, 0, 0, 1, 1, 1, 1]]
    torch.testing.assert_close(e[1, 3], emb.weight[1])
    torch.testing.assert_close(e[1, 5:7], lat_c)
    assert out.latent_mask[0].tolist() == [False, True, True, True, False, True, False]


def test_right_padding_and_labels(emb):
    lat = torch.randn(2, 6)
    ids = [[5, PH, 7, 8], [3]]
    labels = [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [3]]
    out = expand_placeholders(ids, [[lat], []], PH, emb, labels=labels, padding_side="right")
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert out.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8],
                                   [3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_gradients_flow_into_latents(emb):
    lat = torch.randn(2, 6, requires_grad=True)
    out = expand_placeholders([[1, PH]], [[lat]], PH, emb)
    out.inputs_embeds.sum().backward()
    assert lat.grad is not None and torch.equal(lat.grad, torch.ones_like(lat))


def test_placeholder_outside_vocabulary_is_never_looked_up(emb):
    out = expand_placeholders([[1, 1000]], [[torch.zeros(1, 6)]], 1000, emb)
    assert out.inputs_embeds.shape == (1, 2, 6)


def test_wrong_number_of_placeholders(emb):
    with pytest.raises(PlaceholderCountError, match="prompt 0 has 1 placeholder"):
        expand_placeholders([[1, PH]], [[torch.zeros(1, 6), torch.zeros(1, 6)]], PH, emb)
