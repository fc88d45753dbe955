"""The single-stage joint loss: LM + lambda * MSE (+ optional distillation KL).

One encoder pass per context gives both the density prediction (MSE against the label) and the
features; the chosen factor pools them, the projector maps them into the decoder, the decoder
reads them where its prompt has placeholders, and the LM loss is taken on the answer tokens only
(-100 on the prompt and on latent positions). The path is the inference path with autograd on:
``_encode_batch`` -> ``pooling.derive`` -> ``_project`` -> ``decoder.expand``.

The optional distillation term is a token-level KL from the same decoder reading the
uncompressed context with its adapters disabled (the base model as teacher) to the student
reading the latents, on the same answer tokens. It gives a dense signal per sample.

``CompressorObjective`` is an ``nn.Module`` so that DDP can wrap it (DDP hooks need the
whole computation inside one ``forward``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline.placeholder import IGNORE_INDEX
from .config import ObjectiveConfig
from .data import Batch
from .dynamic import dynamic_encode


class CompressorObjective(nn.Module):
    """Computes the training losses of a compressor for one batch (returned as a dict)."""

    def __init__(self, comp, objective: ObjectiveConfig):
        super().__init__()
        self.comp = comp
        self.objective = objective

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Losses and counts: ``loss`` (to backprop), ``lm``, ``mse``, ``kl``, sums for averaging."""
        comp, obj = self.comp, self.objective
        device = comp.device
        y_hat, pooled, sizes = self._compress(batch)
        latents = comp._project(pooled)
        per_sample, k = [], 0
        for n in batch.n_contexts:
            per_sample.append(latents[k : k + n])
            k += n
        inp = comp.decoder.expand(batch.input_ids, per_sample, labels=batch.labels, padding_side="right")
        logits, targets = _answer_logits(comp.decoder.model, inp.labels, inputs_embeds=inp.inputs_embeds,
                                         attention_mask=inp.attention_mask)
        mask = targets != IGNORE_INDEX
        n_tok = mask.sum()
        lm_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        lm = lm_sum / n_tok.clamp(min=1)

        y, y_mask = batch.y.to(device), batch.y_mask.to(device)
        sq = (y_hat.float() - y) ** 2 * y_mask
        n_lab = y_mask.sum()
        mse_sum = sq.sum()
        mse = mse_sum / n_lab.clamp(min=1)
        loss = lm + (obj.lambda_mse * mse if obj.uses_head else 0.0)

        out = {"lm_sum": lm_sum.detach(), "n_tok": n_tok.detach(), "mse_sum": mse_sum.detach(),
               "n_lab": n_lab.detach(), "lm": lm.detach(), "mse": mse.detach(),
               "n_latents": torch.tensor(float(sum(p.shape[0] for p in pooled))),
               "n_ctx_tokens": torch.tensor(float(sum(len(c) for c in batch.context_ids))),
               "size_sum": torch.tensor(float(sum(sizes)))}
        if obj.distill_weight > 0:
            kl_sum = self._distill_kl(batch, logits, mask)
            kl = kl_sum / n_tok.clamp(min=1)
            loss = loss + obj.distill_weight * kl
            out.update(kl_sum=kl_sum.detach(), kl=kl.detach())
        out["loss"] = loss
        return out

    def _compress(self, batch: Batch):
        """(y_hat, pooled rows per context, size per context) for the batch's contexts."""
        comp = self.comp
        if self.objective.mode == "fully_dynamic":
            return dynamic_encode(comp, batch.context_ids)
        y_hat, feats = comp._encode_batch(batch.context_ids)
        sizes = batch.sizes
        if sizes is None:  # the head chooses, as at inference
            n = torch.tensor([len(c) for c in batch.context_ids])
            sizes = comp.select(y_hat.detach().cpu(), n).tolist()
        pooled = comp.pooling.derive([f for f, _ in feats], [c for _, c in feats], list(sizes))
        return y_hat, pooled, list(sizes)

    def _distill_kl(self, batch: Batch, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summed KL(teacher || student) over answer tokens; the teacher reads the plain text."""
        model = self.comp.decoder.model
        if batch.teacher_ids is None:
            raise ValueError("distillation is on but the batch has no teacher inputs")
        device = self.comp.device
        width = max(len(r) for r in batch.teacher_ids)
        pad = self.comp.decoder.tokenizer.pad_token_id
        ids = torch.full((len(batch.teacher_ids), width), pad, dtype=torch.long, device=device)
        labels = torch.full_like(ids, IGNORE_INDEX)
        attn = torch.zeros_like(ids)
        for i, (r, lab) in enumerate(zip(batch.teacher_ids, batch.teacher_labels)):
            ids[i, : len(r)] = torch.tensor(r, device=device)
            labels[i, : len(r)] = torch.tensor(lab, device=device)
            attn[i, : len(r)] = 1
        off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with torch.no_grad(), off:
            t_logits, t_targets = _answer_logits(model, labels, input_ids=ids, attention_mask=attn)
        t_mask = t_targets != IGNORE_INDEX
        s, t = student_logits[mask].float(), t_logits[t_mask].float()
        if s.shape != t.shape:
            raise RuntimeError(f"student and teacher disagree on answer tokens ({tuple(s.shape)} vs {tuple(t.shape)})")
        tau = self.objective.distill_temperature
        kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="sum")
        return kl * tau * tau


def _answer_logits(model, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict the labelled positions, and their targets (shifted by one).

    Only the tail of the sequence from the first labelled position on is projected to the
    vocabulary (``logits_to_keep``): the prompt and latents need no logits.
    """
    width = labels.shape[1]
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    first = int(labelled[0]) if len(labelled) else width - 1
    keep = min(width, width - first + 1)  # positions first-1 .. width-1
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return logits[:, :-1], labels[:, width - keep + 1 :]
