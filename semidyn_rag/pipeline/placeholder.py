"""Single-placeholder expansion: each placeholder token in a prompt becomes M latent rows.

The prompt holds one placeholder per context; in the decoder's input embeddings each is
replaced by that context's projected latents, in order. Padding, the attention mask and the
labels (-100 at latent and padding positions) are rebuilt for the new lengths. The whole batch
is done with index arithmetic (no per-sample splicing loop), and placeholder ids are never
looked up in the embedding table, so a placeholder added to the tokenizer needs no new row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IGNORE_INDEX = -100


class PlaceholderCountError(ValueError):
    """A prompt holds a different number of placeholders than it has contexts."""


@dataclass
class ExpandedInputs:
    inputs_embeds: torch.Tensor  # (B, T, d)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor | None  # (B, T) or None
    latent_mask: torch.Tensor  # (B, T) True where a latent row sits


def expand_placeholders(
    token_ids: list[list[int]],
    latents: list[list[torch.Tensor]],
    placeholder_id: int,
    embedding: nn.Module,
    *,
    labels: list[list[int]] | None = None,
    padding_side: str = "left",
) -> ExpandedInputs:
    """Build decoder inputs where the k-th placeholder of row b becomes ``latents[b][k]``.

    Raises PlaceholderCountError when a row's placeholder count differs from its contexts.
    """
    if len(token_ids) != len(latents):
        raise ValueError(f"{len(token_ids)} prompts but {len(latents)} lists of contexts")
    weight = embedding.weight
    device, dtype = weight.device, weight.dtype
    lens = torch.tensor([len(t) for t in token_ids], device=device)
    flat = torch.tensor([t for row in token_ids for t in row], dtype=torch.long, device=device)
    row = torch.repeat_interleave(torch.arange(len(token_ids), device=device), lens)
    is_ph = flat == placeholder_id
    found = torch.zeros(len(token_ids), dtype=torch.long, device=device).index_add_(0, row, is_ph.long())
    for b, (f, ctx) in enumerate(zip(found.tolist(), latents)):
        if f != len(ctx):
            raise PlaceholderCountError(f"prompt {b} has {f} placeholder(s) but {len(ctx)} context(s)")

    all_lat = [x for ctx in latents for x in ctx]
    m = torch.tensor([x.shape[0] for x in all_lat], dtype=torch.long, device=device)
    if bool((m < 1).any()):
        raise ValueError("a context has no latents")
    counts = torch.ones_like(flat)
    counts[is_ph] = m
    # start of each token's span inside its own row
    excl = torch.cumsum(counts, 0) - counts
    row_first = torch.cumsum(lens, 0) - lens
    start = excl - excl[row_first][row]
    new_len = torch.zeros(len(token_ids), dtype=torch.long, device=device).index_add_(0, row, counts)
    width = int(new_len.max())
    offset = (width - new_len) if padding_side == "left" else torch.zeros_like(new_len)
    pos = start + offset[row]

    embeds = torch.zeros((len(token_ids), width, weight.shape[1]), dtype=dtype, device=device)
    tok = ~is_ph
    embeds[row[tok], pos[tok]] = embedding(flat[tok])
    lat_row = torch.repeat_interleave(row[is_ph], m)
    within = torch.arange(int(m.sum()), device=device) - torch.repeat_interleave(torch.cumsum(m, 0) - m, m)
    lat_pos = torch.repeat_interleave(pos[is_ph], m) + within
    if all_lat:
        embeds[lat_row, lat_pos] = torch.cat(all_lat).to(device=device, dtype=dtype)

    mask = torch.zeros((len(token_ids), width), dtype=torch.long, device=device)
    mask[row, pos] = 1
    mask[lat_row, lat_pos] = 1
    latent_mask = torch.zeros((len(token_ids), width), dtype=torch.bool, device=device)
    latent_mask[lat_row, lat_pos] = True

    out_labels = None
    if labels is not None:
        flat_lab = torch.tensor([t for r in labels for t in r], dtype=torch.long, device=device)
        if flat_lab.shape != flat.shape:
            raise ValueError("labels must have the same lengths as token_ids")
        out_labels = torch.full((len(token_ids), width), IGNORE_INDEX, dtype=torch.long, device=device)
        out_labels[row[tok], pos[tok]] = flat_lab[tok]
    return ExpandedInputs(embeds, mask, out_labels, latent_mask)
