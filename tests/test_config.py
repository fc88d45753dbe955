import pytest
from pydantic import ValidationError

from semidyn_rag import CompressorConfig


def test_defaults_follow_the_paper():
    c = CompressorConfig()
    assert c.factors == (2, 4, 8, 16, 32) and c.lengths == (16, 32, 64, 128)
    assert c.backbone == "mean_pool" and c.is_bidirectional
    assert c.compare_space == "linear" and c.rounding == "round"
    assert c.projector_hidden_size == 4096
    assert (c.encoder_lora.r, c.encoder_lora.alpha, c.decoder_lora.alpha) == (16, 128, 64)
    assert c.encoder_lora.target_modules == "all-linear"
    assert not c.trust_remote_code


def test_token_backbones_default_to_causal():
    assert not CompressorConfig(backbone="last_tokens").is_bidirectional
    assert CompressorConfig(backbone="last_tokens", bidirectional=True).is_bidirectional


@pytest.mark.parametrize("bad, match", [
    ({"factors": (2, 3, 8)}, "multiples of the smallest"),
    ({"factors": ()}, "must not be empty"),
    ({"lengths": (0, 16)}, "positive"),
    ({"backbone": "compression_tokens", "bidirectional": True}, "causal encoder"),
    ({"backbone": "attention"}, "backbone"),
    ({"typo_field": 1}, "typo_field"),
])
def test_bad_configs_are_rejected(bad, match):
    with pytest.raises(ValidationError, match=match):
        CompressorConfig(**bad)


def test_candidates_sorted_and_deduplicated():
    assert CompressorConfig(factors=(8, 2, 4, 2)).factors == (2, 4, 8)
