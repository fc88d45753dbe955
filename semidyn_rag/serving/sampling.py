"""Generation settings in the Hugging Face spelling, translated to vLLM's sampling fields.

Callers (sessions, LlamaIndex, LangChain) pass ``generate``-style keyword arguments; the vLLM
backends need ``SamplingParams`` fields (in process) or the same names in a Completions request
(remote). Greedy unless ``do_sample=True``, as in ``LatentDecoder.generate``. Every field that
could change a greedy answer is set explicitly, so a server's ``generation_config`` defaults
(a repetition penalty, say) cannot make vLLM answer differently from transformers.
"""

from __future__ import annotations

from .base import ServingError

# Hugging Face name -> vLLM name
_RENAMED = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "repetition_penalty": "repetition_penalty", "seed": "seed", "min_new_tokens": "min_tokens",
            "stop": "stop"}


def sampling_fields(max_tokens: int, generate_kwargs: dict) -> dict:
    """vLLM sampling fields for ``max_tokens`` new tokens and HF-style ``generate_kwargs``.

    Raises ServingError for an argument vLLM has no equivalent of.
    """
    kw = dict(generate_kwargs)
    sample = bool(kw.pop("do_sample", False))
    unknown = sorted(k for k in kw if k not in _RENAMED)
    if unknown:
        raise ServingError(f"the vLLM backend does not take {', '.join(unknown)}; it takes do_sample, "
                           f"{', '.join(_RENAMED)}")
    fields = {"max_tokens": int(max_tokens), "temperature": 0.0, "top_p": 1.0, "top_k": 0,
              "repetition_penalty": 1.0, "skip_special_tokens": True}
    for hf, name in _RENAMED.items():
        if kw.get(hf) is not None:
            fields[name] = kw[hf]
    if not sample:
        fields.update(temperature=0.0, top_p=1.0, top_k=0)
    elif fields["temperature"] == 0.0:
        fields["temperature"] = 1.0  # HF samples at temperature 1 unless told otherwise
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    return fields
