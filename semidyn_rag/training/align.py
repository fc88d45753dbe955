"""Hidden-state alignment: the student reading latents should think what the base decoder thinks reading text.

A no-grad pass of the base decoder (adapters disabled) over the plain-text prompt gives, at
each chosen layer, a state for every context token. The student (the same decoder with its
adapters, reading the prompt with the contexts as latents) is pulled toward them:

* at latent row ``i`` of a context, toward the mean of the teacher's states over the context
  tokens in window ``i`` (the pooling stage says which window each token falls in;
  ``PoolingStage.window_index``), each token counted once;
* at the question and answer tokens (the longest run of tokens that ends both sequences the
  same way, after the last context), toward the teacher's state at the same token.

Every context token is a target at every chosen layer, the student's sequence stays short, and
no QA label is needed. The distance per row is ``nmse`` (``|s - t|^2 / |t|^2``, scale-free
across layers whose norms grow with depth) or ``cosine`` (``1 - cos(s, t)``), averaged over
the chosen layers; the loss is its mean over all aligned rows.

The end marker: a pooling rule may pool the appended end marker with the last window, but the
teacher's prompt has no end marker there. A window's target is the mean of the teacher's
states at the window's *text* tokens only; a window that holds the end marker alone has no
target and is left out.

Encoder and decoder may tokenize differently: teacher tokens are mapped to encoder positions
by character offsets (a teacher token belongs to the encoder token holding its last
character), which needs fast tokenizers on both sides.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# A context's teacher-to-encoder map: (teacher position in the prompt, encoder token index) pairs.
ContextMap = list[tuple[int, int]]


def teacher_alignment(dec_tokenizer, enc_tokenizer, prompt: str, placeholder: str, contexts: Sequence[str],
                      context_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[ContextMap]]:
    """The teacher prompt's ids (contexts as text) and, per context, where its tokens sit.

    ``prompt`` is the rendered decoder prompt with one ``placeholder`` per context;
    ``context_ids`` the encoder's ids of each context (possibly truncated). Returns ids equal
    to tokenizing the filled prompt without special tokens. Raises ValueError when a tokenizer
    gives no character offsets or the placeholder count is wrong.
    """
    parts = prompt.split(placeholder)
    if len(parts) != len(contexts) + 1:
        raise ValueError(f"prompt has {len(parts) - 1} placeholders for {len(contexts)} contexts")
    text, spans = parts[0], []
    for ctx, after in zip(contexts, parts[1:]):
        spans.append((len(text), len(text) + len(ctx)))
        text += ctx + after
    ids, offsets = _with_offsets(dec_tokenizer, text, "decoder")
    maps: list[ContextMap] = []
    for (c0, c1), ctx, enc_ids in zip(spans, contexts, context_ids):
        e_ids, e_off = _with_offsets(enc_tokenizer, ctx, "encoder")
        n = len(enc_ids)
        if list(e_ids[:n]) != list(enc_ids):
            raise ValueError("the encoder tokenizer gives other ids with offsets than without")
        starts = [s for s, _ in e_off[:n]]
        pairs = []
        for pos, (s, e) in enumerate(offsets):
            last = e - 1
            if e <= s or not c0 <= last < c1:
                continue  # a special token, or not this context's text
            j = max(0, bisect.bisect_right(starts, last - c0) - 1)
            if j < n and (j + 1 < n or last - c0 < e_off[n - 1][1]):  # past a truncated end: no window
                pairs.append((pos, j))
        maps.append(pairs)
    return ids, maps


def _with_offsets(tokenizer, text: str, which: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"hidden-state alignment needs a fast {which} tokenizer (character offsets); "
                         f"{type(tokenizer).__name__} is not one")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Indices into ``hidden_states`` (0 = embeddings, k = output of layer k; -1 = the last).

    None means every layer 1..n. Raises ValueError for an index out of range.
    """
    if layers is None:
        return list(range(1, n_layers + 1))
    out = []
    for x in layers:
        k = n_layers + 1 + x if x < 0 else x
        if not 0 <= k <= n_layers:
            raise ValueError(f"hidden_align_layers: {x} is not a layer of a {n_layers}-layer decoder "
                             f"(0 = embeddings, 1..{n_layers}, or negative from the end)")
        out.append(k)
    return sorted(set(out))


@dataclass
class AlignmentSums:
    """Summed per-row distances and row counts (latent rows and question/answer tokens)."""

    loss_sum: torch.Tensor
    n_latent_rows: int
    n_token_rows: int

    @property
    def n_rows(self) -> int:
        return self.n_latent_rows + self.n_token_rows


def alignment_sums(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], *, latent_mask: torch.Tensor,
                   student_lengths: torch.Tensor, teacher_lengths: torch.Tensor, n_latents: Sequence[int],
                   n_contexts: Sequence[int], windows: Sequence[torch.Tensor], maps: Sequence[ContextMap],
                   suffix: Sequence[int], metric: str) -> AlignmentSums:
    """Sum of per-row distances between student and teacher states over all aligned rows.

    ``student``/``teacher``: the chosen layers' states, (B, T, d) each, right-padded;
    ``latent_mask`` (B, T) marks the student's latent rows, contexts in order; per context
    (all samples' contexts in order) ``n_latents``, ``windows`` (pooled position -> row, from
    the pooling stage) and ``maps`` (teacher position, encoder position); ``suffix[b]`` the
    number of trailing tokens both sequences of sample ``b`` share.
    """
    device = student[0].device
    s_rows, t_rows = [], []  # (batch index, position) pairs
    t_means_idx: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    k = 0
    n_lat_rows = 0
    for b, n_ctx in enumerate(n_contexts):
        lat_pos = latent_mask[b].nonzero().squeeze(-1)
        off = 0
        for _ in range(n_ctx):
            m, win, pairs = n_latents[k], windows[k], maps[k]
            rows = lat_pos[off : off + m]
            off += m
            k += 1
            if not pairs:
                continue
            t_pos = torch.tensor([p for p, _ in pairs], device=device)
            w = win.to(device)[torch.tensor([e for _, e in pairs], device=device)]
            present = torch.zeros(m, dtype=torch.bool, device=device)
            present[w] = True
            # windows with a text token have a target; an end-marker-only window has none
            keep = present.nonzero().squeeze(-1)
            t_means_idx.append((b, t_pos, w, rows[keep]))
            n_lat_rows += len(keep)
        if off != len(lat_pos):
            raise RuntimeError(f"sample {b}: {len(lat_pos)} latent rows but its contexts have {off}")
        n = int(suffix[b])
        if n:
            ls, lt = int(student_lengths[b]), int(teacher_lengths[b])
            s_rows.append((b, torch.arange(ls - n, ls, device=device)))
            t_rows.append((b, torch.arange(lt - n, lt, device=device)))
    n_tok_rows = sum(len(p) for _, p in s_rows)
    total = student[0].new_zeros(())
    for s_h, t_h in zip(student, teacher):
        preds, targets = [], []
        for b, t_pos, w, rows in t_means_idx:
            m = int(w.max()) + 1
            sums = t_h.new_zeros((m, t_h.shape[-1])).index_add_(0, w, t_h[b, t_pos].float())
            cnt = torch.zeros(m, device=device).index_add_(0, w, torch.ones(len(w), device=device))
            kept = cnt > 0
            targets.append(sums[kept] / cnt[kept, None])
            preds.append(s_h[b, rows])
        for (b, sp), (_, tp) in zip(s_rows, t_rows):
            preds.append(s_h[b, sp])
            targets.append(t_h[b, tp])
        if preds:
            total = total + row_distance(torch.cat(preds).float(), torch.cat(targets).float(), metric).sum()
    loss_sum = total / max(1, len(student))
    return AlignmentSums(loss_sum, n_lat_rows, n_tok_rows)


def row_distance(pred: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-row distance: ``nmse`` = |p - t|^2 / |t|^2, ``cosine`` = 1 - cos(p, t)."""
    if metric == "nmse":
        return ((pred - target) ** 2).sum(-1) / (target**2).sum(-1).clamp(min=1e-6)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    raise ValueError(f"unknown alignment metric {metric!r}; use 'nmse' or 'cosine'")


def shared_suffix(student_ids: Sequence[int], teacher_ids: Sequence[int], stop_id: int) -> int:
    """How many trailing tokens the two sequences share, stopping at the student's ``stop_id``."""
    n = 0
    for a, b in zip(reversed(student_ids), reversed(teacher_ids)):
        if a != b or a == stop_id:
            break
        n += 1
    return n
