"""The one place that knows checkpoint layouts: this package's own, and the authors' release.

Own layout (the folder mirrors the pipeline; safetensors and JSON only)::

    config.json                  {"format": "semidyn-rag", "compressor": {...}, "fingerprint": ...}
    encoder/                     PEFT adapter (LoRA), full weights (full fine-tune), or absent (frozen)
    density_head/model.safetensors
    backbone/model.safetensors   compression-token embeddings (that backbone only)
    projector/model.safetensors
    decoder/                     PEFT adapter, full weights, or absent

``export_compressor`` writes a copy whose large trained tensors are bf16 (about half the size;
what ships inside the package). Fingerprints hash weights at bf16 resolution, so the copy
keeps the source's fingerprint and every latent store built with it stays valid.

Authors' layout (read only): ``config.json`` with ``comp_ratio_or_len``,
``feature_extract_method`` etc., ``encoder/`` and ``decoder/`` PEFT adapters, and a torch-saved
``projector.pth`` holding ``{"projector": ..., "compress_ratio_head": ...}``, loaded with
``weights_only=True`` so no pickled code can run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_directory, atomic_path, atomic_write_text
from .config import CompressorConfig

FORMAT = "semidyn-rag"
FORMAT_VERSION = 1

_AUTHORS_BACKBONES = {
    "mean_pooling": ("mean_pool", True),
    "mean_pooling_causal": ("mean_pool", False),
    "last_tokens": ("last_tokens", False),
    "same_memory_tokens": ("compression_tokens", False),
    "different_memory_tokens": ("compression_tokens", False),
}
_AUTHORS_TRAINING = {"lora": "lora", "none": "frozen", "frozen": "frozen", "full": "full"}


class CheckpointError(ValueError):
    """A checkpoint folder is missing parts, or does not fit the models it is loaded onto."""


def save_compressor(comp, path) -> None:
    """Write ``comp`` to ``path`` in the own layout (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # where it ran is not part of the checkpoint: a CPU-built compressor loads onto a GPU
    cfg = comp.config.model_copy(update={"device": None, "dtype": "auto"})
    for name, mode, model in (("encoder", cfg.encoder_training, comp.encoder.model),
                              ("decoder", cfg.decoder_training, comp.decoder.model)):
        if mode in ("lora", "full"):
            model.save_pretrained(path / name)
    _save_module(comp.density_head, path / "density_head")
    _save_module(comp.projector, path / "projector")
    if any(True for _ in comp.backbone.parameters()):
        _save_module(comp.backbone, path / "backbone")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "compressor": cfg.model_dump(mode="json"),
            "fingerprint": comp.fingerprint, "feature_fingerprint": comp.feature_fingerprint}
    atomic_write_text(path / "config.json", json.dumps(meta, indent=2))


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
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{src} has no config.json: not a compressor checkpoint")
    raw = json.loads(cfg_file.read_text())
    if raw.get("format") != FORMAT:
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


def load_compressor(cls, path_or_id: str, *, check_fingerprint: bool = True, is_trainable: bool = False,
                    **overrides):
    """Load a compressor from a local folder or hub id, in either layout."""
    path = _resolve(path_or_id)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a compressor checkpoint")
    raw = json.loads(cfg_file.read_text())
    if "comp_ratio_or_len" in raw:
        return _load_authors(cls, path, raw, is_trainable=is_trainable, **overrides)
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file} is neither a semidyn-rag nor an authors' checkpoint config")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer semidyn-rag (format {raw['format_version']})")
    from .compressor import with_overrides

    config = with_overrides(CompressorConfig.model_validate(raw["compressor"]), **overrides)
    comp = _assemble(cls, config, path, is_trainable)
    _load_module(comp.density_head, path / "density_head", "density head")
    _load_module(comp.projector, path / "projector", "projector")
    if any(True for _ in comp.backbone.parameters()):
        _load_module(comp.backbone, path / "backbone", "compression tokens")
    comp.to(device=comp.device, dtype=comp.dtype)
    if check_fingerprint and comp.fingerprint != raw.get("fingerprint"):
        raise CheckpointError(
            f"{path} was saved from base models other than {config.encoder!r} / {config.decoder!r} "
            f"(fingerprint {comp.fingerprint} != {raw.get('fingerprint')}); pass the models it was trained "
            "on, or check_fingerprint=False to load it anyway"
        )
    return comp


def _assemble(cls, config: CompressorConfig, path: Path | None, is_trainable: bool):
    """Load base models for ``config`` and put the saved adapters (or full weights) on them."""
    from .device import resolve_device, resolve_dtype
    from .loading import load_decoder_model, load_encoder_model, load_tokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    models = {}
    for side, loader in (("encoder", load_encoder_model), ("decoder", load_decoder_model)):
        mode = getattr(config, f"{side}_training")
        sub = path / side if path is not None else None
        kwargs = {"dtype": dtype, "trust_remote_code": config.trust_remote_code,
                  "gguf_file": getattr(config, f"{side}_gguf_file")}
        if side == "encoder":
            kwargs["num_layers"] = config.encoder_num_layers
        if mode == "full":
            _require(sub, f"{side} weights")
            kwargs.pop("gguf_file")
            model = loader(str(sub), **kwargs)
            model.requires_grad_(is_trainable)
        else:
            model = loader(getattr(config, side), **kwargs)
            model.requires_grad_(False)
            if mode == "lora":
                from peft import PeftModel

                _require(sub, f"{side} adapter")
                try:
                    model = PeftModel.from_pretrained(model, str(sub), is_trainable=is_trainable)
                except RuntimeError as e:
                    first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:300])
                    raise CheckpointError(
                        f"the {side} adapter in {sub} does not fit {getattr(config, side)!r} "
                        f"(encoder/decoder sizes differ from training): {first}"
                    ) from None
        models[side] = model
    enc_tok = load_tokenizer(config.encoder, config.encoder_gguf_file, config.trust_remote_code)
    dec_tok = load_tokenizer(config.decoder, config.decoder_gguf_file, config.trust_remote_code)
    return cls.from_models(config, models["encoder"], enc_tok, models["decoder"], dec_tok, wrap_lora=False)


def _load_authors(cls, path: Path, raw: dict, *, is_trainable: bool, **overrides):
    """Read the authors' released layout into this package's compressor."""
    method = raw.get("feature_extract_method", "mean_pooling")
    if method not in _AUTHORS_BACKBONES:
        raise CheckpointError(f"unknown feature_extract_method {method!r} in {path / 'config.json'}")
    backbone, bidirectional = _AUTHORS_BACKBONES[method]
    cands = [float(x) for x in raw["comp_ratio_or_len"]]
    try:
        enc_mode = _AUTHORS_TRAINING[raw.get("encoder_training", "lora")]
        dec_mode = _AUTHORS_TRAINING[raw.get("decoder_training", "lora")]
    except KeyError as e:
        raise CheckpointError(f"unsupported training mode {e} in {path / 'config.json'}") from None
    proj_file = path / "projector.pth"
    _require(proj_file, "projector.pth")
    # weights_only: refuses anything but tensors and plain containers (no pickled code).
    state = torch.load(proj_file, map_location="cpu", weights_only=True)
    if not {"projector", "compress_ratio_head"} <= set(state):
        raise CheckpointError(f"{proj_file} lacks 'projector' or 'compress_ratio_head'")
    fields = dict(
        encoder=raw.get("base_encoder_model_path"), decoder=raw.get("base_decoder_model_path"),
        backbone=backbone, bidirectional=bidirectional,
        rounding=raw.get("discretize_ratio_mode", "round"),
        compare_space="log" if raw.get("discretize_compare_in_log") else "linear",
        projector_hidden_size=int(raw.get("mlp_converter_hidden_dim", state["projector"]["up_proj.weight"].shape[0])),
        projector_gated="gate_proj.weight" in state["projector"],
        encoder_training=enc_mode, decoder_training=dec_mode,
    )
    if backbone == "mean_pool":
        fields["factors"] = tuple(int(round(1 / c)) if c <= 1 else int(c) for c in cands)
    else:
        fields["lengths"] = tuple(int(c) for c in cands)
    fields.update(overrides)
    if not fields.get("encoder") or not fields.get("decoder"):
        raise CheckpointError("the checkpoint names no base models; pass encoder= and decoder=")
    from .loading import load_tokenizer

    dec_tok = load_tokenizer(fields["decoder"], fields.get("decoder_gguf_file"))
    if "placeholder_token_id" in raw and "placeholder_token" not in overrides:
        fields["placeholder_token"] = dec_tok.convert_ids_to_tokens(int(raw["placeholder_token_id"]))
    config = CompressorConfig.model_validate(fields)
    comp = _assemble(cls, config, path, is_trainable)
    _load_state(comp.projector, state["projector"], "projector.pth:projector")
    _load_state(comp.density_head, state["compress_ratio_head"], "projector.pth:compress_ratio_head")
    if backbone == "compression_tokens":
        begin = raw.get("memory_token_begin_id")
        if begin is None:
            raise CheckpointError("memory-token checkpoint without memory_token_begin_id")
        n = comp.backbone.max_len
        ids = torch.arange(begin, begin + n) if method == "different_memory_tokens" else torch.full((n,), begin)
        emb = comp.encoder.input_embeddings().weight.detach()
        comp.backbone.memory.data.copy_(emb[ids.to(emb.device)])
    comp.to(device=comp.device, dtype=comp.dtype)
    return comp


def _resolve(path_or_id: str) -> Path:
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    if os.environ.get("HF_HUB_OFFLINE") == "1" or str(path_or_id).startswith((".", "/", "~")):
        raise CheckpointError(f"no checkpoint folder at {path_or_id}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id)))


def _require(path: Path | None, what: str) -> None:
    if path is None or not path.exists():
        raise CheckpointError(f"checkpoint is missing its {what} ({path})")


def _save_module(module: nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))


def _load_module(module: nn.Module, folder: Path, what: str) -> None:
    file = folder / "model.safetensors"
    _require(file, what)
    _load_state(module, load_file(str(file)), str(file))


def _load_state(module: nn.Module, state: dict, where: str) -> None:
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
