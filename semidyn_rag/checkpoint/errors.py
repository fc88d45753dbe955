"""Checkpoint errors and the checks every layout shares: readable JSON, present parts, fitting tensors.

Each failure names the file and the problem, so a damaged or foreign checkpoint is reported
as such instead of surfacing as a traceback from deep inside a loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint folder is missing parts, is damaged, or does not fit the models it is loaded onto."""


def read_json(file: Path, what: str) -> dict:
    """The JSON object in ``file``; raises CheckpointError when it is missing, unreadable or not an object."""
    if not file.is_file():
        raise CheckpointError(f"{file.parent} has no {file.name}: not a {what}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the {what} is damaged") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a {type(raw).__name__}, not a JSON object: not a {what}")
    return raw


def require(path: Path | None, what: str) -> None:
    if path is None or not path.exists():
        raise CheckpointError(f"checkpoint is missing its {what} ({path})")


def torch_load_tensors(file: Path) -> dict:
    """A torch-saved dict of tensors, with ``weights_only=True`` so no pickled code can run."""
    require(file, file.name)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for refused globals, RuntimeError for damage
        raise CheckpointError(
            f"{file} was refused: only plain tensors and containers are loaded from .pth files "
            f"(weights_only=True), and this one holds something else or is damaged ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of tensors")
    return state


def load_state(module: nn.Module, state: dict, where: str) -> None:
    """Load ``state`` into ``module``, naming every missing, unexpected or mis-shaped tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        raise CheckpointError(
            f"{where} does not fit this compressor (encoder/decoder sizes differ from training?): "
            + "; ".join(filter(None, [missing and f"missing {missing}", extra and f"unexpected {extra}",
                                      shapes and "shape mismatch " + ", ".join(sorted(shapes))]))
        )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
