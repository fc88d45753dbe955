import json

import pytest
import torch

from semidyn_rag import CheckpointError, SemiDynamicCompressor
from semidyn_rag.testing import build_tiny_model
from tests.conftest import TEXTS


def _perturb_adapters(comp, seed=0):
    """Make LoRA B non-zero (fresh adapters are a no-op) so saving them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in comp.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        comp.density_head.weight.copy_(torch.randn(comp.density_head.weight.shape, generator=g))


def _same_outputs(a, b):
    ca, cb = a.compress(TEXTS, scale=0.5), b.compress(TEXTS, scale=0.5)
    for x, y in zip(ca, cb):
        assert x.factor == y.factor and x.y_hat == pytest.approx(y.y_hat, abs=1e-6)
        torch.testing.assert_close(x.latents, y.latents, atol=1e-6, rtol=1e-6)
    ga = a.generate(["Where?", "Who?"], [ca[:2], ca[2:]], max_new_tokens=5)
    gb = b.generate(["Where?", "Who?"], [cb[:2], cb[2:]], max_new_tokens=5)
    assert ga == gb


def test_save_load_roundtrip(compressor, tmp_path):
    _perturb_adapters(compressor)
    compressor.save_pretrained(tmp_path / "ck")
    for part in ("config.json", "encoder/adapter_model.safetensors", "decoder/adapter_model.safetensors",
                 "density_head/model.safetensors", "projector/model.safetensors"):
        assert (tmp_path / "ck" / part).is_file(), part
    loaded = SemiDynamicCompressor.from_pretrained(str(tmp_path / "ck"))
    assert loaded.fingerprint == compressor.fingerprint
    assert loaded.feature_fingerprint == compressor.feature_fingerprint
    _same_outputs(compressor, loaded)


def test_bf16_export_keeps_fingerprint_and_outputs(compressor, tmp_path, capsys):
    from semidyn_rag.checkpoint import export_compressor
    from semidyn_rag.cli import main

    _perturb_adapters(compressor)
    compressor.save_pretrained(tmp_path / "ck")
    report = export_compressor(tmp_path / "ck", tmp_path / "small", keep_fp32_below=256)
    assert report.tensors_cast > 0 and report.bytes_after < 0.75 * report.bytes_before
    small = SemiDynamicCompressor.from_pretrained(str(tmp_path / "small"))  # the fingerprint check passes
    assert small.fingerprint == compressor.fingerprint
    assert json.loads((tmp_path / "small" / "config.json").read_text())["weights_dtype"] == "bfloat16"
    # bf16 adapters move y_hat a little (a context at a selector boundary may change factor)
    ca, cb = compressor.compress(TEXTS, factor=4), small.compress(TEXTS, factor=4)
    spread = max(c.y_hat for c in ca) - min(c.y_hat for c in ca)  # the random test head is steep
    for x, y in zip(ca, cb):
        assert abs(x.y_hat - y.y_hat) <= 0.1 * spread
        assert (x.latents - y.latents).norm() <= 0.02 * x.latents.norm()
    with pytest.raises(CheckpointError, match="exists"):
        export_compressor(tmp_path / "ck", tmp_path / "small")
    with pytest.raises(CheckpointError, match="not a compressor checkpoint"):
        export_compressor(tmp_path / "nothing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "cli"), "--verify"]) == 0
    assert "fingerprint same" in capsys.readouterr().out


def test_compression_tokens_and_full_encoder_roundtrip(make_compressor, tmp_path):
    comp = make_compressor(backbone="compression_tokens", lengths=(2, 4), encoder_training="full",
                           decoder_training="frozen")
    with torch.no_grad():
        comp.pooling.memory.add_(1.0)
        next(comp.encoder.model.parameters()).mul_(1.1)
    comp.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "pooling" / "model.safetensors").is_file()
    assert not (tmp_path / "ck" / "decoder").exists()
    loaded = SemiDynamicCompressor.from_pretrained(str(tmp_path / "ck"))
    assert loaded.fingerprint == comp.fingerprint
    _same_outputs(comp, loaded)


@pytest.mark.parametrize("part", ["density_head", "projector", "encoder_lora", "decoder_lora"])
def test_fingerprint_changes_with_any_trained_weight(compressor, part):
    before, before_feat = compressor.fingerprint, compressor.feature_fingerprint
    with torch.no_grad():
        if part == "density_head":
            compressor.density_head.bias.add_(0.5)
        elif part == "projector":
            compressor.projector.up_proj.weight[0, 0] += 1.0
        else:
            model = compressor.encoder.model if part == "encoder_lora" else compressor.decoder.model
            next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)
    assert compressor.fingerprint != before
    # stored features depend on the encoder side only
    assert (compressor.feature_fingerprint != before_feat) == (part in ("density_head", "encoder_lora"))


def test_fingerprint_sees_a_swapped_module_and_a_reloaded_state(compressor):
    """The cached parameter list must not hide a module put in place of another."""
    from semidyn_rag.pipeline.projector import Projector

    before = compressor.fingerprint
    old = compressor.projector
    new = Projector(old.up_proj.in_features, old.down_proj.out_features, old.up_proj.out_features,
                    old.gate_proj is not None)
    compressor.projector = new
    swapped = compressor.fingerprint
    assert swapped != before
    with torch.no_grad():
        new.load_state_dict(old.state_dict())  # in place: same module, the old weights again
    assert compressor.fingerprint == before


def test_fingerprint_ignores_dtype_and_model_path(compressor, tiny_dirs, tmp_path):
    import shutil

    enc, dec = tiny_dirs
    compressor.save_pretrained(tmp_path / "ck")
    shutil.copytree(enc, tmp_path / "enc_copy")
    moved = SemiDynamicCompressor.from_pretrained(str(tmp_path / "ck"), encoder=str(tmp_path / "enc_copy"))
    assert moved.fingerprint == compressor.fingerprint


def test_mismatched_base_model_is_refused(compressor, tmp_path):
    compressor.save_pretrained(tmp_path / "ck")
    other = build_tiny_model(tmp_path / "other", hidden_size=64, seed=99)  # same shape, other weights
    with pytest.raises(CheckpointError, match="base models other than"):
        SemiDynamicCompressor.from_pretrained(str(tmp_path / "ck"), encoder=str(other))


def test_encoder_size_mismatch_is_a_clear_error(compressor, tmp_path):
    compressor.save_pretrained(tmp_path / "ck")
    wider = build_tiny_model(tmp_path / "wide", hidden_size=128, seed=1)
    with pytest.raises(CheckpointError, match="encoder adapter .* sizes differ from training.*size mismatch"):
        SemiDynamicCompressor.from_pretrained(str(tmp_path / "ck"), encoder=str(wider), check_fingerprint=False)


def test_missing_or_foreign_checkpoint(tmp_path, compressor):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        SemiDynamicCompressor.from_pretrained(str(tmp_path / "nothing"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="neither"):
        SemiDynamicCompressor.from_pretrained(str(tmp_path / "foreign"))
    compressor.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "projector" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing its projector"):
        SemiDynamicCompressor.from_pretrained(str(tmp_path / "ck"))


def _write_authors_checkpoint(comp, path, enc, dec):
    """The authors' released layout, written by hand from a compressor."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "comp_ratio_or_len": [1 / f for f in comp.config.factors],
        "placeholder_token_id": comp.decoder.placeholder_id,
        "mlp_converter_hidden_dim": comp.config.projector_hidden_size,
        "feature_extract_method": "mean_pooling",
        "memory_token_begin_id": None,
        "encoder_training": "lora",
        "decoder_training": "lora",
        "base_encoder_model_path": str(enc),
        "base_decoder_model_path": str(dec),
        "discretize_ratio_mode": "round",
        "discretize_compare_in_log": False,
    }))
    comp.encoder.model.save_pretrained(path / "encoder")
    comp.decoder.model.save_pretrained(path / "decoder")
    torch.save({"projector": comp.projector.state_dict(), "compress_ratio_head": comp.density_head.state_dict()},
               path / "projector.pth")


def test_authors_layout_loads_with_same_outputs(compressor, tiny_dirs, tmp_path):
    _perturb_adapters(compressor, seed=3)
    enc, dec = tiny_dirs
    _write_authors_checkpoint(compressor, tmp_path / "authors", enc, dec)
    loaded = SemiDynamicCompressor.from_pretrained(str(tmp_path / "authors"))
    assert loaded.config.factors == (2, 4, 8, 16, 32)
    assert loaded.decoder.placeholder == compressor.decoder.placeholder
    _same_outputs(compressor, loaded)


def test_authors_projector_with_code_is_refused(compressor, tiny_dirs, tmp_path):
    """projector.pth is read with weights_only=True: a pickle carrying a callable fails to load."""
    enc, dec = tiny_dirs
    _write_authors_checkpoint(compressor, tmp_path / "authors", enc, dec)
    torch.save({"projector": {}, "compress_ratio_head": {}, "evil": print}, tmp_path / "authors" / "projector.pth")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        SemiDynamicCompressor.from_pretrained(str(tmp_path / "authors"))


def test_format_1_checkpoint_loads_with_its_legacy_pooling_rule(make_compressor, tmp_path):
    """A checkpoint saved before the pooling rule was recorded keeps its rule and its fingerprint."""
    comp = make_compressor(pool_end_marker=False)
    _perturb_adapters(comp, seed=5)
    comp.save_pretrained(tmp_path / "ck")
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    for key in ("pool_end_marker", "pool_align", "density_head"):
        del raw["compressor"][key]
    raw["format_version"] = 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(raw))
    (tmp_path / "ck" / "pooling" / "config.json").unlink()
    loaded = SemiDynamicCompressor.from_pretrained(str(tmp_path / "ck"))
    assert loaded.config.pool_end_marker is False and loaded.fingerprint == comp.fingerprint
    assert loaded.feature_fingerprint == comp.feature_fingerprint
    new = make_compressor()  # today's default pools the end marker: another rule, other stored features
    assert new.config.pool_end_marker is True and "pool_end_marker" in new.pooling.fingerprint_dict()


def test_pooling_stage_folder_must_match_the_config(compressor, tmp_path):
    compressor.save_pretrained(tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / "pooling" / "config.json").read_text())
    assert saved == compressor.pooling.get_config_dict() and saved["pool_end_marker"] is True
    saved["pool_align"] = "end"
    (tmp_path / "ck" / "pooling" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="pool_align"):
        SemiDynamicCompressor.from_pretrained(str(tmp_path / "ck"))
