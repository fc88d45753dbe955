"""The remote vLLM backend: a ``vllm serve MODEL --enable-prompt-embeds`` server, over its Completions API.

The encoder, latent store and token embeddings stay beside the application; only the decoder
runs on the server (a GPU fleet). Each prompt's embedding rows travel as vLLM documents them:
``torch.save`` bytes in base64 in the request's ``prompt_embeds`` field (a prompt without
latents goes as token ids). Needs no vLLM here: plain HTTP from the standard library.

On connection the backend reads ``/v1/models`` (served model, ``max_model_len``) and sends one
probe of a single embedding row, so a server without ``--enable-prompt-embeds`` or with a
decoder of another width is named at once instead of on the first question. Batches go as
concurrent requests (the server batches them); ``stream`` reads server-sent events.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .base import (
    Completion,
    DecoderBackend,
    HiddenSizeMismatchError,
    PromptEmbedsUnsupportedError,
    PromptTooLongError,
    ServingError,
    fit_new_tokens,
    incremental_text,
)
from .embeds import check_hidden_size, embeds_to_base64, prompt_embeddings
from .sampling import sampling_fields


class RemoteVLLMBackend(DecoderBackend):
    """Decodes on a vLLM server at ``url`` (e.g. ``http://gpu-host:8000``) through its Completions API.

    ``model`` picks one of the served models (default: the first). Raises ServingError when the
    server cannot be reached, PromptEmbedsUnsupportedError, HiddenSizeMismatchError.
    """

    name = "vllm-remote"

    def __init__(self, decoder, url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, max_concurrency: int = 64, embeds_dtype: torch.dtype = torch.float32,
                 check: bool = True) -> None:
        super().__init__(decoder)
        base = url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.api_key, self.timeout, self.embeds_dtype = api_key, timeout, embeds_dtype
        self.max_concurrency = max_concurrency
        models = self._request("GET", "/models").get("data") or []
        if not models:
            raise ServingError(f"the vLLM server at {url} serves no model")
        entry = models[0] if model is None else next((m for m in models if m.get("id") == model), None)
        if entry is None:
            raise ServingError(f"the vLLM server at {url} does not serve {model!r}; it serves "
                               f"{', '.join(m.get('id', '?') for m in models)}")
        self.model = entry["id"]
        self.max_model_len = entry.get("max_model_len")
        if check:
            self._probe()

    # -- HTTP ---------------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise self._error(e.code, e.read().decode(errors="replace")) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServingError(f"cannot reach the vLLM server at {self.base_url}: {reason}; is `vllm serve` "
                               f"running there?") from None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read().decode())

    def _error(self, status: int, text: str) -> ServingError:
        """The server's error response as the matching ServingError."""
        try:
            message = json.loads(text).get("error", {}).get("message") or text
        except (ValueError, AttributeError):
            message = text
        message = str(message)[:500]
        if "enable-prompt-embeds" in message or "enable_prompt_embeds" in message:
            return PromptEmbedsUnsupportedError(
                f"the vLLM server at {self.base_url} does not accept prompt embeddings: start it with "
                f"`vllm serve MODEL --enable-prompt-embeds` ({message})")
        if "hidden_size" in message:
            return HiddenSizeMismatchError(f"the vLLM server at {self.base_url} serves a decoder of another hidden "
                                           f"size than this compressor's ({self.decoder.hidden_size}): {message}")
        if "maximum context length" in message or "max_model_len" in message or "longer than" in message:
            return PromptTooLongError(f"the vLLM server at {self.base_url} refused a prompt as too long: {message}")
        return ServingError(f"the vLLM server at {self.base_url} answered {status}: {message}")

    def _probe(self) -> None:
        row = self.decoder.model.get_input_embeddings().weight[:1].detach().to("cpu", self.embeds_dtype)
        try:
            self._request("POST", "/completions", {"model": self.model, "prompt_embeds": embeds_to_base64(row),
                                                   "max_tokens": 1, "temperature": 0.0})
        except HiddenSizeMismatchError as e:
            served = _served_width(str(e))
            if served is not None:
                check_hidden_size(self.decoder, served, f"the vLLM server at {self.base_url}")
            raise

    # -- requests -----------------------------------------------------------------------------

    def _body(self, ids: Sequence[int], latents: Sequence[torch.Tensor], max_new_tokens: int, kwargs: dict,
              which: int) -> tuple[dict, int]:
        if latents:
            (e,) = prompt_embeddings(self.decoder, [ids], [latents], dtype=self.embeds_dtype)
            positions, prompt = int(e.shape[0]), {"prompt_embeds": embeds_to_base64(e)}
        else:
            positions, prompt = len(ids), {"prompt": list(ids)}
        fields = sampling_fields(fit_new_tokens(positions, max_new_tokens, self.max_model_len, which), kwargs)
        return {"model": self.model, **prompt, **fields, "return_token_ids": True}, positions

    def _one(self, ids, latents, max_new_tokens: int, kwargs: dict, which: int) -> Completion:
        body, positions = self._body(ids, latents, max_new_tokens, kwargs, which)
        t0 = time.perf_counter()
        choice = self._request("POST", "/completions", body)["choices"][0]
        total = time.perf_counter() - t0
        tokens = choice.get("token_ids")
        text = choice.get("text", "") if tokens is None else self.decoder.tokenizer.decode(tokens,
                                                                                          skip_special_tokens=True)
        return Completion(text, list(tokens or []), positions, None, total)

    def complete(self, prompt_ids: Sequence[Sequence[int]], latents: Sequence[Sequence[torch.Tensor]],
                 max_new_tokens: int = 64, **generate_kwargs) -> list[Completion]:
        """Send the prompts as concurrent requests (the server batches them); answers in order."""
        if len(prompt_ids) != len(latents):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(latents)} lists of contexts")
        if len(prompt_ids) <= 1:
            return [self._one(i, lat, max_new_tokens, generate_kwargs, 0) for i, lat in zip(prompt_ids, latents)]
        with ThreadPoolExecutor(min(self.max_concurrency, len(prompt_ids))) as pool:
            futures = [pool.submit(self._one, ids, lat, max_new_tokens, generate_kwargs, i)
                       for i, (ids, lat) in enumerate(zip(prompt_ids, latents))]
            return [f.result() for f in futures]

    def stream(self, prompt_ids: Sequence[int], latents: Sequence[torch.Tensor], max_new_tokens: int = 64,
               **generate_kwargs) -> Iterator[str]:
        """Yield text pieces as the server streams tokens (server-sent events)."""
        body, _ = self._body(prompt_ids, latents, max_new_tokens, generate_kwargs, 0)
        body["stream"] = True
        tok, tokens, sent = self.decoder.tokenizer, [], 0
        with self._open("POST", "/completions", body) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise self._error(500, json.dumps(event))
                for choice in event.get("choices", []):
                    if choice.get("token_ids") is None:  # an older server: its own text
                        if choice.get("text"):
                            yield choice["text"]
                        continue
                    tokens += choice["token_ids"]
                    piece, sent = incremental_text(tok, tokens, sent)
                    if piece:
                        yield piece
        tail = tok.decode(tokens, skip_special_tokens=True)[sent:] if tokens else ""
        if tail:
            yield tail


def _served_width(message: str) -> int | None:
    """The model's hidden size named in vLLM's mismatch message ("... the model's hidden_size N.")."""
    import re

    m = re.search(r"model's hidden_size (\d+)", message)
    return int(m.group(1)) if m else None
