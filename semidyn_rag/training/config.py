"""The training configuration a user writes as YAML: one pydantic model per concern.

``semidyn-rag train --config run.yaml`` reads a file like::

    compressor: {encoder: Qwen/Qwen3-0.6B, decoder: Qwen/Qwen3-0.6B}
    data: {train: data/train.jsonl, eval_fraction: 0.02}
    objective: {mode: semi_dynamic, lambda_mse: 1.0}
    optim: {lr: 4.0e-5, batch_size: 8, grad_accum: 10, max_steps: 20000, warmup_steps: 500}
    output_dir: runs/semidyn

Relative paths are taken from the current directory. Unknown keys are errors, so a typo
fails at load time instead of silently training something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import CompressorConfig

Mode = Literal["semi_dynamic", "static", "multi_ratio", "fully_dynamic"]
Precision = Literal["auto", "bf16", "fp32"]


class DataConfig(BaseModel):
    """Where the records come from and which of them are held out for evaluation."""

    model_config = ConfigDict(extra="forbid")

    train: str | list[str] = Field(description="JSONL training file(s).")
    eval: str | list[str] | None = Field(None, description="Held-out JSONL file(s); else eval_fraction of train.")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0,
                                 description="Share of train held out, split by context (no context in both).")
    eval_max_records: int | None = Field(256, ge=1, description="Cap on held-out records evaluated.")
    max_answer_tokens: int = Field(256, ge=1, description="Answer tokens kept as targets (longer ones are cut).")


class ObjectiveConfig(BaseModel):
    """What the loss is made of: LM + lambda * MSE, plus optional distillation and reconstruction."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "semi_dynamic"
    static_factor: int | None = Field(None, ge=1, description="The one factor (or latent count) in static mode.")
    lambda_mse: float = Field(1.0, ge=0.0, description="Weight of the density head's MSE (paper: 1).")
    distill_weight: float = Field(0.0, ge=0.0, description="Weight of the token-level KL to the decoder "
                                  "reading the uncompressed context (adapters disabled); 0 = off.")
    distill_temperature: float = Field(1.0, gt=0.0)
    reconstruction_prob: float = Field(0.0, ge=0.0, le=1.0, description="Chance that a sample is replaced "
                                       "by 'reproduce the context' with the context as the target.")
    reconstruction_instruction: str = "Repeat the context word for word."
    reconstruction_max_tokens: int = Field(128, ge=1, description="Target tokens of a reconstruction sample.")
    hidden_align_weight: float = Field(0.0, ge=0.0, description="Weight of the hidden-state alignment to the "
                                       "decoder reading the plain text (adapters disabled): latent rows to their "
                                       "window's mean state, question/answer tokens to the same tokens; 0 = off.")
    hidden_align_layers: list[int] | None = Field(None, description="Decoder layers aligned: 0 = embeddings, "
                                                  "k = output of layer k, negative = from the end; None = all.")
    hidden_align_metric: Literal["nmse", "cosine"] = Field(
        "nmse", description="Per-row distance: |s - t|^2 / |t|^2 (nmse) or 1 - cos(s, t) (cosine).")

    @property
    def uses_head(self) -> bool:
        """Whether the density head is trained (its MSE is part of the loss) in this mode."""
        return self.mode in ("semi_dynamic", "fully_dynamic") and self.lambda_mse > 0

    @property
    def needs_teacher(self) -> bool:
        """Whether batches need the plain-text prompts of the base decoder (distillation or alignment)."""
        return self.distill_weight > 0 or self.hidden_align_weight > 0


class OptimConfig(BaseModel):
    """AdamW with linear warmup and cosine decay; batches and accumulation."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(4e-5, gt=0.0, description="Learning rate of the pretrained models' adapters/weights.")
    new_modules_lr: float | None = Field(None, gt=0.0, description="Learning rate of the projector, density "
                                         "head and memory tokens (trained from scratch); None = lr.")
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine floor as a fraction of the peak.")
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    batch_size: int = Field(4, ge=1, description="Records per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; else derived from epochs.")
    epochs: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _length(self) -> OptimConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set optim.max_steps or optim.epochs")
        return self


class TrainConfig(BaseModel):
    """A whole training run (the YAML file of ``semidyn-rag train``)."""

    model_config = ConfigDict(extra="forbid")

    compressor: CompressorConfig = Field(default_factory=CompressorConfig)
    init_from: str | None = Field(None, description="Start from a saved compressor checkpoint instead "
                                  "(its config replaces `compressor`).")
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig
    output_dir: str = "runs/train"
    precision: Precision = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU.")
    gradient_checkpointing: bool = False
    calibrate_projector: int = Field(0, ge=0, description="Training contexts used for the data-dependent "
                                     "projector init at step 0 (see training.calibration); 0 = off.")
    eval_every: int | None = Field(None, ge=1, description="Optimizer steps between evaluations.")
    save_every: int | None = Field(None, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int | None = Field(None, ge=1, description="Keep only the newest N; None = all.")
    log_every: int = Field(1, ge=1)
    resume: str = Field("auto", description="'auto' (newest checkpoint in output_dir), 'never', or a path.")
    seed: int = 0
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        obj, comp = self.objective, self.compressor
        if obj.mode == "static" and obj.static_factor is None:
            raise ValueError("objective.mode 'static' needs objective.static_factor")
        if obj.static_factor is not None and self.init_from is None:
            from ..pipeline.pooling import build_pooling

            try:
                build_pooling(comp, d_encoder=1).check_size(obj.static_factor)
            except ValueError as e:
                raise ValueError(f"static_factor: {e}") from None
        if obj.needs_teacher and comp.decoder_training == "full" and self.init_from is None:
            raise ValueError("distillation and hidden-state alignment need a decoder with LoRA or frozen (the "
                             "teacher is the base decoder with adapters disabled); decoder_training is 'full'")
        if obj.hidden_align_weight > 0 and self.init_from is None:
            from ..pipeline.pooling import build_pooling

            if not build_pooling(comp, d_encoder=1).pools_windows:
                raise ValueError(f"hidden-state alignment needs latents that are windows of tokens; backbone "
                                 f"{comp.backbone!r} has none")
        return self


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``key='a.b'`` (creating levels); used by ``--set``."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key}: {p} is not a mapping")
    node[parts[-1]] = value


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config; ``overrides`` are ``key.sub=value`` strings (YAML values).

    Raises FileNotFoundError, or ValueError naming the bad field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training config at {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    try:
        return TrainConfig.model_validate(data)
    except Exception as e:
        raise ValueError(f"{path}: {e}") from None
