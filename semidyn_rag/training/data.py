"""From records to batches: tokenized examples, the held-out split, and the sharded batch order.

Every record is tokenized once, up front: its contexts with the encoder's tokenizer (so the
density labels count exactly the tokens the encoder reads), its prompt and answer with the
decoder's. Decoder prompts are rendered with the compressor's own ``decoder.render``, so a
model is trained on the very prompt ``comp.generate`` builds at inference.

The batch order is a function of (seed, epoch) alone, and an optimizer step ``k`` always reads
micro-batches ``k * grad_accum ...``; the step number is therefore the whole data position.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..pipeline.encoder import ContextTooLongError
from ..pipeline.placeholder import IGNORE_INDEX
from .labels import DensityLabeler
from .records import RecordError, TrainingRecord, iter_records

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One record, tokenized. Decoder ids hold one placeholder per context."""

    where: str  # file:line, for error messages
    context_ids: list[list[int]]  # encoder ids per context (no eos)
    labels: list[float | None]  # density label per context (None = no label)
    prompt_ids: list[int]  # rendered decoder prompt with placeholders
    answer_ids: list[int]  # target tokens (eos appended unless cut)
    teacher_prompt_ids: list[int] | None = None  # the same prompt with the contexts as text
    recon_prompt_ids: list[int] | None = None  # "repeat the context" prompt (one placeholder)
    recon_answer_ids: list[int] | None = None  # the first context, as decoder tokens
    recon_teacher_ids: list[int] | None = None
    teacher_map: list | None = None  # per context: (teacher position, encoder position) pairs (alignment)
    recon_teacher_map: list | None = None


@dataclass
class Batch:
    """A micro-batch ready for the objective; ``sizes`` None = the head chooses."""

    context_ids: list[list[int]]  # all contexts of the batch, sample after sample
    n_contexts: list[int]  # contexts per sample
    y: torch.Tensor  # (C,) density labels (0 where masked)
    y_mask: torch.Tensor  # (C,) 1 where a label exists
    input_ids: list[list[int]]  # prompt + answer, placeholders in place
    labels: list[list[int]]  # -100 on the prompt, answer ids after it
    sizes: list[int] | None = None  # factor (mean pooling) or latent count per context
    teacher_ids: list[list[int]] | None = None  # prompt with text contexts + answer
    teacher_labels: list[list[int]] | None = None
    n_reconstruction: int = 0
    extra: dict = field(default_factory=dict)


def load_examples(paths: list[str], comp, *, max_answer_tokens: int, reconstruction: bool,
                  distill: bool, recon_instruction: str = "", recon_max_tokens: int = 128,
                  progress: bool = True, align: bool = False) -> tuple[list[Example], list[TrainingRecord]]:
    """Read and tokenize every record of ``paths``; raises RecordError naming file:line.

    ``distill`` or ``align`` add the teacher's plain-text prompts; ``align`` also maps each
    context's teacher tokens to encoder positions (``align.teacher_alignment``).
    """
    pairs = [(f"{p}:{ln}", rec) for p in paths for ln, rec in iter_records(p)]
    if not pairs:
        raise RecordError(f"no records in {', '.join(paths)}")
    enc, dec = comp.encoder, comp.decoder
    labeler = DensityLabeler(enc.tokenizer)
    eos = dec.tokenizer.eos_token_id
    recon_prompt = dec.render(recon_instruction, 1) if reconstruction else None
    recon_prompt_ids = dec.encode_prompts([recon_prompt])[0] if reconstruction else None
    out = []
    for where, rec in tqdm(pairs, desc="tokenizing records", disable=not progress, leave=False):
        try:
            ctx_ids = enc.tokenize(rec.contexts)
        except (ContextTooLongError, ValueError) as e:
            raise RecordError(f"{where}: {e}") from None
        labels = labeler.labels(rec, [len(c) for c in ctx_ids])
        prompt = dec.render(rec.prompt, len(ctx_ids))
        prompt_ids, answer_ids = dec.encode_prompts([prompt, rec.answer])
        answer_ids = _with_eos(answer_ids, eos, max_answer_tokens)
        ex = Example(where, ctx_ids, labels, prompt_ids, answer_ids)
        if distill:
            ex.teacher_prompt_ids = dec.encode_prompts([fill_contexts(prompt, dec.placeholder, rec.contexts)])[0]
        if align:
            ex.teacher_prompt_ids, ex.teacher_map = _alignment(dec, enc, prompt, rec.contexts, ctx_ids, where)
        if reconstruction:
            ex.recon_prompt_ids = recon_prompt_ids
            ex.recon_answer_ids = _with_eos(dec.encode_prompts([rec.contexts[0]])[0], eos, recon_max_tokens)
            if distill:
                text = fill_contexts(recon_prompt, dec.placeholder, rec.contexts[:1])
                ex.recon_teacher_ids = dec.encode_prompts([text])[0]
            if align:
                ex.recon_teacher_ids, ex.recon_teacher_map = _alignment(dec, enc, recon_prompt, rec.contexts[:1],
                                                                        ctx_ids[:1], where)
        out.append(ex)
    return out, [r for _, r in pairs]


def _alignment(dec, enc, prompt: str, contexts: list[str], ctx_ids: list[list[int]], where: str):
    from .align import teacher_alignment

    try:
        return teacher_alignment(dec.tokenizer, enc.tokenizer, prompt, dec.placeholder, contexts, ctx_ids)
    except ValueError as e:
        raise RecordError(f"{where}: {e}") from None


def _with_eos(ids: list[int], eos: int | None, limit: int) -> list[int]:
    """Targets: the answer then eos, or the first ``limit`` answer tokens if it is longer."""
    if len(ids) >= limit or eos is None:
        return list(ids[:limit])
    return list(ids) + [eos]


def fill_contexts(prompt: str, placeholder: str, contexts: list[str]) -> str:
    """The rendered prompt with each placeholder replaced by its context's text, in order."""
    parts = prompt.split(placeholder)
    if len(parts) != len(contexts) + 1:
        raise ValueError(f"prompt has {len(parts) - 1} placeholders for {len(contexts)} contexts")
    return "".join(p + c for p, c in zip(parts, contexts)) + parts[-1]


def context_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).lower().encode()).hexdigest()


def split_by_context(records: list[TrainingRecord], fraction: float, seed: int) -> tuple[list[int], list[int], int]:
    """Indices of (train, held-out) records, split so that no context is on both sides.

    Each distinct context falls in the held-out side with probability ``fraction`` (by a
    seeded hash); a record is held out when all its contexts are, trained on when none is,
    and dropped when it mixes both (the count is returned third).
    """
    train, held, dropped = [], [], 0
    cut = int(fraction * 2**32)
    for i, rec in enumerate(records):
        sides = {int(hashlib.sha1(f"{seed}:{context_key(c)}".encode()).hexdigest()[:8], 16) < cut
                 for c in rec.contexts}
        if sides == {True}:
            held.append(i)
        elif sides == {False}:
            train.append(i)
        else:
            dropped += 1
    return train, held, dropped


class BatchOrder:
    """Which examples micro-batch number ``mb`` holds on this process (DistributedSampler-like).

    Each epoch is a seeded permutation, wrapped around to fill whole global batches, of which
    process ``rank`` reads every ``world``-th example.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.global_batch = batch_size * world
        self.per_epoch = math.ceil(n / self.global_batch)  # micro-batches per epoch
        self._cache: tuple[int, list[int]] | None = None

    def _epoch(self, epoch: int) -> list[int]:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self.per_epoch * self.global_batch
        perm = (perm * math.ceil(total / self.n))[:total]
        mine = perm[self.rank :: self.world]
        self._cache = (epoch, mine)
        return mine

    def batch(self, mb: int) -> tuple[int, list[int]]:
        """(epoch, example indices) of micro-batch ``mb`` (counted from the start of training)."""
        epoch, i = divmod(mb, self.per_epoch)
        mine = self._epoch(epoch)
        return epoch, mine[i * self.batch_size : (i + 1) * self.batch_size]


def collate(examples: list[Example], sizes: list[int] | None, recon: list[bool] | None = None,
            distill: bool = False) -> Batch:
    """Assemble a batch; ``recon[i]`` turns sample i into reconstructing its first context.

    ``sizes`` is one factor per *sample* (all its contexts use it), or None. ``distill`` adds
    the teacher's inputs (distillation or alignment), and ``extra["teacher_maps"]`` (one per
    context) when the examples were loaded with ``align``.
    """
    recon = recon or [False] * len(examples)
    ctx, n_ctx, ys, mask, ids, labs, t_ids, t_labs, per_ctx_sizes = [], [], [], [], [], [], [], [], []
    maps: list | None = [] if distill else None
    for i, (ex, r) in enumerate(zip(examples, recon)):
        if r:
            contexts, lab = ex.context_ids[:1], ex.labels[:1]
            prompt, answer, teacher = ex.recon_prompt_ids, ex.recon_answer_ids, ex.recon_teacher_ids
            t_map = ex.recon_teacher_map
        else:
            contexts, lab = ex.context_ids, ex.labels
            prompt, answer, teacher = ex.prompt_ids, ex.answer_ids, ex.teacher_prompt_ids
            t_map = ex.teacher_map
        if maps is not None:
            maps = None if t_map is None else maps + t_map
        ctx.extend(contexts)
        n_ctx.append(len(contexts))
        ys.extend(0.0 if y is None else y for y in lab)
        mask.extend(0.0 if y is None else 1.0 for y in lab)
        ids.append(prompt + answer)
        labs.append([IGNORE_INDEX] * len(prompt) + answer)
        if distill:
            if teacher is None:
                raise ValueError(f"{ex.where}: no teacher prompt (examples were loaded without distillation)")
            t_ids.append(teacher + answer)
            t_labs.append([IGNORE_INDEX] * len(teacher) + answer)
        if sizes is not None:
            per_ctx_sizes.extend([sizes[i]] * len(contexts))
    return Batch(ctx, n_ctx, torch.tensor(ys), torch.tensor(mask), ids, labs,
                 sizes=per_ctx_sizes if sizes is not None else None,
                 teacher_ids=t_ids if distill else None, teacher_labels=t_labs if distill else None,
                 n_reconstruction=sum(recon), extra={"teacher_maps": maps} if maps is not None else {})
