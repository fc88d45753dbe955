import math

import pytest
import torch

from semidyn_rag.backbones import MeanPooling
from semidyn_rag.encoder import EncoderOutput
from tests.conftest import TEXTS


def _naive_mean(hidden_row, start, n, s):
    return torch.stack([hidden_row[start + i : start + min(i + s, n)].mean(0) for i in range(0, n, s)])


@pytest.mark.parametrize("factor", [2, 4, 8, 16])
def test_mean_pooling_equals_naive_window_mean(factor):
    torch.manual_seed(0)
    n = torch.tensor([5, 17, 1, 12])
    hidden = torch.randn(4, 20, 8)
    enc = EncoderOutput(hidden=hidden, text_start=1, n_tokens=n, eos_state=hidden[:, 0], extra_start=None)
    pool = MeanPooling((2, 4, 8, 16))
    extracted = pool.extract(enc)
    derived = pool.derive([f for f, _ in extracted], [c for _, c in extracted], [factor] * 4)
    for b in range(4):
        expected = _naive_mean(hidden[b], 1, int(n[b]), factor)
        assert derived[b].shape == (math.ceil(int(n[b]) / factor), 8)
        torch.testing.assert_close(derived[b], expected, atol=1e-6, rtol=1e-5)


def test_mixed_factors_in_one_call():
    torch.manual_seed(1)
    n = torch.tensor([9, 30])
    hidden = torch.randn(2, 31, 4)
    enc = EncoderOutput(hidden=hidden, text_start=0, n_tokens=n, eos_state=hidden[:, 0], extra_start=None)
    pool = MeanPooling((2, 4, 8))
    ex = pool.extract(enc)
    out = pool.derive([f for f, _ in ex], [c for _, c in ex], [8, 2])
    torch.testing.assert_close(out[0], _naive_mean(hidden[0], 0, 9, 8), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1], _naive_mean(hidden[1], 0, 30, 2), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        pool.derive([ex[0][0]], [ex[0][1]], [3])


def test_compressor_pooling_matches_hidden_states(compressor):
    ids = compressor.encoder.tokenize([TEXTS[1]])
    with torch.no_grad():
        hidden = compressor.encoder(ids).hidden[0]
    n = len(ids[0])
    (cc,) = compressor.compress([TEXTS[1]], factor=4)
    with torch.no_grad():
        expected = compressor.projector(_naive_mean(hidden, 0, n, 4))
    assert cc.n_latents == math.ceil(n / 4) and cc.factor == 4 and cc.n_tokens == n
    torch.testing.assert_close(cc.latents, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["mean_pool", "last_tokens", "compression_tokens"])
def test_batched_compress_equals_one_by_one(make_compressor, backbone):
    overrides = {"backbone": backbone}
    if backbone != "mean_pool":
        overrides["lengths"] = (2, 4, 8)
    comp = make_compressor(**overrides)
    batched = comp.compress(TEXTS, batch_size=4)
    for text, b in zip(TEXTS, batched):
        (single,) = comp.compress([text])
        assert single.n_latents == b.n_latents and single.factor == b.factor
        torch.testing.assert_close(single.latents, b.latents, atol=1e-5, rtol=1e-4)
        assert single.y_hat == pytest.approx(b.y_hat, abs=1e-5)


def test_token_backbones_sizes(make_compressor):
    lt = make_compressor(backbone="last_tokens", lengths=(4, 8))
    (a,) = lt.compress([TEXTS[1]], length=4)
    assert a.n_latents == 4 and a.factor is None
    (short,) = lt.compress(["Paris"], length=8)  # fewer tokens than asked: all of them + eos
    assert short.n_latents == short.n_tokens + 1
    ct = make_compressor(backbone="compression_tokens", lengths=(4, 8))
    (b,) = ct.compress([TEXTS[0]], length=8)
    (c,) = ct.compress([TEXTS[0]], length=4)
    assert b.n_latents == 8 and c.n_latents == 4
    # causal encoder: the first 4 memory states do not depend on the later 4
    torch.testing.assert_close(b.latents[:4], c.latents, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="takes length="):
        ct.compress([TEXTS[0]], factor=4)


def test_compression_tokens_need_causal_encoder(make_compressor):
    with pytest.raises(ValueError, match="causal encoder"):
        make_compressor(backbone="compression_tokens", bidirectional=True)


def test_semi_dynamic_selection_uses_head_and_scale(compressor):
    with torch.no_grad():
        compressor.density_head.bias.fill_(2.0)  # y_hat = 2 -> factor 4
    (a,) = compressor.compress([TEXTS[1]])
    (b,) = compressor.compress([TEXTS[1]], scale=1.0)
    (c,) = compressor.compress([TEXTS[1]], scale=-1.0)
    assert (a.factor, b.factor, c.factor) == (4, 8, 2)
    assert a.y_hat == pytest.approx(2.0)
    assert a.ratio == a.n_tokens / a.n_latents
