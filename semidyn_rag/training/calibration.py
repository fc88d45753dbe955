"""Data-dependent projector initialisation: latents that start where the decoder can read them.

A randomly initialised projector fed raw encoder states gives latents the decoder cannot use.
Measured on SmolLM2 (first 6 layers as encoder) after 2,000 training samples: latents had 10x
the norm of the decoder's token embeddings and 94% of their energy in one direction shared by
every context, because a few massive-activation dimensions dominate the encoder states and
the RMSNorm in front of the projector keeps them dominant. Training did not recover from it.

``calibrate_projector`` fixes the starting point from a sample of training contexts, in place
and within the authors' parameter layout (no new tensors):

- ``rms_norm.weight`` gets the inverse per-dimension RMS of the normalised inputs, so every
  input dimension reaches the MLP at unit scale;
- ``down_proj`` is fitted by ridge regression so each latent starts at the mean of the
  decoder's input embeddings of the tokens it pools (when encoder and decoder share a
  vocabulary and the backbone is mean pooling); otherwise its output is centred (the shared
  direction projected out) and scaled to the embeddings' spread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch


logger = logging.getLogger(__name__)


@dataclass
class CalibrationReport:
    """What the calibration fitted: rows used, the target kind and how well it is matched."""

    n_contexts: int
    n_rows: int
    target: str  # "window_embeddings" (ridge fit) or "embedding_scale" (centred and scaled)
    latent_rms: float  # per-element RMS of the calibrated latents
    embedding_rms: float  # per-element RMS of the decoder's (centred) input embeddings
    r2: float | None  # share of the targets' variance the ridge fit explains (None without targets)


@torch.no_grad()
def calibrate_projector(comp, context_ids: Sequence[Sequence[int]], ridge: float = 1e-3,
                        batch_size: int = 8) -> CalibrationReport:
    """Initialise ``comp.projector`` from encoder states of ``context_ids`` (encoder token ids).

    Every candidate factor (or latent count) contributes rows. Raises ValueError without
    contexts. Deterministic: the same contexts give the same weights.
    """
    ids = [list(r) for r in context_ids if r]
    if not ids:
        raise ValueError("calibration needs at least one non-empty context")
    proj = comp.projector
    was_training = comp.training
    comp.eval()  # no adapter dropout in the states the fit is made on
    try:
        feats = comp.encode_ids(ids, batch_size=batch_size)
    finally:
        comp.train(was_training)
    sizes = list(comp.config.candidates)
    rows, spans = [], []  # spans: (context index, size) per block of rows, for the targets
    for i, f in enumerate(feats):
        for s in sizes:
            pooled = comp.pooling.derive([f.features], [f.counts], [s])[0]
            rows.append(pooled.double())
            spans.append((i, s))
    x = torch.cat(rows)
    dev = proj.down_proj.weight.device
    emb = comp.decoder.model.get_input_embeddings().weight.detach().double()
    emb_rms = float((emb - emb.mean(0)).pow(2).mean().sqrt())

    # Per-dimension input scale: RMSNorm(x) * w with w_d = 1 / RMS_d of the normalised inputs.
    eps = proj.rms_norm.eps or 1e-6
    xn = x / x.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    w = xn.pow(2).mean(0).add(eps).rsqrt()
    proj.rms_norm.weight.copy_(w.to(proj.rms_norm.weight))
    h = _hidden(proj, x.to(dev, proj.up_proj.weight.dtype)).double().cpu()

    targets = _window_embeddings(comp, ids, spans, emb) if _shares_vocab(comp) else None
    if targets is not None:
        gram = h.T @ h / len(h)
        lam = ridge * float(gram.diagonal().mean())
        sol = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), h.T @ targets / len(h))
        proj.down_proj.weight.copy_(sol.T.to(proj.down_proj.weight))
        resid = targets - h @ sol
        r2 = 1.0 - float(resid.pow(2).sum() / (targets - targets.mean(0)).pow(2).sum())
        kind = "window_embeddings"
    else:
        mu = h.mean(0)
        wd = proj.down_proj.weight.double().cpu()
        wd = wd - (wd @ mu)[:, None] * mu[None, :] / mu.dot(mu).clamp_min(1e-12)
        out = h @ wd.T
        wd = wd * (emb_rms / float(out.pow(2).mean().sqrt().clamp_min(1e-12)))
        proj.down_proj.weight.copy_(wd.to(proj.down_proj.weight))
        r2, kind = None, "embedding_scale"
    lat = proj(x.to(dev, proj.up_proj.weight.dtype)).double()
    report = CalibrationReport(len(ids), len(x), kind, float(lat.pow(2).mean().sqrt()), emb_rms, r2)
    logger.info("projector calibrated on %d contexts (%d rows, %s): latent RMS %.4f vs embeddings %.4f%s",
                report.n_contexts, report.n_rows, kind, report.latent_rms, emb_rms,
                "" if r2 is None else f", ridge R^2 {r2:.3f}")
    return report


def _hidden(proj, x: torch.Tensor) -> torch.Tensor:
    """The projector's activations in front of ``down_proj``."""
    xn = proj.rms_norm(x)
    if proj.gate_proj is not None:
        return proj.act(proj.gate_proj(xn)) * proj.up_proj(xn)
    return proj.act(proj.up_proj(xn))


def _shares_vocab(comp) -> bool:
    """Window targets need mean pooling and encoder ids that are decoder ids too."""
    if not comp.pooling.pools_windows:
        return False
    enc, dec = comp.encoder.tokenizer, comp.decoder.tokenizer
    if enc is dec:
        return True
    dec_vocab = dec.get_vocab()  # may hold an added placeholder the encoder lacks
    return all(dec_vocab.get(tok) == i for tok, i in enc.get_vocab().items())


def _window_embeddings(comp, ids: list[list[int]], spans, emb: torch.Tensor) -> torch.Tensor:
    """Mean decoder input embedding of the tokens of each pooled window, row for row."""
    end_id = comp.encoder.eos_id
    return torch.cat([comp.pooling.pool_ids(ids[i], end_id, emb, s) for i, s in spans])
