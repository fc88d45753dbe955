"""A compressor's decoder as a plain model folder that vLLM (or any server) can load.

vLLM serves plain weights; a LoRA-tuned decoder is merged into its base once
(``merge_and_unload`` on a copy) and saved with its tokenizer, or, for the baselines that read
with the base LLM, saved with the adapters left out. ``semidyn_decoder.json`` in the folder
records which compressor it came from and what the check found: the merged model and the
adapter model must give the same greedy answers on probe prompts that read latents.
``served_decoder_path`` keeps one such folder per compressor under the cache, made on first use.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_directory
from .base import ServingError

INFO_FILE = "semidyn_decoder.json"
PROBE_TEXTS = (
    "The Eiffel Tower, completed in 1889 for the World's Fair, is a wrought-iron lattice tower on the Champ de "
    "Mars in Paris; it was the tallest structure in the world for 41 years.",
    "Mount Everest, on the border of Nepal and China, is Earth's highest mountain above sea level at 8,849 metres.",
    "Photosynthesis lets green plants turn light, water and carbon dioxide into sugar and oxygen.",
)
PROBE_QUESTIONS = ("Where is the Eiffel Tower?", "How high is Mount Everest?", "What do plants make from light?")


@dataclass
class DecoderExport:
    """What ``export_decoder`` wrote and what its check found."""

    path: str
    compressor_fingerprint: str
    base: bool  # adapters left out (the base LLM) rather than merged in
    merged_adapters: bool  # the decoder had LoRA adapters that were merged (or left out)
    hidden_size: int
    placeholder: str
    probes: int
    answers_equal: bool | None  # None when the check was skipped
    max_logit_diff: float | None


def plain_decoder(decoder_model: torch.nn.Module, base: bool = False) -> tuple[torch.nn.Module, bool]:
    """(a model without adapter layers, whether it had adapters): merged, or the base when ``base``.

    The compressor's own model is left untouched (a copy is merged).
    """
    if not (hasattr(decoder_model, "merge_and_unload") and hasattr(decoder_model, "peft_config")):
        return decoder_model, False
    clone = copy.deepcopy(decoder_model)
    return (clone.unload() if base else clone.merge_and_unload()), True


def export_decoder(compressor, out: str | Path, *, base: bool = False, verify: bool = True,
                   overwrite: bool = False, max_new_tokens: int = 16) -> DecoderExport:
    """Write ``compressor``'s decoder (adapters merged, or left out with ``base``) to ``out``.

    With ``verify`` the saved folder is loaded back and must answer the probe prompts, greedy,
    token for token as the adapter model does; a mismatch raises ServingError. Raises
    FileExistsError for an existing ``out`` without ``overwrite``.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    dec = compressor.decoder
    model, had = plain_decoder(dec.model, base)
    info = DecoderExport(str(out), compressor.fingerprint, base, had, dec.hidden_size, dec.placeholder,
                         0, None, None)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        dec.tokenizer.save_pretrained(tmp)
        if verify:
            info.probes, info.answers_equal, info.max_logit_diff = _check(compressor, tmp, base, max_new_tokens)
            if not info.answers_equal:
                raise ServingError(f"the exported decoder answers differently from the adapter model "
                                   f"(largest first-token logit difference {info.max_logit_diff:.2e}); not written")
        (tmp / INFO_FILE).write_text(json.dumps(asdict(info) | {"path": str(out)}, indent=2) + "\n")
    if model is not dec.model:
        del model
    return info


def read_export_info(path: str | Path) -> dict | None:
    """The ``semidyn_decoder.json`` record of an exported decoder folder, or None."""
    p = Path(path) / INFO_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def served_decoder_path(compressor, base: bool = False) -> Path:
    """A cached plain-weights folder of ``compressor``'s decoder, exported (and checked) on first use."""
    from ..embedded import cache_dir

    if base and hasattr(compressor.decoder.model, "peft_config"):
        key = "base-" + hashlib.sha256(compressor.decoder_base_signature.encode()).hexdigest()[:24]
    else:
        base, key = False, compressor.fingerprint
    target = cache_dir() / "decoders" / key
    if (target / INFO_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one exporter at a time; the others reuse its folder
        if not (target / INFO_FILE).is_file():
            export_decoder(compressor, target, base=base, overwrite=True)
    return target


@torch.inference_mode()
def _check(compressor, folder: Path, base: bool, max_new_tokens: int) -> tuple[int, bool, float]:
    """(probes, greedy answers equal, largest first-token logit difference): saved folder vs adapter model."""
    from transformers import AutoModelForCausalLM

    from ..evaluation.decoding import decoder_mode

    dec = compressor.decoder
    contexts = compressor.compress(list(PROBE_TEXTS))
    prompts = [[dec.render(q, 1)] for q in PROBE_QUESTIONS] + [[dec.render(PROBE_QUESTIONS[0], len(contexts))]]
    ids = [dec.encode_prompts(p)[0] for p in prompts]
    latents = [[c.latents] for c in contexts] + [[c.latents for c in contexts]]
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=compressor.dtype).to(compressor.device).eval()
    inp = dec.expand(ids, latents)
    kwargs = dict(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask, max_new_tokens=max_new_tokens,
                  do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=dec.tokenizer.pad_token_id)
    with decoder_mode(dec.model, base):
        want = dec.model.generate(**kwargs)
        ref = dec.model(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask).logits[:, -1].float()
    got = saved.generate(**kwargs)
    new = saved(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask).logits[:, -1].float()
    del saved
    return len(ids), bool(torch.equal(want, got)), float((ref - new).abs().max())
