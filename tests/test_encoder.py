import pytest
import torch

from semidyn_rag import ContextTooLongError
from tests.conftest import TEXTS


def _hidden(comp, ids):
    with torch.no_grad():
        return comp.encoder(ids).hidden


def test_bidirectional_first_token_sees_later_tokens(compressor):
    ids = compressor.encoder.tokenize([TEXTS[1]])[0]
    changed = list(ids)
    changed[-2] = (changed[-2] + 7) % 300 + 5
    h1, h2 = _hidden(compressor, [ids]), _hidden(compressor, [changed])
    assert not torch.allclose(h1[0, 0], h2[0, 0], atol=1e-6)


def test_causal_first_token_does_not_see_later_tokens(make_compressor):
    comp = make_compressor(bidirectional=False)
    ids = comp.encoder.tokenize([TEXTS[1]])[0]
    changed = list(ids)
    changed[-2] = (changed[-2] + 7) % 300 + 5
    h1, h2 = _hidden(comp, [ids]), _hidden(comp, [changed])
    torch.testing.assert_close(h1[0, :-3], h2[0, :-3])
    assert not torch.allclose(h1[0, -1], h2[0, -1], atol=1e-6)


def test_padding_changes_nothing(compressor):
    short, long = compressor.encoder.tokenize([TEXTS[0], TEXTS[3]])
    alone = _hidden(compressor, [short])
    batched = _hidden(compressor, [short, long])
    n = len(short) + 1
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)
    # change what sits in the padded positions: real positions stay identical
    comp = compressor.encoder
    pad_before = comp.pad_id
    comp.pad_id = 17
    try:
        repadded = _hidden(compressor, [short, long])
    finally:
        comp.pad_id = pad_before
    torch.testing.assert_close(repadded[0, :n], batched[0, :n], atol=1e-6, rtol=1e-6)


def test_eos_is_appended_and_read(compressor):
    ids = compressor.encoder.tokenize([TEXTS[0]])
    with torch.no_grad():
        out = compressor.encoder(ids)
    assert out.hidden.shape[1] == len(ids[0]) + 1
    torch.testing.assert_close(out.eos_state[0], out.hidden[0, len(ids[0])])


@pytest.mark.parametrize("bad", ["", "   \n\t "])
def test_empty_text_is_rejected(compressor, bad):
    with pytest.raises(ValueError, match="context 1 is empty"):
        compressor.compress(["fine text", bad])


def test_overlong_text_errors_or_truncates(make_compressor, caplog):
    comp = make_compressor(max_context_tokens=8)
    with pytest.raises(ContextTooLongError, match="over the encoder limit of 8"):
        comp.compress([TEXTS[1]])
    comp = make_compressor(max_context_tokens=8, on_overflow="truncate")
    with caplog.at_level("WARNING"):
        (cc,) = comp.compress([TEXTS[1]])
    assert cc.n_tokens == 8
    assert "truncated" in caplog.text


def test_non_string_is_rejected(compressor):
    with pytest.raises(TypeError, match="context 0 is bytes"):
        compressor.compress([b"bytes"])
