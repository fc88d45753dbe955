"""The one place that knows checkpoint layouts: this package's own, and the authors' release.

``load_compressor`` finds the folder (local path, or hub id plus optional subfolder), reads
its ``config.json``, and hands it to the layout that wrote it: :mod:`.own` for semidyn-rag
checkpoints, :mod:`.authors` for the authors' ``CtxComp*`` checkpoints (read only). Both build
the compressor through the same model-loading path (:func:`semidyn_rag.loading.load_models`).
A checkpoint never switches remote code on; only the caller's ``trust_remote_code=True`` can.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..loading import ModelLoadError, load_models
from .authors import authors_config, is_authors, load_authors_weights, weights_folder
from .errors import CheckpointError, read_json
from .own import ExportReport, export_compressor, is_own, load_own_weights, own_config, save_compressor

__all__ = ["CheckpointError", "ExportReport", "export_compressor", "load_compressor", "save_compressor"]


def load_compressor(cls, path_or_id: str, *, subfolder: str | None = None, check_fingerprint: bool = True,
                    is_trainable: bool = False, **overrides):
    """Load a compressor from a local folder or a hub id (``subfolder`` inside it), in either layout.

    ``overrides`` replace config fields (``device``, or ``encoder``/``decoder`` to point at
    local copies of the base models). Raises CheckpointError for a missing, damaged or
    mismatched checkpoint.
    """
    from ..device import resolve_device, resolve_dtype

    path = resolve_checkpoint(path_or_id, subfolder)
    raw = read_json(path / "config.json", "compressor checkpoint config")
    if is_own(raw):
        config = own_config(path, raw, overrides)
    elif is_authors(raw):
        config = authors_config(path, raw, overrides)
    else:
        raise CheckpointError(f"{path / 'config.json'} is neither a semidyn-rag nor an authors' checkpoint config")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    # the authors' older checkpoints keep the weights in embed_model/ and gen_model/
    folders = {side: path / side if is_own(raw) else weights_folder(path, side) for side in ("encoder", "decoder")}
    for side, folder in folders.items():
        if getattr(config, f"{side}_training") in ("lora", "full") and not folder.is_dir():
            raise CheckpointError(f"checkpoint is missing its {side} weights ({folder})")
    try:
        parts = load_models(config, dtype, weights=folders, is_trainable=is_trainable)
    except ModelLoadError as e:
        raise CheckpointError(str(e)) from None
    comp = cls.from_models(config, *parts, wrap_lora=False)
    if is_own(raw):
        load_own_weights(comp, path)
    else:
        load_authors_weights(comp, path, raw)
    comp.to(device=comp.device, dtype=comp.dtype)
    if is_own(raw) and check_fingerprint and comp.fingerprint != raw.get("fingerprint"):
        raise CheckpointError(
            f"{path} was saved from base models other than {config.encoder!r} / {config.decoder!r} "
            f"(fingerprint {comp.fingerprint} != {raw.get('fingerprint')}); pass the models it was trained "
            "on, or check_fingerprint=False to load it anyway"
        )
    return comp


def resolve_checkpoint(path_or_id: str, subfolder: str | None = None) -> Path:
    """The local folder of a checkpoint: ``path_or_id`` itself, or a hub snapshot of it.

    A hub id downloads only ``subfolder`` (when given). Raises CheckpointError when neither a
    local folder nor (offline) a cached snapshot exists.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        path = path / subfolder if subfolder else path
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint folder at {path}")
        return path
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise CheckpointError(f"no checkpoint folder at {path_or_id} (and it is not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download

    pattern = f"{subfolder.strip('/')}/*" if subfolder else None
    try:
        root = Path(snapshot_download(str(path_or_id), allow_patterns=pattern,
                                      local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as e:  # offline without a cached copy, unknown repo, network failure
        raise CheckpointError(f"cannot fetch checkpoint {path_or_id!r}"
                              f"{f' (subfolder {subfolder!r})' if subfolder else ''} from the hub: "
                              f"{type(e).__name__}: {e}") from None
    out = root / subfolder if subfolder else root
    if not (out / "config.json").is_file():
        raise CheckpointError(f"hub checkpoint {path_or_id!r} has no config.json under {subfolder or 'its root'!r}")
    return out
