"""Where a training run executes: its process group, device, precision and global seeds.

Single process on CPU or one GPU needs none of this; under ``torchrun`` (WORLD_SIZE > 1) each
process joins the group, takes its local GPU and meets the others at barriers. Kept apart from
the loop so that the loop reads the same in one process and in many.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from .config import TrainConfig


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local


def barrier(world: int) -> None:
    """Wait for every process (a no-op in a single-process run)."""
    if world > 1:
        dist.barrier()


def train_device(config: TrainConfig, local_rank: int, world: int) -> torch.device:
    """The device this process trains on: the configured one, or its local GPU under torchrun."""
    from ..device import resolve_device

    dev = resolve_device(config.compressor.device if config.init_from is None else None)
    if world > 1 and dev.type == "cuda":
        return torch.device("cuda", local_rank)
    return dev


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16; raises ValueError for bf16 asked on a non-CUDA device."""
    if precision == "fp32":
        return False
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision bf16 needs a CUDA device; on CPU bf16 runs 5-30x slower than fp32, use fp32")
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
