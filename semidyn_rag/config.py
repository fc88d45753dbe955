"""User-facing configuration of a compressor: which models, which backbone, which ratios.

One pydantic model per concern (LoRA settings apart from the compressor as a whole), so a
saved checkpoint carries a JSON file a person can read and edit, and a bad value is rejected
when the config is built rather than deep inside a forward pass.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Backbone = Literal["mean_pool", "last_tokens", "compression_tokens"]
PoolAlign = Literal["start", "end"]
RoundingMode = Literal["round", "ceil", "floor"]
CompareSpace = Literal["linear", "log"]
Training = Literal["lora", "full", "frozen"]


class LoraSettings(BaseModel):
    """LoRA adapter settings for one model (the paper: r=16 on all linear modules)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1)
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class CompressorConfig(BaseModel):
    """Everything that defines a semi-dynamic compressor, saved as its checkpoint's config.json.

    Defaults follow the paper: Qwen3-0.6B as encoder and decoder, mean pooling over a
    bidirectional encoder, factors {2, 4, 8, 16, 32} compared in linear space, a projector with
    a 4096-wide hidden layer, LoRA r=16 (alpha 128 encoder, 64 decoder) on all linear modules.
    """

    model_config = ConfigDict(extra="forbid")

    encoder: str = "Qwen/Qwen3-0.6B"
    decoder: str = "Qwen/Qwen3-0.6B"
    encoder_gguf_file: str | None = None
    decoder_gguf_file: str | None = None
    encoder_num_layers: int | None = Field(
        None, ge=1, description="Keep only the first N encoder layers (a cheaper encoder)."
    )

    backbone: Backbone = "mean_pool"
    density_head: bool = Field(
        True, description="Sizes are chosen by the density head; False = a static or multi-ratio model "
        "(the caller passes factor= or length= unless there is a single candidate)."
    )
    length_rule: Literal["nearest", "authors"] = Field(
        "nearest", description="Token stages: 'nearest' snaps n / 2^(y + scale) with the selector; 'authors' is "
        "their semi-dynamic int rule (the candidate nearest floor((n + 1) * 2^-(y + scale)), at most n + 1)."
    )
    factors: tuple[int, ...] = (2, 4, 8, 16, 32)
    lengths: tuple[int, ...] = (16, 32, 64, 128)
    rounding: RoundingMode = "round"
    compare_space: CompareSpace = "linear"
    bidirectional: bool | None = Field(
        None, description="Bidirectional encoder attention; None = on for mean_pool only."
    )
    pool_end_marker: bool = Field(
        True, description="Mean pooling: pool the appended end marker with the text (the authors' eval rule)."
    )
    pool_align: PoolAlign = Field(
        "start", description="Mean pooling windows: 'start' (true means, last window partial; the authors' "
        "semi-dynamic inference) or 'end' (left zero padding, divided by the window; their static models)."
    )

    placeholder_token: str | None = Field(
        None, description="Decoder token expanded to the latents; None = pick an unused special token."
    )
    projector_hidden_size: int = Field(4096, ge=1)
    projector_gated: bool = False

    encoder_training: Training = "lora"
    decoder_training: Training = "lora"
    encoder_lora: LoraSettings = LoraSettings(alpha=128)
    decoder_lora: LoraSettings = LoraSettings(alpha=64)

    max_context_tokens: int = Field(2048, ge=1)
    on_overflow: Literal["error", "truncate"] = "error"
    device: str | None = Field(None, description="None = CUDA when available, else CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False

    @field_validator("factors", "lengths")
    @classmethod
    def _positive_sorted_unique(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("the candidate set must not be empty")
        if any(x < 1 for x in v):
            raise ValueError(f"candidates must be positive integers, got {v}")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _check_backbone(self) -> CompressorConfig:
        from .pipeline.pooling import build_pooling

        build_pooling(self, d_encoder=1)  # the stage refuses sizes it cannot pool (e.g. non-nesting factors)
        if self.backbone == "compression_tokens" and self.is_bidirectional:
            raise ValueError("compression_tokens needs a causal encoder (bidirectional=False)")
        return self

    def with_overrides(self, **overrides) -> CompressorConfig:
        """A validated copy with some fields replaced (``self`` when there are none)."""
        return CompressorConfig.model_validate({**self.model_dump(), **overrides}) if overrides else self

    @property
    def is_bidirectional(self) -> bool:
        """Whether the encoder attends both ways (default: only for mean pooling)."""
        return self.backbone == "mean_pool" if self.bidirectional is None else self.bidirectional

    @property
    def candidates(self) -> tuple[int, ...]:
        """The discrete set the selector quantizes to: factors or lengths, by backbone."""
        return self.factors if self.backbone == "mean_pool" else self.lengths
