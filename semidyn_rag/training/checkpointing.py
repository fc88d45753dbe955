"""Training checkpoints: the one place that knows a ``checkpoints/step-NNNNNNNN/`` folder.

A checkpoint holds the trainable weights (``trainable.safetensors``), the optimizer
(``optimizer.pt``), the scheduler (``scheduler.json``), the RNG states of every process
(``rng-rankR.pt`` / ``.json``), the step and config (``trainer_state.json``) and a loadable
``compressor/``. It is written to a temporary folder and renamed, so a crash mid-save leaves the
previous one; old ones are rotated out. Restoring all of it is what lets a resumed run continue
exactly as the uninterrupted one would (the data order and every draw are functions of seed and step).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .runtime import barrier

logger = logging.getLogger(__name__)

# Config keys that may change between a run and its resumption without breaking exactness.
RESUME_FREE = {"output_dir", "resume", "eval_every", "save_every", "keep_checkpoints", "log_every", "progress"}


def write_checkpoint(ckpts: Path, step: int, state: dict, comp, params: list[tuple[str, torch.nn.Parameter]],
                     optimizer: torch.optim.Optimizer, scheduler, *, rank: int, world: int,
                     keep: int | None) -> Path:
    """Write ``ckpts/step-N`` atomically, keeping the newest ``keep``; returns its folder.

    Every process writes its RNG state; the main process (rank 0) writes the rest.
    """
    is_main = rank == 0
    final = ckpts / f"step-{step:08d}"
    tmp = ckpts / f".step-{step:08d}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    save_rng(tmp / f"rng-rank{rank}")
    barrier(world)
    if is_main:
        save_file({n: p.detach().contiguous().cpu() for n, p in params}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        comp.save_pretrained(tmp / "compressor")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(ckpts, keep)
    barrier(world)
    return final


def prune_checkpoints(ckpts: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints (None keeps all)."""
    if keep is None:
        return
    for old in sorted(ckpts.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(out: Path, how: str) -> Path | None:
    """The checkpoint ``resume`` names: None for ``never`` (or ``auto`` with none yet), the newest
    for ``auto``, else the given folder; raises FileNotFoundError if that is not a checkpoint."""
    if how == "never":
        return None
    if how == "auto":
        found = sorted((out / "checkpoints").glob("step-*"))
        if not found:
            return None
        return found[-1]
    path = Path(how)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no trainer_state.json)")
    return path


def restore_checkpoint(path: Path, config: dict, params: list[tuple[str, torch.nn.Parameter]],
                       optimizer: torch.optim.Optimizer, scheduler, *, rank: int, world: int,
                       device: torch.device) -> dict:
    """Load weights, optimizer, scheduler and this process's RNG from ``path``; returns its trainer state.

    Raises ValueError if it was written by another number of processes or does not fit the
    trainable weights; warns (the run is then no longer exact) if ``config`` changed.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != world:
        raise ValueError(f"{path} was written by {state['world_size']} process(es); this run has {world} "
                         "(the data shards would differ)")
    changed = changed_keys(state.get("config", {}), config)
    if changed:
        logger.warning("resuming %s with a changed config (%s): the run is no longer an exact "
                       "continuation", path, ", ".join(changed))
    weights = load_file(str(path / "trainable.safetensors"))
    names = {n for n, _ in params}
    if set(weights) != names:
        missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
        raise ValueError(f"{path} does not fit this model's trainable weights: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for n, p in params:
            p.copy_(weights[n].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = path / f"rng-rank{rank}"
    load_rng(rng)
    return state


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ, except those in RESUME_FREE."""
    out = []
    for k in sorted(set(old) | set(new)):
        if not prefix and k in RESUME_FREE:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


def save_rng(stem: Path) -> None:
    """Write torch's (and CUDA's) RNG states to ``stem.pt``, Python's and NumPy's to ``stem.json``."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    torch.save(tensors, stem.with_suffix(".pt"))
    py = random.getstate()
    npy = np.random.get_state()
    stem.with_suffix(".json").write_text(json.dumps({
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }))


def load_rng(stem: Path) -> None:
    """Restore the states ``save_rng`` wrote; raises FileNotFoundError without ``stem.pt``."""
    if not stem.with_suffix(".pt").is_file():
        raise FileNotFoundError(f"no RNG state {stem}.pt in the checkpoint")
    tensors = torch.load(stem.with_suffix(".pt"), weights_only=True)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    js = json.loads(stem.with_suffix(".json").read_text())
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
