"""Teacher LLM backends for data synthesis: a local transformers model, or an HTTP endpoint.

A teacher takes user prompts and returns its replies, in order. ``OpenAITeacher`` speaks the
OpenAI chat-completions protocol that vLLM, SGLang, llama.cpp's server and hosted APIs serve
(standard library only; requests run concurrently, transient errors are retried with backoff).
``TransformersTeacher`` runs any causal LM through transformers with its chat template,
greedy by default, in left-padded batches.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """The teacher could not be reached or answered with something that is not a completion."""


class Teacher(Protocol):
    """Anything that answers a list of user prompts with a list of replies (same order)."""

    def complete(self, prompts: Sequence[str]) -> list[str]: ...


class OpenAITeacher:
    """A teacher behind an OpenAI-compatible ``/chat/completions`` endpoint (e.g. ``vllm serve``).

    ``base_url`` is the API root (``http://localhost:8000/v1``). The API key, if the server
    wants one, is read from ``api_key`` or the environment variable named by ``api_key_env``.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 1024, temperature: float = 0.0,
                 timeout: float = 300.0, retries: int = 4, concurrency: int = 8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.timeout, self.retries, self.concurrency = timeout, retries, max(1, concurrency)

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Replies to ``prompts``; raises TeacherError when a request keeps failing."""
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._one(p) for p in prompts]
        with ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._one, prompts))

    def _one(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return _message_text(data, self.url)
            except urllib.error.HTTPError as e:
                last = e
                if e.code not in (408, 409, 429) and e.code < 500:
                    detail = e.read().decode("utf-8", "replace")[:300]
                    raise TeacherError(f"{self.url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(min(30.0, 0.5 * 2**attempt))
        raise TeacherError(f"{self.url} failed after {self.retries + 1} attempts: {last}")


def _message_text(data: dict, url: str) -> str:
    try:
        return str(data["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise TeacherError(f"{url} returned no choices[0].message.content: {str(data)[:300]}") from None


class TransformersTeacher:
    """A local causal LM as teacher (any name ``loading`` understands; GGUF files too)."""

    def __init__(self, model: str, *, gguf_file: str | None = None, device: str | None = None,
                 dtype: str = "auto", max_new_tokens: int = 512, temperature: float = 0.0,
                 batch_size: int = 4, trust_remote_code: bool = False):
        from ..device import resolve_device, resolve_dtype
        from ..loading import load_decoder_model, load_tokenizer

        self.device = resolve_device(device)
        self.model = load_decoder_model(model, dtype=resolve_dtype(dtype, self.device), gguf_file=gguf_file,
                                        trust_remote_code=trust_remote_code).to(self.device).eval()
        self.tokenizer = load_tokenizer(model, gguf_file, trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size

    def _render(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
        return f"User: {prompt}\nAssistant:"

    @torch.inference_mode()
    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Replies to ``prompts`` (only the new text), generated in batches."""
        out: list[str] = []
        tok = self.tokenizer
        for s in range(0, len(prompts), self.batch_size):
            texts = [self._render(p) for p in prompts[s : s + self.batch_size]]
            tok.padding_side = "left"
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            kwargs = {"do_sample": self.temperature > 0, "max_new_tokens": self.max_new_tokens,
                      "pad_token_id": tok.pad_token_id}
            if self.temperature > 0:
                kwargs["temperature"] = self.temperature
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            gen = self.model.generate(**enc, **kwargs)
            out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
        return out
