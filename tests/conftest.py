"""Shared fixtures: tiny random Qwen3 models saved to disk once per session (no network)."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from semidyn_rag import CompressorConfig, SemiDynamicCompressor  # noqa: E402
from semidyn_rag.testing import build_tiny_model  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)

TEXTS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas, on the border of Nepal.",
    "Photosynthesis converts light energy into chemical energy.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up and leaves.",
]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and one thread avoids OpenMP stalls on a busy 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """(encoder_dir, decoder_dir): two different tiny Qwen3 models with their tokenizers."""
    root = tmp_path_factory.mktemp("models")
    enc = build_tiny_model(root / "encoder", hidden_size=64, seed=1)
    dec = build_tiny_model(root / "decoder", hidden_size=96, seed=2)
    return enc, dec


@pytest.fixture(scope="session")
def tiny_config(tiny_dirs):
    enc, dec = tiny_dirs
    return CompressorConfig(encoder=str(enc), decoder=str(dec), projector_hidden_size=128, device="cpu")


@pytest.fixture
def make_compressor(tiny_config):
    """Factory: a fresh tiny compressor, config fields overridable."""

    def make(**overrides) -> SemiDynamicCompressor:
        return SemiDynamicCompressor(tiny_config, **overrides)

    return make


@pytest.fixture
def compressor(make_compressor):
    return make_compressor()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, tiny_config):
    """A saved tiny compressor checkpoint (for the commands that load one by path)."""
    path = tmp_path_factory.mktemp("ckpt") / "compressor"
    SemiDynamicCompressor(tiny_config).save_pretrained(path)
    return path
