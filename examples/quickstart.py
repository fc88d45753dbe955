"""Quick start: compress two chunks and answer from their latents (the README's snippet).

Runs offline on tiny random models; pass real ids (e.g. Qwen/Qwen3-0.6B) or a trained
checkpoint to get real answers.
"""

import tempfile

from semidyn_rag import CompressorConfig, SemiDynamicCompressor
from semidyn_rag.testing import build_tiny_model

tmp = tempfile.mkdtemp()
encoder = build_tiny_model(f"{tmp}/enc", seed=1)  # or "Qwen/Qwen3-0.6B" where the hub is reachable
decoder = build_tiny_model(f"{tmp}/dec", seed=2)

config = CompressorConfig(encoder=str(encoder), decoder=str(decoder), projector_hidden_size=256)
comp = SemiDynamicCompressor(config)  # or SemiDynamicCompressor.from_pretrained(CHECKPOINT)

chunks = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Mount Everest is Earth's highest mountain above sea level, in the Mahalangur Himal.",
]
contexts = comp.compress(chunks, scale=0.0)  # one encoder pass per chunk
for c in contexts:
    print(f"{c.n_tokens} tokens -> {c.n_latents} latents (factor {c.factor}, y_hat {c.y_hat:.2f})")

answer = comp.generate("Where is the Eiffel Tower?", contexts, max_new_tokens=16)
print("answer:", repr(answer))

comp.save_pretrained(f"{tmp}/checkpoint")
again = SemiDynamicCompressor.from_pretrained(f"{tmp}/checkpoint")
assert again.fingerprint == comp.fingerprint
