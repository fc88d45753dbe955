"""An offline density proxy for when no teacher LLM is available. A proxy, not the paper's label.

The paper's label needs a teacher's ultra-concise summary (Section 3.4). Without one, this
module estimates how long such a summary would be from the text's information content:

* ``lm``: mean token surprisal (bits per token) under a small causal LM, e.g. SmolLM2-135M;
* ``zlib``: DEFLATE-compressed bits per character (no model at all; crude on short texts).

A text that carries more bits per unit is taken to need a longer summary. The density ``d``
of each context is mapped to a label around a chosen centre, y = y_mid + gain * log2(d_ref / d),
with ``d_ref`` the corpus median by default, so the labels spread over the candidate set
(y_mid = 3 is factor 8, the middle of {2..32}). Records store it as
``pseudo_summary_fraction = 2^-y`` (the pseudo summary length over the context length), with
``meta.density_proxy`` saying which proxy made it; ``labels`` turns it back into y.
"""

from __future__ import annotations

import math
import statistics
import zlib
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import context_key
from .records import TrainingRecord

ProxyMethod = Literal["lm", "zlib"]


def zlib_bits_per_char(texts: Sequence[str]) -> list[float]:
    """Raw-DEFLATE (level 9, no header) bits per character of each text."""
    out = []
    for t in texts:
        raw = t.encode("utf-8")
        comp = zlib.compressobj(9, zlib.DEFLATED, -15)
        n = len(comp.compress(raw) + comp.flush())
        out.append(8.0 * n / max(1, len(t)))
    return out


class SurprisalProxy:
    """Mean surprisal (bits per token) of texts under a small causal LM."""

    def __init__(self, model: str, *, gguf_file: str | None = None, device: str | None = None,
                 batch_size: int = 8, max_tokens: int = 1024, trust_remote_code: bool = False):
        from ..device import resolve_device
        from ..loading import load_decoder_model, load_tokenizer

        self.device = resolve_device(device)
        self.model = load_decoder_model(model, dtype=torch.float32, gguf_file=gguf_file,
                                        trust_remote_code=trust_remote_code).to(self.device).eval()
        self.tokenizer = load_tokenizer(model, gguf_file, trust_remote_code)
        self.batch_size, self.max_tokens = batch_size, max_tokens

    @torch.inference_mode()
    def bits_per_token(self, texts: Sequence[str], progress: bool = False) -> list[float]:
        """Mean over tokens 2..n of -log2 p(token | previous tokens); texts cut at ``max_tokens``."""
        ids = [r[: self.max_tokens] for r in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [float("nan")] * len(ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for s in tqdm(range(0, len(order), self.batch_size), desc="surprisal", disable=not progress, leave=False):
            idx = order[s : s + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            m = torch.zeros_like(x)
            for j, i in enumerate(idx):
                x[j, : len(ids[i])] = torch.tensor(ids[i])
                m[j, : len(ids[i])] = 1
            x, m = x.to(self.device), m.to(self.device)
            logits = self.model(input_ids=x, attention_mask=m).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none") * m[:, 1:]
            n = m[:, 1:].sum(1).clamp(min=1)
            bits = (nll.sum(1) / n / math.log(2)).tolist()
            for j, i in enumerate(idx):
                out[i] = bits[j] if len(ids[i]) > 1 else float("nan")
        return out


def densities_to_labels(densities: Sequence[float], *, y_mid: float = 3.0, gain: float = 1.0,
                        reference: float | None = None) -> list[float]:
    """y = y_mid + gain * log2(reference / d): denser text, smaller factor (reference = median)."""
    finite = [d for d in densities if d > 0 and math.isfinite(d)]
    if not finite:
        raise ValueError("no positive finite density to calibrate the proxy on")
    ref = reference if reference is not None else statistics.median(finite)
    return [y_mid + gain * math.log2(ref / d) if d > 0 and math.isfinite(d) else float("nan") for d in densities]


def annotate_with_proxy(records: Sequence[TrainingRecord], method: ProxyMethod = "lm", *,
                        proxy: SurprisalProxy | None = None, y_mid: float = 3.0, gain: float = 1.0,
                        reference: float | None = None, overwrite: bool = False,
                        progress: bool = True) -> list[TrainingRecord]:
    """Records with ``pseudo_summary_fraction`` set per context from the offline proxy.

    Contexts that already have a teacher summary keep it (the label prefers the summary)
    unless ``overwrite``. Raises ValueError if ``method='lm'`` and no ``proxy`` is given.
    """
    texts: dict[str, str] = {}
    for r in records:
        for c in r.contexts:
            texts.setdefault(context_key(c), c)
    keys = list(texts)
    if method == "lm":
        if proxy is None:
            raise ValueError("method 'lm' needs a SurprisalProxy (a small causal LM)")
        dens = proxy.bits_per_token([texts[k] for k in keys], progress=progress)
    elif method == "zlib":
        dens = zlib_bits_per_char([texts[k] for k in keys])
    else:
        raise ValueError(f"unknown proxy method {method!r}; use 'lm' or 'zlib'")
    ys = dict(zip(keys, densities_to_labels(dens, y_mid=y_mid, gain=gain, reference=reference)))
    dmap = dict(zip(keys, dens))
    out = []
    for r in records:
        fractions, bits = [], []
        for c, s in zip(r.contexts, r.summaries):
            y = ys[context_key(c)]
            keep = s is not None and not overwrite
            fractions.append(None if keep or not math.isfinite(y) else min(1.0, 2.0 ** -y))
            bits.append(round(dmap[context_key(c)], 4))
        value = fractions if isinstance(r.context, list) else fractions[0]
        meta = {**r.meta, "density_proxy": {"method": method, "density": bits if len(bits) > 1 else bits[0],
                                            "y_mid": y_mid, "gain": gain}}
        update = {"pseudo_summary_fraction": value, "meta": meta}
        if overwrite:
            update["concise_summary"] = None
        out.append(TrainingRecord.model_validate({**r.model_dump(), **update}))
    return out
