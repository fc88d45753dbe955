"""The converter between encoder and decoder: RMSNorm -> Linear -> GELU -> Linear.

Parameter names (``rms_norm``, ``up_proj``, ``gate_proj``, ``down_proj``) match the authors'
released ``projector.pth`` so their weights load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """Maps pooled encoder states (d_in) into the decoder's embedding space (d_out)."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 4096, gated: bool = False, eps: float = 1e-6):
        super().__init__()
        self.rms_norm = nn.RMSNorm(d_in, eps=eps)
        self.up_proj = nn.Linear(d_in, hidden, bias=False)
        self.gate_proj = nn.Linear(d_in, hidden, bias=False) if gated else None
        self.down_proj = nn.Linear(hidden, d_out, bias=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.rms_norm(x)
        if self.gate_proj is not None:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        return self.down_proj(h)
