"""The semi-dynamic compressor: encoder -> density head -> selector -> pooling -> projector -> decoder.

One encoder pass per context both predicts its density (the head reads the appended end
marker) and yields the features the pooling stage keeps; the selector then picks a discrete
factor (or latent count) from ``y_hat + scale``; the projector maps the pooled rows into the
decoder's embedding space; the decoder reads them where its prompt has a placeholder. The
stages live in :mod:`semidyn_rag.pipeline`; this class wires them and never asks which kind
of pooling it holds.

``encode`` stops before the factor is chosen and returns what the latent store keeps, so a
corpus is encoded once and read at any scale; ``compress`` = ``encode`` + ``compress_features``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import nn

from .checkpoint import load_compressor, save_compressor
from .config import CompressorConfig
from .device import resolve_device, resolve_dtype
from .loading import load_models
from .pipeline.decoder import LatentDecoder
from .pipeline.encoder import ContextEncoder, ContextTooLongError
from .pipeline.head import DensityHead
from .pipeline.pooling import build_pooling
from .pipeline.projector import Projector
from .pipeline.selector import DiscreteRatioSelector
from .types import CompressedContext, ContextFeatures

# Config fields left out of fingerprints: where things run, and model names (the same weights
# under another path or hub id are the same model; a signature of the weights stands for them).
# The pooling rule enters through the stage's own fingerprint_dict (empty for the legacy rule,
# so checkpoints and stores written before it was recorded keep their fingerprints).
_UNHASHED_FIELDS = {"device", "dtype", "on_overflow", "trust_remote_code", "encoder", "decoder",
                    "encoder_gguf_file", "decoder_gguf_file", "pool_end_marker", "pool_align", "density_head", "length_rule"}
# Fields added after format 1, hashed only when they differ from the value every format-1
# checkpoint had (so those checkpoints, and the stores built with them, keep their fingerprints).
_LATER_FIELDS = {"density_head": True}
# Config fields the stored features depend on (the encoder side only).
_FEATURE_FIELDS = {"encoder_num_layers", "backbone", "factors", "lengths", "bidirectional",
                   "encoder_training", "encoder_lora"}


class SemiDynamicCompressor(nn.Module):
    """Compresses texts into a few latent vectors each and answers questions from them.

    Build it from a config (``SemiDynamicCompressor(CompressorConfig(...))``, which loads the
    base models by name), from loaded models (``from_models``), or from a saved checkpoint
    (``from_pretrained``, which also reads the authors' released layout).
    """

    def __init__(self, config: CompressorConfig | None = None, **overrides):
        config = (config or CompressorConfig()).with_overrides(**overrides)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        enc, enc_tok, dec, dec_tok = load_models(config, dtype)
        self._build(config, enc, enc_tok, dec, dec_tok, device, dtype, wrap_lora=True)

    @classmethod
    def from_models(cls, config: CompressorConfig, encoder, encoder_tokenizer, decoder, decoder_tokenizer,
                    *, wrap_lora: bool = True) -> SemiDynamicCompressor:
        """Assemble a compressor around already-loaded models (LoRA applied per the config)."""
        self = cls.__new__(cls)
        device = resolve_device(config.device)
        self._build(config, encoder, encoder_tokenizer, decoder, decoder_tokenizer, device,
                    resolve_dtype(config.dtype, device), wrap_lora=wrap_lora)
        return self

    def _build(self, config, enc, enc_tok, dec, dec_tok, device, dtype, *, wrap_lora: bool) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.device, self.dtype = device, dtype
        if wrap_lora:
            enc = apply_training(enc, config.encoder_training, config.encoder_lora, causal_lm=False)
            dec = apply_training(dec, config.decoder_training, config.decoder_lora, causal_lm=True)
        self.encoder = ContextEncoder(enc, enc_tok, bidirectional=config.is_bidirectional,
                                      max_tokens=config.max_context_tokens, on_overflow=config.on_overflow)
        self.decoder = LatentDecoder(dec, dec_tok, config.placeholder_token)
        # Record the placeholder actually chosen, so a saved config reloads to the same one.
        self.config = config = config.model_copy(update={"placeholder_token": self.decoder.placeholder})
        d_enc, d_dec = self.encoder.hidden_size, self.decoder.hidden_size
        self.pooling = build_pooling(config, d_enc)
        self.density_head = DensityHead(d_enc, init_y=self.pooling.head_init())
        self.projector = Projector(d_enc, d_dec, config.projector_hidden_size, config.projector_gated)
        self.selector = DiscreteRatioSelector(self.pooling.candidates, config.rounding, config.compare_space)
        self._fp_cache: dict[str, tuple[tuple, str]] = {}
        self._fp_params: dict[str, tuple[tuple, list]] = {}
        # A fully trained side is hashed weight by weight; only frozen bases need a signature.
        self._base_signature = tuple(
            "full" if _is_fully_trained(config, side) else _base_signature(m)
            for side, m in (("encoder", self.encoder.model), ("decoder", self.decoder.model))
        )
        self.to(device=device, dtype=dtype)
        self.eval()

    # -- fingerprints -------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Hash of the config and every trained weight (at bf16 resolution), cached until one changes.

        Frozen base models enter through a strided sample of their weights, not their names.
        """
        return self._fingerprint("all")

    @property
    def feature_fingerprint(self) -> str:
        """Hash of what ``encode`` output depends on: the encoder side only (store key)."""
        return self._fingerprint("features")

    @property
    def decoder_base_signature(self) -> str:
        """Hash of the frozen base decoder ("full" when it is fully trained): what text baselines read with."""
        return self._base_signature[1]

    def _fingerprint(self, which: str) -> str:
        params = self._fingerprint_params(which)
        version = tuple((n, p.data_ptr(), p._version) for n, p in params)
        cached = self._fp_cache.get(which)
        if cached and cached[0] == version:
            return cached[1]
        fields = _FEATURE_FIELDS if which == "features" else set(CompressorConfig.model_fields) - _UNHASHED_FIELDS
        cfg = {**self.config.model_dump(mode="json", include=fields), **self.pooling.fingerprint_dict()}
        if which != "features":
            cfg.update({k: getattr(self.config, k) for k, v in _LATER_FIELDS.items() if getattr(self.config, k) != v})
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        h.update(self._base_signature[0].encode())
        if which != "features":
            h.update(self._base_signature[1].encode())
        for name, p in params:
            h.update(name.encode())
            h.update(_weight_bytes(p))
        digest = h.hexdigest()[:32]
        self._fp_cache[which] = (version, digest)
        return digest

    def _fingerprint_params(self, which: str) -> list[tuple[str, torch.Tensor]]:
        # "backbone" is the pooling stage's name in fingerprints written before it was renamed
        mods = {"encoder": self.encoder.model, "density_head": self.density_head, "backbone": self.pooling}
        if which != "features":
            mods.update(projector=self.projector, decoder=self.decoder.model)
        # Walking a 30-layer model's module tree costs ~0.1 s, too much for a per-query property:
        # the parameter list is kept while the same modules are in place (weights updated in
        # place, by training, load_state_dict or .to(), are seen by the version check above;
        # an adapter added in place to one of these models would not be).
        key = tuple(mods.values())
        cached = self._fp_params.get(which)
        if cached and all(a is b for a, b in zip(cached[0], key)):  # `which` fixes the modules' count
            return cached[1]
        out = []
        for prefix, mod in mods.items():
            full = prefix in ("density_head", "backbone", "projector") or _is_fully_trained(self.config, prefix)
            for n, p in mod.named_parameters():
                if full or "lora_" in n:
                    out.append((f"{prefix}.{n}", p))
        self._fp_params[which] = (key, out)
        return out

    # -- compression ----------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], batch_size: int = 16) -> list[ContextFeatures]:
        """Run the encoder once per text; return density predictions and poolable features.

        Texts are length-sorted into padded batches; results come back in input order.
        Raises ValueError for empty texts and ContextTooLongError for over-long ones.
        """
        return self.encode_ids(self.encoder.tokenize(list(texts)), batch_size)

    def encode_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = 16) -> list[ContextFeatures]:
        """``encode`` for contexts already tokenized by the encoder's tokenizer (no special tokens).

        Raises ValueError for an empty context and ContextTooLongError for one over the encoder
        limit (``tokenize`` is where over-long texts are truncated when that is asked for).
        """
        ids = [list(r) for r in token_ids]
        for i, r in enumerate(ids):
            if not r:
                raise ValueError(f"context {i} has no tokens; nothing to compress")
            if len(r) > self.encoder.max_tokens:
                raise ContextTooLongError(f"context {i} has {len(r)} tokens, over the encoder limit of "
                                          f"{self.encoder.max_tokens}")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[ContextFeatures | None] = [None] * len(ids)
        fp = self.feature_fingerprint
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                y_hat, feats = self._encode_batch([ids[i] for i in idx])
                for j, i in enumerate(idx):
                    f, c = feats[j]
                    out[i] = ContextFeatures(f, c, float(y_hat[j]), len(ids[i]), fp)
        return out  # type: ignore[return-value]

    def _encode_batch(self, ids: list[list[int]]) -> tuple[torch.Tensor, list]:
        """One encoder pass: (y_hat (B,), per-context (features, counts)). Keeps autograd."""
        enc = self.encoder(ids, extra=self.pooling.extra_inputs())
        y_hat = self.density_head(enc.eos_state).float()
        return y_hat, self.pooling.extract(enc)

    def select(self, y_hat: torch.Tensor | float, n_tokens, scale: float = 0.0):
        """The discrete size (factor or latent count, as the pooling stage takes) for each context.

        A compressor without a density head (the authors' static and multi-ratio models) has
        one size when it has a single candidate; otherwise the caller must name one.
        """
        if not self.config.density_head:
            cands = self.pooling.candidates
            if len(cands) > 1:
                raise ValueError(f"this compressor has no density head (a multi-ratio model): pass "
                                 f"{self.pooling.takes}= one of {list(cands)}")
            return cands[0] if not torch.is_tensor(y_hat) or y_hat.dim() == 0 else torch.full_like(
                y_hat, cands[0], dtype=torch.long)
        return self.pooling.select(self.selector, y_hat, n_tokens, scale)

    def compress_features(
        self, features: Sequence[ContextFeatures], scale: float = 0.0, factor: int | None = None,
        length: int | None = None,
    ) -> list[CompressedContext]:
        """Choose each context's factor (or force one) and project its pooled latents.

        ``factor`` forces a fixed pooling factor (mean pooling), ``length`` a fixed latent
        count (token stages). Raises ValueError for features from another encoder, or a
        forced size the pooling stage cannot take.
        """
        fp = self.feature_fingerprint
        for i, f in enumerate(features):
            if f.fingerprint != fp:
                raise ValueError(f"features {i} come from another encoder (fingerprint {f.fingerprint} != {fp})")
        if not features:
            return []
        forced = self.pooling.forced(factor, length)
        y = torch.tensor([f.y_hat for f in features])
        n = torch.tensor([f.n_tokens for f in features])
        chosen = [forced] * len(features) if forced is not None else self.select(y, n, scale).tolist()
        with torch.inference_mode():
            pooled = self.pooling.derive([f.features.to(self.device) for f in features],
                                         [None if f.counts is None else f.counts.to(self.device) for f in features],
                                         chosen)
            latents = self._project(pooled)
        fp_all = self.fingerprint
        return [CompressedContext(lat, f.n_tokens, self.pooling.factor_of(c), f.y_hat, fp_all)
                for lat, f, c in zip(latents, features, chosen)]

    def scale_for_ratio(self, features: Sequence[ContextFeatures], target: float, average: str = "mean",
                        weights: Sequence[float] | None = None):
        """The smallest scale at which ``features``' contexts average ``target`` tokens per latent.

        Returns a ``ScaleFit`` (the scale, the ratios it gives, the histogram of choices); see
        ``pipeline.target_ratio`` for the averages, the weights and the errors.
        """
        from .pipeline.target_ratio import fit_scale

        return fit_scale(self, [f.y_hat for f in features], [f.n_tokens for f in features], target,
                         average=average, weights=weights)

    def _project(self, pooled: list[torch.Tensor]) -> list[torch.Tensor]:
        """Project all contexts' pooled rows in one matmul, split back per context."""
        flat = torch.cat(pooled).to(self.dtype)
        return list(torch.split(self.projector(flat), [p.shape[0] for p in pooled]))

    def compress(
        self, texts: Sequence[str] | str, scale: float = 0.0, factor: int | None = None,
        length: int | None = None, batch_size: int = 16,
    ) -> list[CompressedContext]:
        """Compress each text into latents (one encoder pass each); see ``compress_features``."""
        if isinstance(texts, str):
            texts = [texts]
        return self.compress_features(self.encode(texts, batch_size), scale, factor, length)

    # -- answering ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str],
        contexts: CompressedContext | Sequence[CompressedContext] | Sequence[Sequence[CompressedContext]],
        max_new_tokens: int = 64,
        **generate_kwargs,
    ) -> str | list[str]:
        """Answer from compressed contexts; returns only the generated text.

        ``prompts`` is a question (wrapped in the default RAG prompt, one placeholder per
        context) or a prompt holding exactly one placeholder per context; a list of prompts
        takes a list of context lists and is decoded as one padded batch.
        """
        single = isinstance(prompts, str)
        if single:
            prompts = [prompts]
            if isinstance(contexts, CompressedContext):
                contexts = [contexts]
            contexts = [list(contexts)]
        elif len(contexts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(contexts)} context lists")
        ctx_lists = [[c] if isinstance(c, CompressedContext) else list(c) for c in contexts]
        rendered = [self.decoder.render(p, len(c)) for p, c in zip(prompts, ctx_lists)]
        out = self.generate_ids(self.decoder.encode_prompts(rendered), ctx_lists, max_new_tokens, **generate_kwargs)
        return out[0] if single else out

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], contexts: Sequence[Sequence[CompressedContext]],
                     max_new_tokens: int = 64, **generate_kwargs) -> list[str]:
        """``generate`` for prompts already rendered and tokenized by the decoder's tokenizer.

        Each row must hold one placeholder id per context. Raises ValueError for latents of
        another compressor or width.
        """
        latents = self.context_latents(prompt_ids, contexts)
        return self.decoder.generate_ids([list(r) for r in prompt_ids], latents, max_new_tokens=max_new_tokens,
                                         **generate_kwargs)

    def context_latents(self, prompt_ids: Sequence[Sequence[int]],
                        contexts: Sequence[Sequence[CompressedContext]]) -> list[list[torch.Tensor]]:
        """The latents of each prompt's contexts, on this device, after checking they are this compressor's.

        What every decoder backend reads (:mod:`semidyn_rag.serving`). Raises ValueError for
        latents of another compressor or width, or a context list per prompt that is missing.
        """
        ctx_lists = [list(c) for c in contexts]
        if len(ctx_lists) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(ctx_lists)} context lists")
        fp, d = self.fingerprint, self.decoder.hidden_size
        for ctxs in ctx_lists:
            for c in ctxs:
                if c.latents.shape[-1] != d:
                    raise ValueError(f"latents are {c.latents.shape[-1]}-d but the decoder takes {d}-d embeddings")
                if c.fingerprint != fp:
                    raise ValueError(f"a context was compressed by another compressor ({c.fingerprint} != {fp})")
        return [[c.latents.to(self.device) for c in ctxs] for ctxs in ctx_lists]

    # -- persistence ----------------------------------------------------------------------------

    def save_pretrained(self, path) -> None:
        """Write the checkpoint folder (config, adapters, head, pooling, projector)."""
        save_compressor(self, path)

    @classmethod
    def from_pretrained(cls, path_or_id: str, **overrides) -> SemiDynamicCompressor:
        """Load a checkpoint in this package's layout or the authors' released layout.

        ``overrides`` replace config fields (e.g. ``device``, or ``encoder``/``decoder`` to point
        at local copies of the base models). Raises CheckpointError on a mismatched checkpoint.
        """
        return load_compressor(cls, path_or_id, **overrides)


def _is_fully_trained(config: CompressorConfig, which: str) -> bool:
    return (config.encoder_training if which == "encoder" else config.decoder_training) == "full"


def apply_training(model: nn.Module, mode: str, lora, *, causal_lm: bool) -> nn.Module:
    """Wrap ``model`` in a LoRA adapter, unfreeze it fully, or freeze it, per ``mode``."""
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=lora.target_modules, task_type="CAUSAL_LM" if causal_lm else None)
        return get_peft_model(model, cfg)
    model.requires_grad_(mode == "full")
    return model


def _weight_bytes(t: torch.Tensor) -> bytes:
    """Bytes of a weight rounded to bf16, so fp32 and bf16 copies of one model hash alike."""
    return t.detach().to("cpu", torch.bfloat16).view(torch.int16).contiguous().numpy().tobytes()


def _base_signature(model: nn.Module) -> str:
    """A cheap hash of a frozen base model: strided samples of its first and last weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = [p for n, p in base.named_parameters() if "lora_" not in n]
    h = hashlib.sha256(type(base).__name__.encode())
    for p in (params[0], params[-1]):
        flat = p.detach().reshape(-1)
        h.update(_weight_bytes(flat[:: max(1, flat.numel() // 65536)]))
        h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()
