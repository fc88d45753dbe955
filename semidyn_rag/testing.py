"""Tiny, offline models for tests and examples: a byte-level BPE tokenizer and a 2-layer Qwen3.

Nothing here downloads anything; a model folder built by ``build_tiny_model`` loads through the
same ``from_pretrained`` paths as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas.",
    "Context: Question: Answer briefly. What where when who which how many",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Photosynthesis converts light energy into chemical energy in plants.",
]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained in milliseconds, with pad/eos, chat markers and a placeholder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: str | Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0,
                     vocab_size: int = 512) -> Path:
    """Save a random 2-layer Qwen3 causal LM and its tokenizer to ``path``; return the path."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    tok = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=4096, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


_WORDS = ("tower river mountain energy light city capital paris france plant leaf water stone king queen "
          "war peace ship sea island bridge road train music song garden winter summer").split()


def write_random_docs(root: str | Path, n: int, seed: int = 0, words: tuple[int, int] = (5, 12)) -> Path:
    """Write ``n`` small .txt documents of random sentences (``doc00.txt`` ...) into ``root``."""
    import random

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        sents = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(*words))).capitalize() + "."
                 for _ in range(rng.randint(3, 6))]
        (root / f"doc{i:02d}.txt").write_text(" ".join(sents))
    return root


class CaptureGenerate:
    """Wraps a decoder's ``generate`` to record the input embeddings it receives (for tests that
    assert the latents sit where the placeholders were)."""

    def __init__(self, decoder):
        self.calls = []
        self._orig = decoder.model.generate
        decoder.model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs["inputs_embeds"].detach().clone())
        return self._orig(*args, **kwargs)
