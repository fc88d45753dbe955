import math

import pytest
import torch
import torch.nn.functional as F

from semidyn_rag.pipeline.encoder import EncoderOutput
from semidyn_rag.pipeline.pooling import MeanPooling
from tests.conftest import TEXTS


def _naive_mean(hidden_row, start, n, s):
    """Start-aligned windows of s rows from ``start``, the last one partial, true means."""
    return torch.stack([hidden_row[start + i : start + min(i + s, n)].mean(0) for i in range(0, n, s)])


def _naive_end_aligned(hidden_row, start, n, s):
    """The authors' static rule: left zero padding to a multiple of s, every window divided by s."""
    rows = hidden_row[start : start + n]
    pad = (-n) % s
    padded = F.pad(rows, (0, 0, pad, 0))
    return padded.reshape(-1, s, rows.shape[-1]).sum(1) / s


def _enc(hidden, start, n):
    return EncoderOutput(hidden=hidden, text_start=start, n_tokens=n, eos_state=hidden[:, 0], extra_start=None)


@pytest.mark.parametrize("end_marker", [False, True])
@pytest.mark.parametrize("align", ["start", "end"])
@pytest.mark.parametrize("factor", [2, 4, 8, 16])
def test_derived_windows_equal_the_rule_computed_directly(factor, align, end_marker):
    torch.manual_seed(0)
    n = torch.tensor([5, 17, 1, 12])
    hidden = torch.randn(4, 20, 8)
    pool = MeanPooling((2, 4, 8, 16), pool_end_marker=end_marker, pool_align=align)
    extracted = pool.extract(_enc(hidden, 1, n))
    derived = pool.derive([f for f, _ in extracted], [c for _, c in extracted], [factor] * 4)
    direct = pool.pool_dynamic(_enc(hidden, 1, n), [factor] * 4)
    naive = _naive_mean if align == "start" else _naive_end_aligned
    for b in range(4):
        length = int(n[b]) + end_marker  # the end marker sits right after the text
        expected = naive(hidden[b], 1, length, factor)
        assert derived[b].shape == (math.ceil(length / factor), 8) == (pool.n_latents(int(n[b]), factor), 8)
        torch.testing.assert_close(derived[b], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(direct[b], expected, atol=1e-6, rtol=1e-5)


def test_end_aligned_rows_of_tokens():
    torch.manual_seed(3)
    table = torch.randn(10, 4)
    pool = MeanPooling((2, 4), pool_end_marker=True, pool_align="end")
    got = pool.pool_ids([1, 2, 3, 4, 5], 9, table, 4)  # 6 pooled rows: 2 zeros of padding + 6
    want = torch.stack([(table[1] + table[2]) / 4, table[[3, 4, 5, 9]].sum(0) / 4])
    torch.testing.assert_close(got, want)


def test_mixed_factors_in_one_call():
    torch.manual_seed(1)
    n = torch.tensor([9, 30])
    hidden = torch.randn(2, 31, 4)
    pool = MeanPooling((2, 4, 8), pool_end_marker=False)
    ex = pool.extract(_enc(hidden, 0, n))
    out = pool.derive([f for f, _ in ex], [c for _, c in ex], [8, 2])
    torch.testing.assert_close(out[0], _naive_mean(hidden[0], 0, 9, 8), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1], _naive_mean(hidden[1], 0, 30, 2), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        pool.derive([ex[0][0]], [ex[0][1]], [3])


def test_stage_rules_and_config_round_trip(tmp_path):
    pool = MeanPooling((2, 4, 8), pool_end_marker=True, pool_align="end")
    assert pool.takes == "factor" and pool.n_latents(7, 4) == 2 and pool.is_coarsest(8)
    assert pool.fingerprint_dict() == {"pool_end_marker": True, "pool_align": "end"}
    assert MeanPooling((2, 4), pool_end_marker=False).fingerprint_dict() == {}  # the legacy rule
    with pytest.raises(ValueError, match="takes factor="):
        pool.forced(None, 4)
    with pytest.raises(ValueError, match="multiple of the finest"):
        pool.check_size(3)
    pool.save(tmp_path / "pooling")
    import json

    saved = json.loads((tmp_path / "pooling" / "config.json").read_text())
    assert saved == {"kind": "mean_pool", "takes": "factor", "candidates": [2, 4, 8],
                     "pool_end_marker": True, "pool_align": "end"}
    assert not (tmp_path / "pooling" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="multiples of the smallest"):
        MeanPooling((2, 3))


@pytest.mark.parametrize("end_marker", [True, False])
def test_compressor_pooling_matches_hidden_states(make_compressor, end_marker):
    compressor = make_compressor(pool_end_marker=end_marker)
    ids = compressor.encoder.tokenize([TEXTS[1]])
    with torch.no_grad():
        hidden = compressor.encoder(ids).hidden[0]
    n = len(ids[0])
    (cc,) = compressor.compress([TEXTS[1]], factor=4)
    with torch.no_grad():  # the default rule pools the appended end marker too (the authors' eval)
        expected = compressor.projector(_naive_mean(hidden, 0, n + end_marker, 4))
    assert cc.n_latents == math.ceil((n + end_marker) / 4) and cc.factor == 4 and cc.n_tokens == n
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
