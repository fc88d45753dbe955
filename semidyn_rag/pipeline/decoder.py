"""The decoder side: prompts with placeholders, latent splicing, generation and LM loss.

Prompts use the decoder's own chat template (plain ``User:``/``Assistant:`` turns for
tokenizers without one). A question with no placeholder is wrapped in the default RAG prompt,
one placeholder per context; a prompt that already holds placeholders is used as written.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .placeholder import ExpandedInputs, PlaceholderCountError, expand_placeholders

# Unused special tokens known to exist in common decoder vocabularies; the first one present
# is reused as the placeholder (Qwen3's <|video_pad|> is what the authors use).
_REUSABLE_PLACEHOLDERS = ("<|video_pad|>", "<|image_pad|>", "<|vision_pad|>", "<|reserved_special_token_0|>")
ADDED_PLACEHOLDER = "<|semidyn_context|>"


def format_question(question: str, n_contexts: int, placeholder: str) -> str:
    """The default RAG prompt: the contexts' placeholders, then the question."""
    if n_contexts == 1:
        ctx = f"Context: {placeholder}"
    else:
        ctx = "Context:\n" + "\n".join(f"[{i + 1}] {placeholder}" for i in range(n_contexts))
    return f"{ctx}\n\nQuestion: {question}"


class LatentDecoder(nn.Module):
    """A causal LM that reads projected latents in place of placeholder tokens."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, placeholder_token: str | None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.placeholder = self._resolve_placeholder(placeholder_token)
        self.placeholder_id = int(tokenizer.convert_tokens_to_ids(self.placeholder))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def _resolve_placeholder(self, token: str | None) -> str:
        vocab = self.tokenizer.get_vocab()
        if token is None:
            token = next((t for t in _REUSABLE_PLACEHOLDERS if t in vocab), ADDED_PLACEHOLDER)
        if token not in vocab:
            # Only the tokenizer learns it: placeholder ids are replaced before embedding lookup.
            self.tokenizer.add_tokens([token], special_tokens=True)
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"placeholder {token!r} is not a single token in the decoder tokenizer")
        return token

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def render(self, prompt: str, n_contexts: int) -> str:
        """The full decoder text for a question or a placeholder prompt, chat template applied."""
        found = prompt.count(self.placeholder)
        if found == 0 and n_contexts:
            prompt = format_question(prompt, n_contexts, self.placeholder)
        elif found != n_contexts:
            raise PlaceholderCountError(f"prompt has {found} placeholder(s) but {n_contexts} context(s)")
        return self.apply_chat(prompt)

    def apply_chat(self, user: str, answer: str | None = None) -> str:
        """Render one user turn (and optionally the assistant's answer) as decoder text."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": user}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        else:
            text = f"User: {user}\nAssistant:"
        return text if answer is None else text + answer

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def expand(
        self,
        token_ids: list[list[int]],
        latents: list[list[torch.Tensor]],
        labels: list[list[int]] | None = None,
        padding_side: str = "left",
    ) -> ExpandedInputs:
        return expand_placeholders(
            token_ids, latents, self.placeholder_id, self.model.get_input_embeddings(),
            labels=labels, padding_side=padding_side,
        )

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        latents: list[list[torch.Tensor]],
        max_new_tokens: int = 64,
        **generate_kwargs,
    ) -> list[str]:
        """Answer each rendered prompt reading its contexts' latents; only new text is returned."""
        return self.generate_ids(self.encode_prompts(prompts), latents, max_new_tokens, **generate_kwargs)

    @torch.inference_mode()
    def generate_ids(
        self,
        ids: list[list[int]],
        latents: list[list[torch.Tensor]],
        max_new_tokens: int = 64,
        **generate_kwargs,
    ) -> list[str]:
        """``generate`` for prompts already tokenized (one placeholder id per latent block)."""
        inp = self.expand(ids, latents)
        kwargs = {"do_sample": False, "pad_token_id": self.tokenizer.pad_token_id, **generate_kwargs}
        if not kwargs.get("do_sample"):
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        out = self.model.generate(
            inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
            max_new_tokens=max_new_tokens, **kwargs,
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
