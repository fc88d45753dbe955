"""The density head: a linear regression from the end marker's state to log2(compression factor).

The encoder reads the chunk plus an appended end marker; the marker's final hidden state
summarises the whole chunk, and one linear layer on it predicts y_hat = log2(factor), which the
selector turns into a discrete size. Trained with an MSE against labels from teacher summaries.
"""

from __future__ import annotations

import torch
from torch import nn


class DensityHead(nn.Linear):
    """Linear regression from the eos hidden state to y_hat = log2(compression factor).

    Starts at a constant prediction of ``init_y`` (the middle of the candidate set), so an
    untrained compressor picks a middling factor rather than an arbitrary one. Its parameters
    are ``weight`` and ``bias``, as in the authors' ``compress_ratio_head``.
    """

    def __init__(self, d_in: int, init_y: float = 3.0):
        super().__init__(d_in, 1)
        nn.init.zeros_(self.weight)
        nn.init.constant_(self.bias, init_y)

    def forward(self, eos_state: torch.Tensor) -> torch.Tensor:
        return super().forward(eos_state).squeeze(-1)
