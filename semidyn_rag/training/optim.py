"""The optimizer and learning-rate schedule of a training run.

Kept apart from the loop because both are pure functions of the config (and the trainable
parameters' names and shapes): the from-scratch modules (projector, density head, pooling)
may get their own rate, vectors (norms, biases) get no weight decay, and the schedule is a
function of the step alone, so a resumed run recomputes exactly the rate it would have had.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

NEW_MODULES = ("projector.", "density_head.", "pooling.")


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the from-scratch modules in their own group; no decay on vectors (norms, biases)."""
    o = config.optim
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in params:
        groups.setdefault((n.startswith(NEW_MODULES), p.dim() >= 2), []).append(p)
    param_groups = []
    for (new, decay), ps in sorted(groups.items()):
        param_groups.append({"params": ps, "lr": (o.new_modules_lr or o.lr) if new else o.lr,
                             "weight_decay": o.weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, betas=o.betas)


def lr_lambda(config: TrainConfig, total: int):
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it at ``total``."""
    warm, floor = config.optim.warmup_steps, config.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
