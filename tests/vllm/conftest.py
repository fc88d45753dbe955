"""Fixtures for the vLLM tests: a tiny compressor whose decoder vLLM's CPU kernels take, and its engine.

These tests need vLLM, which lives in its own environment (``make .venv-vllm``; ``make test``
runs them with ``.venv-vllm/bin/python``). Where vLLM is not installed they are not collected.
vLLM's CPU attention takes head sizes of 32 and up, so the decoder here is the suite's tiny
Qwen3 with 32-wide heads; its LoRA adapter is given random weights, so that a merged decoder
that dropped them would answer differently.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# small KV cache, and the engine in this process (a spawned engine core costs ~40 s to start here)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]  # run by `make test` with .venv-vllm/bin/python

MAX_MODEL_LEN = 512


def build_vllm_tiny_decoder(path, *, hidden_size: int = 96, seed: int = 2):
    """A random 2-layer Qwen3 causal LM with 32-wide heads and the suite's tokenizer, saved to ``path``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from semidyn_rag.testing import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.1,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def randomize_lora(model, seed: int = 3, scale: float = 0.05) -> None:
    """Give every LoRA B matrix random weights (fresh adapters are zero, so merging would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def vllm_compressor(tiny_dirs, tmp_path_factory):
    from semidyn_rag import CompressorConfig, SemiDynamicCompressor

    enc, _ = tiny_dirs
    dec = build_vllm_tiny_decoder(tmp_path_factory.mktemp("vllm-models") / "decoder")
    torch.manual_seed(0)
    comp = SemiDynamicCompressor(CompressorConfig(encoder=str(enc), decoder=str(dec), projector_hidden_size=128,
                                                  device="cpu", dtype="float32"))
    randomize_lora(comp.decoder.model)
    return comp


@pytest.fixture(scope="session")
def served_dir(vllm_compressor, tmp_path_factory):
    """The tiny decoder with its adapter merged, as vLLM loads it."""
    from semidyn_rag.serving import export_decoder

    out = tmp_path_factory.mktemp("served") / "decoder"
    info = export_decoder(vllm_compressor, out)
    assert info.answers_equal and info.merged_adapters
    return out


@pytest.fixture(scope="session")
def engine(vllm_compressor, served_dir):
    """One in-process vLLM engine on the merged tiny decoder, fp32, shared by the tests."""
    from semidyn_rag.serving.vllm_engine import VLLMBackend

    backend = VLLMBackend(vllm_compressor.decoder, served_dir, max_model_len=MAX_MODEL_LEN, dtype="float32")
    yield backend
    backend.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `vllm serve` (the OpenAI-compatible API server) on localhost, started and stopped by a test."""

    def __init__(self, model, log_path, *, prompt_embeds: bool = True, name: str = "tiny-decoder") -> None:
        import subprocess
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--dtype", "float32"]
        if prompt_embeds:
            cmd.append("--enable-prompt-embeds")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine as vLLM ships it
        self._log = open(log_path, "wb")
        # its own process group: stopping it also stops the engine processes it spawns
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait(self, timeout: float = 400.0) -> str:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vllm serve did not come up in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        self._log.flush()
        return open(self.log_path, "rb").read()[-n:].decode(errors="replace")

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="session")
def vllm_servers(served_dir, tmp_path_factory):
    """(url with prompt embeddings, url without): two real servers, started together, stopped at the end."""
    logs = tmp_path_factory.mktemp("vllm-serve")
    servers = [Server(served_dir, logs / "embeds.log"), Server(served_dir, logs / "plain.log", prompt_embeds=False)]
    try:
        urls = tuple(s.wait() for s in servers)
        yield urls
    finally:
        for s in servers:
            s.stop()
