"""The systems compared in one run, all answering through the same decoder and chat template.

* ``uncompressed``: the decoder reads the contexts as text, in the prompt the compressor uses
  (``decoder.render``) with each placeholder replaced by its context's text;
* ``no_context``: the question alone (a floor: what the decoder knows by itself);
* ``fixed_x{F}``: every context pooled at factor F (``fixed_len{M}``: M latents, token backbones);
* ``semi_dynamic_s{scale}``: the density head and selector choose each context's factor;
* ``llmlingua2_x{F}``: LLMLingua-2 hard compression to 1/F of the tokens, read as text
  (only when ``llmlingua`` is installed and its model can be loaded);
* ``truncate_x{F}``, ``sentence_optimizer_x{F}``, ``longllmlingua_x{F}``: text-pruning peers
  at the same ratios (``peers``), run when named in ``families``;
* ``progressive_*``: flat and coarse-to-fine reading at the latent budget of the top
  ``budget_k`` contexts at each factor (``progressive``), run when named in ``families``.

Latent systems start from ``ContextFeatures`` computed once per context (``comp.encode``) and
derive their latents with ``comp.compress_features``, so one encoder pass serves every
factor and scale. Text systems are baselines and read with the baseline decoder.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..compressor import SemiDynamicCompressor
from ..types import ContextFeatures

logger = logging.getLogger(__name__)

DEFAULT_FAMILIES = ("uncompressed", "no_context", "fixed", "semi_dynamic", "llmlingua2")
FAMILIES = (*DEFAULT_FAMILIES, "truncate", "sentence_optimizer", "longllmlingua",
            "progressive_flat", "progressive_retriever", "progressive_attention", "progressive_likelihood")
DEFAULT_LLMLINGUA_MODEL = "microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank"


@dataclass
class ContextItem:
    """A context a question reads: its text and, for latent systems, its encoder features."""

    text: str
    features: ContextFeatures | None = None
    encode_s: float = 0.0  # this context's share of its encoder batch (or its cache read)
    encode_pass_s: float | None = None  # share of an encoder pass over it (features not cached)
    store_read_s: float | None = None  # share of reading its features from a latent store (cached)


@dataclass
class Prepared:
    """Decoder input for one question: prompt tokens (with placeholders) and their latents."""

    prompt_ids: list[int]
    latents: list[torch.Tensor] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    chunk_positions: list[int] = field(default_factory=list)
    factors: list[int | None] = field(default_factory=list)
    compress_s: float = 0.0
    compress_cached_s: float | None = None  # latent systems: derive + latent-store read
    compress_uncached_s: float | None = None  # latent systems: derive + encoder pass
    texts: list[str] | None = None  # text systems that prune: what the decoder reads per context
    extra: dict | None = None  # system-specific figures kept in samples.jsonl (progressive reads)


class System(ABC):
    """One way of turning (question, contexts) into decoder input."""

    family: str
    needs_features = False  # reads ContextItem.features (latent systems)
    baseline = True  # reads with the baseline decoder (base or tuned, per the run)
    uses_context = True

    def __init__(self, name: str, param: float | None = None):
        self.name, self.param = name, param

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @abstractmethod
    def prepare(self, comp: SemiDynamicCompressor, question: str, contexts: Sequence[ContextItem]) -> Prepared:
        """Build the decoder input; raises ValueError when a latent system lacks features."""


def _sync(comp: SemiDynamicCompressor) -> None:
    if comp.device.type == "cuda":
        torch.cuda.synchronize(comp.device)


def _n_tokens(comp: SemiDynamicCompressor, text: str) -> int:
    return len(comp.decoder.encode_prompts([text])[0])


def text_prompt(comp: SemiDynamicCompressor, question: str, texts: Sequence[str]) -> str:
    """The compressor's rendered prompt with each placeholder replaced by a context's text."""
    rendered = comp.decoder.render(question, len(texts))
    parts = rendered.split(comp.decoder.placeholder)
    if len(parts) != len(texts) + 1:
        raise ValueError(f"rendered prompt has {len(parts) - 1} placeholders for {len(texts)} contexts")
    out = [parts[0]]
    for text, rest in zip(texts, parts[1:]):
        if comp.decoder.placeholder in text:
            raise ValueError(f"a context contains the decoder's placeholder token {comp.decoder.placeholder!r}")
        out += [text, rest]
    return "".join(out)


class UncompressedText(System):
    family = "uncompressed"

    def __init__(self):
        super().__init__("uncompressed", None)

    def prepare(self, comp, question, contexts):
        texts = [c.text for c in contexts]
        ids = comp.decoder.encode_prompts([text_prompt(comp, question, texts)])[0]
        counts = [_n_tokens(comp, t) for t in texts]
        return Prepared(ids, [], counts, list(counts), [None] * len(texts))


class NoContext(System):
    family = "no_context"
    uses_context = False

    def __init__(self):
        super().__init__("no_context", None)

    def prepare(self, comp, question, contexts):
        # The question line of the context prompt, without any context before it.
        return Prepared(comp.decoder.encode_prompts([comp.decoder.apply_chat(f"Question: {question}")])[0])


class _LatentSystem(System):
    needs_features = True
    baseline = False

    def _compress_kwargs(self) -> dict:
        raise NotImplementedError

    def prepare(self, comp, question, contexts):
        feats = []
        for i, c in enumerate(contexts):
            if c.features is None:
                raise ValueError(f"{self.name}: context {i} has no encoder features")
            feats.append(c.features)
        _sync(comp)
        t0 = time.perf_counter()
        compressed = comp.compress_features(feats, **self._compress_kwargs())
        _sync(comp)
        derive_s = time.perf_counter() - t0
        ids = comp.decoder.encode_prompts([comp.decoder.render(question, len(compressed))])[0]

        def cost(attr: str) -> float | None:
            shares = [getattr(c, attr) for c in contexts]
            return None if None in shares else derive_s + sum(shares)

        return Prepared(
            ids, [c.latents for c in compressed], [c.n_tokens for c in compressed],
            [c.n_latents for c in compressed], [c.factor for c in compressed],
            compress_s=derive_s + sum(c.encode_s for c in contexts),
            compress_cached_s=cost("store_read_s"), compress_uncached_s=cost("encode_pass_s"),
        )


class FixedFactor(_LatentSystem):
    family = "fixed"

    def __init__(self, value: int, takes: str = "factor"):
        super().__init__(f"fixed_x{value}" if takes == "factor" else f"fixed_len{value}", float(value))
        self.value, self.takes = int(value), takes

    def _compress_kwargs(self) -> dict:
        return {self.takes: self.value}


class SemiDynamic(_LatentSystem):
    family = "semi_dynamic"

    def __init__(self, scale: float):
        super().__init__(f"semi_dynamic_s{scale:+g}", float(scale))
        self.scale = float(scale)

    def _compress_kwargs(self) -> dict:
        return {"scale": self.scale}


class LLMLingua2(System):
    """LLMLingua-2 token dropping to ``1/target`` of each context, read as plain text."""

    family = "llmlingua2"

    def __init__(self, compressor, target: int):
        super().__init__(f"llmlingua2_x{target}", float(target))
        self.compressor, self.rate = compressor, 1.0 / target

    def prepare(self, comp, question, contexts):
        t0 = time.perf_counter()
        short = [self.compressor.compress_prompt([c.text], rate=self.rate)["compressed_prompt"] or c.text
                 for c in contexts]
        seconds = time.perf_counter() - t0
        ids = comp.decoder.encode_prompts([text_prompt(comp, question, short)])[0]
        return Prepared(ids, [], [_n_tokens(comp, c.text) for c in contexts],
                        [max(1, _n_tokens(comp, s)) for s in short], [None] * len(contexts), seconds)


def load_llmlingua(model: str = DEFAULT_LLMLINGUA_MODEL, device: str = "cpu"):
    """An LLMLingua-2 ``PromptCompressor``; raises ImportError / OSError when unavailable."""
    from llmlingua import PromptCompressor  # optional dependency

    return PromptCompressor(model_name=model, use_llmlingua2=True, device_map=device)


def build_systems(
    comp: SemiDynamicCompressor,
    families: Sequence[str],
    *,
    factors: Sequence[int] | None = None,
    scales: Sequence[float] = (),
    llmlingua: str = "auto",
    llmlingua_model: str = DEFAULT_LLMLINGUA_MODEL,
    scorer: str | None = None,
    budget_k: int = 5,
) -> tuple[list[System], dict[str, str]]:
    """The systems to run, in report order, and {family: reason} for those left out.

    ``factors`` default to the compressor's candidates; ``llmlingua`` is ``auto`` (run it when
    it loads, else skip with the reason), ``on`` (raise when it cannot) or ``off``; ``scorer``
    is LongLLMLingua's causal LM (default: the decoder's base model); ``budget_k``: progressive
    systems get the latent budget of the top ``budget_k`` contexts at each factor.
    Raises ValueError for unknown families or factors the backbone cannot take, EvalError for
    a text-pruning peer that cannot load.
    """
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown system families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    takes = comp.pooling.takes
    factors = list(factors) if factors else list(comp.pooling.candidates)
    for f in factors:
        comp.pooling.check_size(f)
    systems: list[System] = []
    skipped: dict[str, str] = {}
    if "uncompressed" in families:
        systems.append(UncompressedText())
    if "no_context" in families:
        systems.append(NoContext())
    if "fixed" in families:
        systems += [FixedFactor(f, takes) for f in factors]
    if "semi_dynamic" in families:
        if not scales:
            raise ValueError("semi_dynamic needs at least one scale")
        systems += [SemiDynamic(s) for s in scales]
    if "llmlingua2" in families and llmlingua != "off" and takes != "factor":
        if llmlingua == "on":
            raise ValueError("LLMLingua-2 at matching ratios needs a mean-pooling compressor (fixed factors)")
        skipped["llmlingua2"] = "matching ratios need a mean-pooling compressor"
    elif "llmlingua2" in families and llmlingua != "off":
        try:
            lingua = load_llmlingua(llmlingua_model, str(comp.device))
        except Exception as e:  # ImportError when absent, OSError when its model is unreachable
            if llmlingua == "on":
                raise RuntimeError(f"LLMLingua-2 was asked for but cannot be loaded: {e}") from e
            skipped["llmlingua2"] = f"{type(e).__name__}: {e}"
            logger.info("LLMLingua-2 baseline skipped (%s)", skipped["llmlingua2"])
        else:
            systems += [LLMLingua2(lingua, f) for f in factors]
    from .peers import PEER_FAMILIES, build_peers  # peers build on this module's System

    peers = [f for f in PEER_FAMILIES if f in families]
    if peers and takes != "factor":
        raise ValueError(f"{', '.join(peers)} at matching ratios need a mean-pooling compressor (fixed factors)")
    if peers:
        systems += build_peers(comp, peers, factors, scorer=scorer)
    from .progressive import PROGRESSIVE_FAMILIES, build_progressive  # budget-matched progressive reading

    systems += build_progressive(comp, [f for f in PROGRESSIVE_FAMILIES if f in families], factors, budget_k)
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate systems in {names} (repeated factors or scales?)")
    return systems, skipped
