"""The transformers backend: the compressor's own decoder, through Hugging Face ``generate``.

This is the path every answer took before vLLM: ``LatentDecoder.generate_ids`` decodes a
left-padded batch from ``inputs_embeds``. Calls are serialised by a lock (one model, one
``generate`` at a time); a session passes its own lock, so compression and decoding never
overlap on the same weights. Streaming runs ``generate`` in a thread with a text streamer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from .base import Completion, DecoderBackend


class TransformersBackend(DecoderBackend):
    """Hugging Face ``generate`` on the compressor's decoder (adapters and all), greedy by default."""

    name = "transformers"

    def __init__(self, decoder, lock: threading.RLock | None = None) -> None:
        super().__init__(decoder)
        self._lock = lock or threading.RLock()

    def complete(self, prompt_ids: Sequence[Sequence[int]], latents: Sequence[Sequence[torch.Tensor]],
                 max_new_tokens: int = 64, **generate_kwargs) -> list[Completion]:
        """Decode the prompts as one padded batch; every answer's TTFT is the batch's first token."""
        if not prompt_ids:
            return []
        ids, lat = [list(r) for r in prompt_ids], [list(x) for x in latents]
        tape = _TokenTape()
        with self._lock:
            t0 = time.perf_counter()
            texts = self.decoder.generate_ids(ids, lat, max_new_tokens=max_new_tokens, streamer=tape,
                                              **generate_kwargs)
            t1 = time.perf_counter()
        first = (tape.first or t1) - t0
        rows = tape.rows(len(ids), self.decoder.tokenizer)
        return [Completion(text, rows[i], len(ids[i]) - len(lat[i]) + sum(int(x.shape[0]) for x in lat[i]),
                           first, t1 - t0) for i, text in enumerate(texts)]

    def stream(self, prompt_ids: Sequence[int], latents: Sequence[torch.Tensor], max_new_tokens: int = 64,
               **generate_kwargs) -> Iterator[str]:
        """Yield text pieces as ``generate`` (in a thread) decodes them; errors reach the consumer."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.decoder.tokenizer, skip_prompt=False, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run():
            try:
                with self._lock:
                    self.decoder.generate_ids([list(prompt_ids)], [list(latents)], max_new_tokens=max_new_tokens,
                                              streamer=streamer, **generate_kwargs)
            except BaseException as e:  # surfaced to the consumer below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if errors:
            raise errors[0]


class _TokenTape(BaseStreamer):
    """Records the new tokens ``generate`` hands out, and when the first came (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.first: float | None = None
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first is None:
            self.first = time.perf_counter()
        self.puts.append(value.detach().reshape(-1).to("cpu"))

    def end(self) -> None:
        pass

    def rows(self, n: int, tokenizer) -> list[list[int]]:
        """Each row's new token ids up to and including its first end token (the rest is padding)."""
        if not self.puts:
            return [[] for _ in range(n)]
        table = torch.stack(self.puts, 1).tolist()
        ends = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
        out = []
        for row in table:
            cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
            out.append(row[:cut])
        return out
