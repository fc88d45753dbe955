"""The in-process vLLM backend: a vLLM engine fed with prompt embeddings that carry the latents.

Each prompt is sent as ``{"prompt_embeds": (positions, hidden)}``, built by
:func:`~semidyn_rag.serving.embeds.prompt_embeddings` exactly as the transformers path builds
its ``inputs_embeds``; a prompt with no latents (a text baseline) goes as plain token ids, which
vLLM embeds itself with the same weights. One thread owns the engine and steps it while any
request is live, so requests from several threads (and streams) are batched together, as
vLLM's continuous batching intends; every request learns its own time to first token.

The engine serves plain weights: a LoRA-tuned decoder is merged once into a cached folder
(:func:`~semidyn_rag.serving.export.served_decoder_path`). Prefix caching is off by default:
vLLM's cache key is not documented to cover prompt embeddings, and a stale hit would answer
from another prompt's latents.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .base import (
    Completion,
    DecoderBackend,
    PromptEmbedsUnsupportedError,
    ServingError,
    fit_new_tokens,
    import_vllm,
    incremental_text,
)
from .embeds import check_hidden_size, prompt_embeddings
from .sampling import sampling_fields

logger = logging.getLogger(__name__)


class VLLMBackend(DecoderBackend):
    """A vLLM ``LLM`` engine in this process, reading latents as prompt embeddings.

    ``model`` is a folder of plain decoder weights (see ``semidyn-rag export-decoder``);
    ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``max_model_len``, ``dtype``,
    ``gpu_memory_utilization``). Raises VLLMNotInstalledError, HiddenSizeMismatchError.
    """

    name = "vllm"

    def __init__(self, decoder, model: str | Path, *, enforce_eager: bool = True,
                 enable_prefix_caching: bool = False, seed: int = 0, **engine_kwargs) -> None:
        super().__init__(decoder)
        import_vllm()
        from vllm import LLM

        self.model = str(model)
        width = _folder_hidden_size(self.model)
        if width is not None:  # before the engine starts: a mismatch is found in milliseconds
            check_hidden_size(decoder, width, f"the model folder {self.model}")
        self.llm = LLM(model=self.model, tokenizer=self.model, enable_prompt_embeds=True, enforce_eager=enforce_eager,
                       enable_prefix_caching=enable_prefix_caching, seed=seed, **engine_kwargs)
        cfg = self.llm.llm_engine.model_config
        try:
            if not getattr(cfg, "enable_prompt_embeds", True):
                raise PromptEmbedsUnsupportedError("the vLLM engine was built without enable_prompt_embeds=True")
            check_hidden_size(decoder, cfg.get_hidden_size(), f"the vLLM engine for {self.model}")
        except ServingError:
            self._shutdown_engine()
            raise
        self.max_model_len = int(cfg.max_model_len)
        self.dtype = cfg.dtype
        self._loop = _EngineLoop(self.llm)

    @classmethod
    def for_compressor(cls, compressor, *, base: bool = False, **kwargs) -> VLLMBackend:
        """An engine serving ``compressor``'s decoder (merged adapters; ``base``: adapters left out).

        It computes in the compressor's precision unless ``dtype`` says otherwise (fp32 on a CPU,
        where vLLM would otherwise pick a half precision that answers differently).
        """
        from .export import served_decoder_path

        import_vllm()  # before exporting: no merged copy is written for an engine that cannot start
        kwargs.setdefault("dtype", str(compressor.dtype).removeprefix("torch."))
        return cls(compressor.decoder, served_decoder_path(compressor, base=base), **kwargs)

    # -- requests -----------------------------------------------------------------------------

    def _prompts(self, prompt_ids: Sequence[Sequence[int]], latents: Sequence[Sequence[torch.Tensor]]) -> list[dict]:
        if len(prompt_ids) != len(latents):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(latents)} lists of contexts")
        with_latents = [i for i, lat in enumerate(latents) if len(lat)]
        embeds = prompt_embeddings(self.decoder, [prompt_ids[i] for i in with_latents],
                                   [latents[i] for i in with_latents], dtype=self.dtype)
        prompts: list[dict] = [{"prompt_token_ids": list(r)} for r in prompt_ids]
        for i, e in zip(with_latents, embeds):
            prompts[i] = {"prompt_embeds": e}
        return prompts

    def _submit(self, prompt_ids, latents, max_new_tokens: int, generate_kwargs: dict) -> list[_Request]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        t0 = time.perf_counter()  # a request's times count from here: building its embeddings is part of them
        prompts = self._prompts(prompt_ids, latents)
        params = []
        for i, p in enumerate(prompts):
            n = _positions(p)
            fields = sampling_fields(fit_new_tokens(n, max_new_tokens, self.max_model_len, i), generate_kwargs)
            sp = SamplingParams(**fields, detokenize=bool(fields.get("stop")))
            sp.output_kind = RequestOutputKind.CUMULATIVE
            params.append(sp)
        return [self._loop.submit(p, sp, _positions(p), t0) for p, sp in zip(prompts, params)]

    def complete(self, prompt_ids: Sequence[Sequence[int]], latents: Sequence[Sequence[torch.Tensor]],
                 max_new_tokens: int = 64, **generate_kwargs) -> list[Completion]:
        """Submit every prompt at once (the engine batches them); wait for all answers."""
        requests = self._submit(prompt_ids, latents, max_new_tokens, generate_kwargs)
        out = []
        for r in requests:
            while not r.done:
                r.wait()
            out.append(self._completion(r))
        return out

    def stream(self, prompt_ids: Sequence[int], latents: Sequence[torch.Tensor], max_new_tokens: int = 64,
               **generate_kwargs) -> Iterator[str]:
        """Yield text pieces of one prompt's answer as the engine produces its tokens."""
        (r,) = self._submit([prompt_ids], [latents], max_new_tokens, generate_kwargs)
        tok, sent = self.decoder.tokenizer, 0
        try:
            while True:
                r.wait()
                piece, sent = incremental_text(tok, r.tokens, sent)
                if piece:
                    yield piece
                if r.done:
                    break
        finally:
            if not r.done and self._loop is not None:  # the reader stopped early: free the engine's slot
                self._loop.abort(r)
        tail = tok.decode(r.tokens, skip_special_tokens=True)[sent:]
        if tail:
            yield tail

    def _completion(self, r: _Request) -> Completion:
        text = self.decoder.tokenizer.decode(r.tokens, skip_special_tokens=True)
        ttft = None if r.first is None else r.first - r.t0
        return Completion(text, list(r.tokens), r.positions, ttft, (r.end or time.perf_counter()) - r.t0)

    def close(self) -> None:
        """Stop the engine thread and shut the engine (and its worker processes) down."""
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.stop()
            self._loop = None
        self._shutdown_engine()

    def _shutdown_engine(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None


def _folder_hidden_size(model: str) -> int | None:
    """The hidden size a local model folder's ``config.json`` declares (None for hub ids and unknown layouts)."""
    import json

    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    size = data.get("hidden_size") or (data.get("text_config") or {}).get("hidden_size")
    return int(size) if size else None


def _engine_in_subprocess() -> bool:
    import vllm.envs as envs

    return bool(envs.VLLM_ENABLE_V1_MULTIPROCESSING)


def _positions(prompt: dict) -> int:
    return int(prompt["prompt_embeds"].shape[0]) if "prompt_embeds" in prompt else len(prompt["prompt_token_ids"])


class _Request:
    """One submitted prompt: its tokens so far, when its first token came, and whether it is done."""

    def __init__(self, prompt: dict, params, positions: int, t0: float) -> None:
        self.prompt, self.params, self.positions = prompt, params, positions
        self.tokens: list[int] = []
        self.t0 = t0
        self.first: float | None = None
        self.end: float | None = None
        self.done = False
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._seen = 0

    def update(self, tokens: list[int] | None, finished: bool, error: BaseException | None = None) -> None:
        with self._changed:
            now = time.perf_counter()
            if tokens is not None:
                if tokens and self.first is None:
                    self.first = now
                self.tokens = tokens
            if error is not None:
                self.error = error
            if finished:
                self.done, self.end = True, now
            self._changed.notify_all()

    def wait(self) -> None:
        """Block until new tokens or the end arrive (returns at once if some are unseen); raise its error."""
        with self._changed:
            self._changed.wait_for(lambda: self.done or len(self.tokens) > self._seen)
            self._seen = len(self.tokens)
        if self.error is not None:
            raise self.error


class _EngineLoop:
    """The one thread that adds requests to the engine and steps it while any is unfinished."""

    _ids = itertools.count()

    def __init__(self, llm) -> None:
        self.llm, self.engine = llm, llm.llm_engine
        # An engine running in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) has bound OpenMP in
        # the thread that built it; vLLM's CPU attention refuses a step from a thread with another
        # OpenMP thread count, so the engine thread takes the builder's count.
        self._threads = None if _engine_in_subprocess() else torch.get_num_threads()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Request] = {}
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="semidyn-vllm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: dict, params, positions: int, t0: float) -> _Request:
        if self._dead is not None:
            raise ServingError(f"the vLLM engine stopped after an error: {self._dead}")
        r = _Request(prompt, params, positions, t0)
        self._inbox.put(r)
        return r

    def abort(self, r: _Request) -> None:
        """Drop a request nobody waits for any more (done by the engine thread)."""
        self._inbox.put(("abort", r))

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=60)

    def _add(self, r) -> None:
        if isinstance(r, tuple):  # ("abort", request)
            rid = next((k for k, v in self._live.items() if v is r[1]), None)
            if rid is not None:
                self.engine.abort_request([rid])
                del self._live[rid]
                r[1].update(None, True)
            return
        rid = f"semidyn-{next(self._ids)}"
        try:
            render = getattr(self.llm, "_preprocess_cmpl_one", None)  # vLLM >= 0.30 renders before adding
            prompt = render(r.prompt) if render is not None else r.prompt
            self.engine.add_request(rid, prompt, r.params)
        except Exception as e:  # a bad prompt fails its request only
            r.update(None, True, ServingError(f"vLLM refused the request: {e}"))
            return
        r.prompt = None  # the engine holds its own copy of the embeddings
        self._live[rid] = r

    def _run(self) -> None:
        if self._threads is not None:
            torch._C.set_num_threads(self._threads)  # vLLM replaces torch.set_num_threads in its process
        stopping = False
        while not stopping:
            if not self._live:
                item = self._inbox.get()  # idle: sleep until a request (or stop) arrives
                if item is None:
                    break
                self._add(item)
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                self._add(item)
            if stopping or not self._live:
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # the engine is gone: fail everything that waits on it
                self._dead = e
                for r in self._live.values():
                    r.update(None, True, ServingError(f"the vLLM engine failed: {e}"))
                self._live.clear()
                logger.error("vLLM engine step failed: %s", e)
                break
            for o in outputs:
                r = self._live.get(o.request_id)
                if r is None:
                    continue
                r.update(list(o.outputs[0].token_ids), o.finished)
                if o.finished:
                    del self._live[o.request_id]
        if self._live:
            ids = list(self._live)
            try:
                self.engine.abort_request(ids)
            except Exception:  # shutting down anyway
                pass
            for r in self._live.values():
                r.update(None, True, ServingError("the vLLM backend was closed before this request finished"))
            self._live.clear()
