"""A LangChain chat model whose decoder reads compressed documents as latents.

LangChain hands a chat model messages of text. ``ChatSemiDynamic`` turns them into one prompt
(``semidyn_rag.session.messages_to_prompt``) and gives it to the shared ``CompressionSession``,
which replaces every document text that ``SemiDynamicDocumentCompressor`` compressed with one
placeholder and decodes with that document's latents there; everything else stays text.
Token accounting: ``usage_metadata`` counts prefill positions as input tokens (latent slots plus
the tokens that stayed text), and ``response_metadata["semidyn_usage"]`` has the full
``PromptUsage`` (latent slots, factors per document, prefill saved against the text prompt).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field, PrivateAttr

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}


class ChatSemiDynamic(BaseChatModel):
    """The compressor's decoder as a LangChain chat model (greedy by default).

    Give it the ``session`` of a ``SemiDynamicDocumentCompressor`` (``compressor.session``) so
    both share one compressor and one registry of compressed documents. ``stop`` sequences are
    honoured by cutting the answer before the first one.

    Example:
        ```python
        llm = ChatSemiDynamic(session=compressor.session, max_tokens=64)
        msg = llm.invoke("Context: " + doc.page_content + "\\n\\nQuestion: ...")
        msg.usage_metadata["input_tokens"]                   # prefill positions
        msg.response_metadata["semidyn_usage"]["saved_tokens"]
        ```
    """

    model_config = ConfigDict(populate_by_name=True)

    max_tokens: int = Field(default=128, alias="max_new_tokens", description="Tokens to generate per answer.")
    model_name: str = Field(default="semidyn-rag", description="Name reported in response metadata.")
    generate_kwargs: dict = Field(default_factory=dict, description="Extra arguments for generate().")

    _session: Any = PrivateAttr(default=None)
    _usage: Optional[dict] = PrivateAttr(default=None)

    def __init__(self, session: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session = session

    @property
    def _llm_type(self) -> str:
        return "semidyn-rag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens, **self.generate_kwargs}

    @property
    def session(self):
        return self._session

    @property
    def last_usage(self) -> Optional[dict]:
        """Token accounting of the latest call (``PromptUsage.to_dict``)."""
        return self._usage

    # -- helpers --------------------------------------------------------------------------------

    def _prompt(self, messages: list[BaseMessage]) -> str:
        from semidyn_rag.session import messages_to_prompt

        turns = [(m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type, m.type), str(m.text))
                 for m in messages]
        return messages_to_prompt(turns)

    def _kwargs(self, kwargs: dict) -> dict:
        kw = {**self.generate_kwargs, **kwargs}
        kw["max_new_tokens"] = kw.pop("max_tokens", kw.pop("max_new_tokens", self.max_tokens))
        return kw

    def _metadata(self, text: str, usage: dict) -> tuple[UsageMetadata, dict]:
        tok = self._session.compressor.decoder.tokenizer
        n_out = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
        n_in = usage["prefill_positions"]
        return (UsageMetadata(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out),
                {"model_name": self.model_name, "model_provider": "semidyn-rag", "semidyn_usage": usage})

    # -- LangChain interface --------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        text, usage = self._session.answer(self._prompt(messages), **self._kwargs(kwargs))
        text = _cut_at_stop(text, stop)[0]
        self._usage = usage.to_dict()
        usage_md, response_md = self._metadata(text, self._usage)
        message = AIMessage(content=text, usage_metadata=usage_md, response_metadata=response_md)
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": self.model_name, "semidyn_usage": self._usage})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        pieces, usage = self._session.stream(self._prompt(messages), **self._kwargs(kwargs))
        self._usage = usage.to_dict()
        hold = max((len(s) for s in stop), default=1) - 1 if stop else 0  # a stop may span pieces
        text, sent, stopped = "", 0, False
        for piece in pieces:
            text, stopped = _cut_at_stop(text + piece, stop)
            end = len(text) if stopped else max(sent, len(text) - hold)
            if end > sent:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text[sent:end]))
                sent = end
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
            if stopped:
                break  # the decoder finishes its max_tokens in the background; nothing more is read
        if sent < len(text):
            yield ChatGenerationChunk(message=AIMessageChunk(content=text[sent:]))
        # usage once, in the last chunk: chunks add up their usage_metadata
        usage_md, response_md = self._metadata(text, self._usage)
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage_md,
                                                         response_metadata=response_md, chunk_position="last"))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        # Decoding runs in a worker thread so the event loop stays free.
        return await run_in_executor(None, self._generate, messages, stop,
                                     run_manager.get_sync() if run_manager else None, **kwargs)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        # Each step of the sync stream (prompt splicing included) runs in a worker thread.
        chunks = self._stream(messages, stop, None, **kwargs)
        done = object()
        while (chunk := await run_in_executor(None, next, chunks, done)) is not done:
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """``text`` up to the earliest stop sequence, and whether one was found."""
    cuts = [i for s in stop or () if s and (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
