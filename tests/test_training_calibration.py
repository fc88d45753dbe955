"""The data-dependent projector init: latents start at the decoder's embedding scale."""

from __future__ import annotations

import pytest
import torch

from semidyn_rag.training.calibration import calibrate_projector
from tests.conftest import TEXTS

MORE = TEXTS + [
    "Rivers carry water from mountains to the sea, shaping valleys and plains along the way.",
    "The library opens at nine and closes at six, except on Sundays when it stays closed.",
    "A violin has four strings tuned in fifths and is played with a bow made of horsehair.",
]


def _window_targets(comp, text: str, factor: int) -> torch.Tensor:
    ids = torch.tensor(comp.encoder.tokenize([text])[0] + [comp.encoder.eos_id])  # the end marker is pooled too
    emb = comp.decoder.model.get_input_embeddings().weight.detach()
    return torch.stack([emb[ids[i:i + factor]].mean(0) for i in range(0, len(ids), factor)])


def _latent_error(comp, factor: int) -> float:
    errs = [(comp.compress(t, factor=factor)[0].latents - _window_targets(comp, t, factor)).pow(2).mean()
            for t in MORE]
    return float(torch.stack(errs).mean())


def test_mean_pool_latents_start_at_their_windows_embeddings(make_compressor):
    torch.manual_seed(0)
    comp = make_compressor()
    before = _latent_error(comp, 4)
    report = calibrate_projector(comp, comp.encoder.tokenize(MORE))
    after = _latent_error(comp, 4)
    print(f"latent MSE to window embeddings {before:.5f} -> {after:.5f}; R^2 {report.r2:.3f}")
    assert report.target == "window_embeddings" and report.n_contexts == len(MORE)
    assert report.r2 > 0.3
    assert after < 0.5 * before
    # every input dimension reaches the MLP at unit scale
    feats = torch.cat([f.features for f in comp.encode(MORE)])
    scaled = comp.projector.rms_norm(feats)
    assert scaled.pow(2).mean(0).sqrt().sub(1).abs().max() < 0.6


def test_other_backbones_get_centred_latents_at_embedding_scale(make_compressor):
    torch.manual_seed(0)
    comp = make_compressor(backbone="last_tokens", lengths=(2, 4))
    report = calibrate_projector(comp, comp.encoder.tokenize(MORE))
    assert report.target == "embedding_scale" and report.r2 is None
    assert report.latent_rms == pytest.approx(report.embedding_rms, rel=0.05)
    lat = torch.cat([c.latents for c in comp.compress(MORE, length=4)])
    assert lat.mean(0).norm() < 0.2 * lat.norm(dim=-1).mean()  # the shared direction is gone


def test_calibration_is_deterministic_and_needs_contexts(make_compressor):
    a, b = make_compressor(), make_compressor()
    b.projector.load_state_dict(a.projector.state_dict())
    ids = a.encoder.tokenize(MORE)
    calibrate_projector(a, ids)
    calibrate_projector(b, ids)
    for (n, p), q in zip(a.projector.named_parameters(), b.projector.parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="at least one non-empty context"):
        calibrate_projector(a, [[]])
