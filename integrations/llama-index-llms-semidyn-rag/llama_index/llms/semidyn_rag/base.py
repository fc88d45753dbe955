"""A LlamaIndex LLM whose decoder reads compressed nodes as latents.

LlamaIndex passes the LLM a text prompt. ``SemiDynamicLLM`` hands it to the shared
``CompressionSession``, which replaces every chunk the postprocessor compressed with one
placeholder and decodes with that chunk's latents there; the rest of the prompt stays text.
Token accounting of each call (text tokens, latent slots, factors per node, prefill tokens saved
against the uncompressed prompt) is in ``response.additional_kwargs["semidyn_usage"]`` and in
``llm.last_usage``. ``backend="vllm"`` (with ``vllm_url`` for a server) decodes on vLLM instead of
Hugging Face ``generate``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional

from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM


class SemiDynamicLLM(CustomLLM):
    """The compressor's decoder as a LlamaIndex LLM (greedy by default).

    Give it the ``session`` of a ``SemiDynamicCompressPostprocessor`` (``pp.session``) so both
    share one compressor and one registry of compressed chunks.
    """

    max_new_tokens: int = Field(default=128, description="Tokens to generate per answer.")
    context_window: int = Field(
        default=131072,
        description="Text window reported to LlamaIndex. Compressed chunks cost their latents, not "
        "their text, so a large value keeps the synthesizer from splitting chunks it packs.",
    )
    model_name: str = Field(default="semidyn-rag", description="Name reported in metadata.")
    generate_kwargs: dict = Field(default_factory=dict, description="Extra arguments for generate().")
    backend: str = Field(default="transformers", description="Who decodes: transformers (the compressor's decoder) "
                         "or vllm (a vLLM engine in this process, or the server at vllm_url).")
    vllm_url: Optional[str] = Field(default=None, description="A `vllm serve MODEL --enable-prompt-embeds` "
                                    "server, e.g. http://gpu-host:8000 (with backend='vllm').")

    _session: Any = PrivateAttr(default=None)
    _usage: Optional[dict] = PrivateAttr(default=None)

    def __init__(self, session: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session = session
        if self.backend != "transformers" or self.vllm_url:
            from semidyn_rag.serving import make_backend

            # the session decodes for this LLM only: it now decodes through the chosen backend
            session.backend = make_backend(session.compressor, self.backend, vllm_url=self.vllm_url)

    @classmethod
    def class_name(cls) -> str:
        return "SemiDynamicLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           model_name=self.model_name, is_chat_model=False)

    @property
    def session(self):
        return self._session

    @property
    def last_usage(self) -> Optional[dict]:
        """Token accounting of the latest call (see ``PromptUsage.to_dict``); with progressive
        reading, ``progressive`` lists each node's read (scan and final factor, why)."""
        return self._usage

    def _with_progress(self, prompt: str, usage: dict) -> dict:
        notes = self._session.progress_notes(prompt)
        return {**usage, "progressive": notes} if notes else usage

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text, usage = self._session.answer(prompt, max_new_tokens=self.max_new_tokens,
                                           **{**self.generate_kwargs, **kwargs})
        self._usage = self._with_progress(prompt, usage.to_dict())
        return CompletionResponse(text=text, additional_kwargs={"semidyn_usage": self._usage})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        pieces, usage = self._session.stream(prompt, max_new_tokens=self.max_new_tokens,
                                             **{**self.generate_kwargs, **kwargs})
        self._usage = self._with_progress(prompt, usage.to_dict())

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in pieces:
                text += piece
                yield CompletionResponse(text=text, delta=piece, additional_kwargs={"semidyn_usage": self._usage})

        return gen()

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        # Decoding waits in a worker thread so the event loop stays free (a vLLM backend batches
        # concurrent calls in its engine or server).
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def produce() -> None:
            try:
                for item in self.stream_complete(prompt, formatted, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as e:  # surfaced to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        threading.Thread(target=produce, daemon=True).start()

        async def gen() -> CompletionResponseAsyncGen:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item

        return gen()


