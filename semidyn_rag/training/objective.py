"""The single-stage joint loss: LM + lambda * MSE (+ optional distillation KL).

One encoder pass per context gives both the density prediction (MSE against the label) and the
features; the chosen factor pools them, the projector maps them into the decoder, the decoder
reads them where its prompt has placeholders, and the LM loss is taken on the answer tokens only
(-100 on the prompt and on latent positions). The path is the inference path with autograd on:
``_encode_batch`` -> ``pooling.derive`` -> ``_project`` -> ``decoder.expand``.

The optional distillation term is a token-level KL from the same decoder reading the
uncompressed context with its adapters disabled (the base model as teacher) to the student
reading the latents, on the same answer tokens. It gives a dense signal per sample.

The optional hidden-state alignment (``hidden_align_weight``, see ``align``) pulls the
student's states at the chosen layers toward that same teacher's: at each latent row toward
the mean over its window's context tokens, at the question and answer tokens toward the same
tokens. Both terms share one teacher pass.

``CompressorObjective`` is an ``nn.Module`` so that DDP can wrap it (DDP hooks need the
whole computation inside one ``forward``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline.placeholder import IGNORE_INDEX
from .align import alignment_sums, resolve_layers, shared_suffix
from .config import ObjectiveConfig
from .data import Batch
from .dynamic import dynamic_encode


class CompressorObjective(nn.Module):
    """Computes the training losses of a compressor for one batch (returned as a dict)."""

    def __init__(self, comp, objective: ObjectiveConfig):
        super().__init__()
        self.comp = comp
        self.objective = objective
        self.align_layers: list[int] = []
        if objective.hidden_align_weight > 0:
            if not comp.pooling.pools_windows:
                raise ValueError(f"hidden-state alignment needs latents that are windows of tokens; pooling "
                                 f"{comp.pooling.kind} has none")
            cfg = comp.decoder.model.config
            cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            self.align_layers = resolve_layers(objective.hidden_align_layers, int(cfg.num_hidden_layers))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Losses and counts: ``loss`` (to backprop), ``lm``, ``mse``, ``kl``, ``align``, sums for averaging."""
        comp, obj = self.comp, self.objective
        device = comp.device
        y_hat, pooled, sizes = self._compress(batch)
        latents = comp._project(pooled)
        per_sample, k = [], 0
        for n in batch.n_contexts:
            per_sample.append(latents[k : k + n])
            k += n
        inp = comp.decoder.expand(batch.input_ids, per_sample, labels=batch.labels, padding_side="right")
        logits, targets, hidden = _forward(comp.decoder.model, inp.labels, hidden=bool(self.align_layers),
                                           inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask)
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
        if obj.distill_weight > 0 or self.align_layers:
            t_logits, t_targets, t_hidden, t_lengths = self._teacher(batch, obj.distill_weight > 0)
        if obj.distill_weight > 0:
            kl_sum = self._distill_kl(logits, mask, t_logits, t_targets)
            kl = kl_sum / n_tok.clamp(min=1)
            loss = loss + obj.distill_weight * kl
            out.update(kl_sum=kl_sum.detach(), kl=kl.detach())
        if self.align_layers:
            sums = self._align(batch, hidden, inp, t_hidden, t_lengths, pooled, sizes)
            align = sums.loss_sum / max(1, sums.n_rows)
            loss = loss + obj.hidden_align_weight * align
            out.update(align_sum=sums.loss_sum.detach(), n_align=torch.tensor(float(sums.n_rows)),
                       align=align.detach())
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

    def _teacher(self, batch: Batch, logits: bool):
        """One no-grad pass of the base decoder (adapters off) over the plain-text prompts.

        Returns (answer logits and targets when ``logits``, the alignment layers' states, row lengths).
        """
        model = self.comp.decoder.model
        if batch.teacher_ids is None:
            raise ValueError("distillation or alignment is on but the batch has no teacher inputs")
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
            t_logits, t_targets, t_hidden = _forward(model, labels if logits else None,
                                                     hidden=bool(self.align_layers), input_ids=ids, attention_mask=attn)
        return t_logits, t_targets, t_hidden, attn.sum(1)

    def _align(self, batch: Batch, hidden, inp, t_hidden, t_lengths, pooled, sizes):
        """Alignment sums of the batch (see ``align.alignment_sums``)."""
        maps = batch.extra.get("teacher_maps")
        if maps is None:
            raise ValueError("alignment is on but the batch has no teacher-to-encoder maps")
        pooling, ph = self.comp.pooling, self.comp.decoder.placeholder_id
        windows = [pooling.window_index(len(c), s) for c, s in zip(batch.context_ids, sizes)]
        suffix = [shared_suffix(s, t, ph) for s, t in zip(batch.input_ids, batch.teacher_ids)]
        return alignment_sums([hidden[k] for k in self.align_layers], [t_hidden[k] for k in self.align_layers],
                              latent_mask=inp.latent_mask, student_lengths=inp.attention_mask.sum(1),
                              teacher_lengths=t_lengths, n_latents=[p.shape[0] for p in pooled],
                              n_contexts=batch.n_contexts, windows=windows, maps=maps, suffix=suffix,
                              metric=self.objective.hidden_align_metric)

    def _distill_kl(self, student_logits: torch.Tensor, mask: torch.Tensor, t_logits: torch.Tensor,
                    t_targets: torch.Tensor) -> torch.Tensor:
        """Summed KL(teacher || student) over answer tokens; the teacher reads the plain text."""
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
    logits, targets, _ = _forward(model, labels, **inputs)
    return logits, targets


def _forward(model, labels: torch.Tensor | None, hidden: bool = False, **inputs):
    """``_answer_logits`` plus every layer's hidden states (embeddings first) when ``hidden``, else None.

    Without ``labels`` one position is projected to the vocabulary and logits and targets are None.
    """
    if labels is None:
        out = model(**inputs, use_cache=False, logits_to_keep=1, output_hidden_states=hidden)
        return None, None, out.hidden_states if hidden else None
    width = labels.shape[1]
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    first = int(labelled[0]) if len(labelled) else width - 1
    keep = min(width, width - first + 1)  # positions first-1 .. width-1
    out = model(**inputs, use_cache=False, logits_to_keep=keep, output_hidden_states=hidden)
    return out.logits[:, :-1], labels[:, width - keep + 1 :], out.hidden_states if hidden else None
