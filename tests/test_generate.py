import pytest
import torch

from semidyn_rag import PlaceholderCountError
from tests.conftest import TEXTS


def test_decoder_receives_latents_at_placeholder_positions(compressor):
    ctx = compressor.compress(TEXTS[:2], factor=4)
    dec = compressor.decoder
    prompt = dec.render("Where?", 2)
    assert prompt.count(dec.placeholder) == 2
    ids = dec.encode_prompts([prompt])
    out = dec.expand(ids, [[c.latents for c in ctx]])
    got = out.inputs_embeds[0][out.latent_mask[0]]
    torch.testing.assert_close(got, torch.cat([ctx[0].latents, ctx[1].latents]))  # in order
    emb = dec.model.get_input_embeddings()
    tokens = [t for t in ids[0] if t != dec.placeholder_id]
    torch.testing.assert_close(out.inputs_embeds[0][~out.latent_mask[0]], emb(torch.tensor(tokens)))


def test_generate_single_batched_and_multi_context(compressor):
    ctx = compressor.compress(TEXTS, factor=2)
    one = compressor.generate("Where is the tower?", ctx[0], max_new_tokens=6)
    assert isinstance(one, str)
    many = compressor.generate(["Where is the tower?", "How high?"], [[ctx[0]], ctx[1:3]], max_new_tokens=6)
    assert isinstance(many, list) and len(many) == 2
    # left-padded batching gives the same greedy tokens as one at a time
    assert many[0] == one
    assert many[1] == compressor.generate("How high?", ctx[1:3], max_new_tokens=6)


def test_generate_returns_only_new_text(compressor):
    ctx = compressor.compress([TEXTS[0]])
    dec = compressor.decoder
    inp = dec.expand(dec.encode_prompts([dec.render("Where?", 1)]), [[ctx[0].latents]])
    with torch.no_grad():
        ids = dec.model.generate(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
                                 max_new_tokens=4, do_sample=False, pad_token_id=dec.tokenizer.pad_token_id)
    assert ids.shape[1] <= 4  # only new tokens, no prompt echo
    text = compressor.generate("Where?", ctx, max_new_tokens=4)
    assert text == dec.tokenizer.decode(ids[0], skip_special_tokens=True)


def test_explicit_placeholder_prompt(compressor):
    ph = compressor.decoder.placeholder
    ctx = compressor.compress(TEXTS[:2])
    out = compressor.generate(f"A: {ph}\nB: {ph}\nCompare them.", ctx, max_new_tokens=3)
    assert isinstance(out, str)
    with pytest.raises(PlaceholderCountError, match="1 placeholder"):
        compressor.generate(f"A: {ph} only", ctx, max_new_tokens=3)


def test_contexts_from_another_compressor_are_refused(compressor, make_compressor):
    other = make_compressor(projector_hidden_size=64)
    ctx = other.compress([TEXTS[0]])
    with pytest.raises(ValueError, match="another compressor"):
        compressor.generate("Where?", ctx)
    feats = other.encode([TEXTS[0]])
    with torch.no_grad():
        other.density_head.bias.add_(1.0)
    with pytest.raises(ValueError, match="another encoder"):
        other.compress_features(feats)


def test_left_padded_batch_scores_equal_single(compressor):
    """Stronger than comparing texts: the decoder's per-step scores match with and without padding."""
    dec = compressor.decoder
    ctx = compressor.compress(TEXTS, factor=2)
    prompts = [dec.render("Where is the tower?", 1), dec.render("How high is it?", 2)]
    lat = [[ctx[0].latents], [ctx[1].latents, ctx[3].latents]]

    def scores(ps, ls):
        inp = dec.expand(dec.encode_prompts(ps), ls)
        with torch.no_grad():
            out = dec.model.generate(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
                                     max_new_tokens=3, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, pad_token_id=dec.tokenizer.pad_token_id)
        return torch.stack(out.scores, 1)

    both = scores(prompts, lat)
    for i in range(2):
        torch.testing.assert_close(both[i], scores([prompts[i]], [lat[i]])[0], atol=1e-4, rtol=1e-4)
