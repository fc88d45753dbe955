"""This package's own checkpoint layout: the folder mirrors the pipeline; safetensors and JSON only.

::

    config.json                  {"format": "semidyn-rag", "format_version": 2, "compressor": {...}, ...}
    encoder/                     PEFT adapter (LoRA), full weights (full fine-tune), or absent (frozen)
    density_head/model.safetensors
    pooling/config.json          the pooling stage's rule (kind, candidates, end marker, alignment)
    pooling/model.safetensors    memory embeddings (the memory-token stage only)
    projector/model.safetensors
    decoder/                     PEFT adapter, full weights, or absent

Format 1 (before the pooling rule was recorded) kept memory embeddings in ``backbone/`` and
pooled text tokens only, start-aligned; such configs load with that rule, so their latents and
fingerprints (and every store built with them) stay as they were.

``export_compressor`` writes a copy whose large trained tensors are bf16 (about half the size;
what ships inside the package). Fingerprints hash weights at bf16 resolution, so the copy
keeps the source's fingerprint and every latent store built with it stays valid.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_directory, atomic_path, atomic_write_text
from ..config import CompressorConfig
from ..pipeline.pooling import LEGACY_MEAN_RULE
from .errors import CheckpointError, load_state, read_json, require

FORMAT = "semidyn-rag"
FORMAT_VERSION = 2


def is_own(raw: dict) -> bool:
    return raw.get("format") == FORMAT


def save_compressor(comp, path) -> None:
    """Write ``comp`` to ``path`` in the own layout (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # where it ran is not part of the checkpoint (a CPU-built compressor loads onto a GPU), and
    # neither is permission to run remote code: only the caller who loads it can give that
    cfg = comp.config.model_copy(update={"device": None, "dtype": "auto", "trust_remote_code": False})
    for name, mode, model in (("encoder", cfg.encoder_training, comp.encoder.model),
                              ("decoder", cfg.decoder_training, comp.decoder.model)):
        if mode in ("lora", "full"):
            model.save_pretrained(path / name)
    save_module(comp.density_head, path / "density_head")
    save_module(comp.projector, path / "projector")
    comp.pooling.save(path / "pooling")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "compressor": cfg.model_dump(mode="json"),
            "fingerprint": comp.fingerprint, "feature_fingerprint": comp.feature_fingerprint}
    atomic_write_text(path / "config.json", json.dumps(meta, indent=2))


def own_config(path: Path, raw: dict, overrides: dict) -> CompressorConfig:
    """The config a saved own-layout checkpoint describes, with the caller's overrides.

    A checkpoint never turns remote code on (only an explicit ``trust_remote_code=True`` from the
    caller does), and a format-1 config gets the pooling rule it was trained with.
    """
    version = raw.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer semidyn-rag (format {version!r})")
    stored = raw.get("compressor")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path / 'config.json'} has no 'compressor' settings")
    stored = {k: v for k, v in stored.items() if k != "trust_remote_code"}
    if version < 2:
        stored = {**LEGACY_MEAN_RULE, **stored}
    try:
        return CompressorConfig.model_validate({**stored, **overrides})
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'} holds invalid compressor settings: {e}") from None


def load_own_weights(comp, path: Path) -> None:
    """Put the head, projector and pooling weights saved under ``path`` into ``comp``."""
    load_module(comp.density_head, path / "density_head", "density head")
    load_module(comp.projector, path / "projector", "projector")
    folder = path / "pooling" if (path / "pooling").is_dir() else path / "backbone"  # format 1: backbone/
    try:
        comp.pooling.load(folder)
    except (ValueError, RuntimeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"the pooling stage in {folder} does not load: {e}") from None


def save_module(module: nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))


def load_module(module: nn.Module, folder: Path, what: str) -> None:
    file = folder / "model.safetensors"
    require(file, what)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); the checkpoint is damaged") from None
    load_state(module, state, str(file))


# Tensors smaller than this stay fp32 in an export (LoRA matrices are r x d, a few thousand
# elements and up, so they are cast): norms and the density head cost nothing, and
# the head's precision decides factors near a selector boundary.
_KEEP_FP32_BELOW = 2048


@dataclass(frozen=True)
class ExportReport:
    """What ``export_compressor`` wrote: sizes before and after, and the tensors it cast."""

    path: Path
    bytes_before: int
    bytes_after: int
    tensors_cast: int
    tensors_kept: int


def export_compressor(src, dst, *, overwrite: bool = False, keep_fp32_below: int = _KEEP_FP32_BELOW) -> ExportReport:
    """Copy the checkpoint at ``src`` (own layout) to ``dst`` with float tensors in bf16.

    Tensors with fewer than ``keep_fp32_below`` elements stay fp32.
    Raises CheckpointError for an authors'-layout or foreign folder, or an existing ``dst``
    (unless ``overwrite``). ``dst`` appears complete or not at all.
    """
    src, dst = Path(src), Path(dst)
    raw = read_json(src / "config.json", "compressor checkpoint config")
    if not is_own(raw):
        raise CheckpointError(f"{src} is not in the semidyn-rag layout (the authors' layout is read-only)")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    cast = kept = before = after = 0
    with atomic_directory(dst) as tmp:
        for file in sorted(src.rglob("*")):
            if not file.is_file():
                continue
            out = tmp / file.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            before += file.stat().st_size
            if file.suffix == ".safetensors":
                state = load_file(str(file))
                for k, v in state.items():
                    if v.is_floating_point() and v.numel() >= keep_fp32_below:
                        state[k] = v.to(torch.bfloat16)
                        cast += 1
                    else:
                        kept += 1
                save_file(state, str(out))
            elif file.name == "config.json" and file.parent == src:
                out.write_text(json.dumps({**raw, "weights_dtype": "bfloat16"}, indent=2))
            else:
                shutil.copy2(file, out)
            after += out.stat().st_size
    return ExportReport(dst, before, after, cast, kept)
