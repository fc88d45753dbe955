"""The training loop: joint LM + MSE training of a compressor, resumable to the exact step.

Modes (Section 3 and the ablations): ``semi_dynamic`` draws one candidate factor per
micro-batch for the decoder and trains the density head alongside; ``multi_ratio`` draws the
same way with no head loss; ``static`` always uses one factor (one model per ratio);
``fully_dynamic`` pools with the head's own continuous prediction (the failing baseline).

A run writes ``output_dir/`` with ``train_config.json``, ``metrics.jsonl``, ``loss.png``,
``checkpoints/step-NNNNNNNN/`` (everything a resume needs; ``checkpointing`` owns that layout)
and ``final/`` (the trained compressor). Resuming restores all of it, and since the data order
and every random draw are functions of the seed and the step, the resumed run continues exactly
as the uninterrupted one would. The optimizer and schedule come from ``optim``, the process
group, device and precision from ``runtime``.

Single process on CPU or one GPU works as is; under ``torchrun`` (WORLD_SIZE > 1) each process
reads its shard of every global batch and gradients are averaged by DDP.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..compressor import SemiDynamicCompressor
from .calibration import calibrate_projector
from .checkpointing import find_resume_checkpoint, restore_checkpoint, write_checkpoint
from .config import TrainConfig
from .data import BatchOrder, collate, load_examples, split_by_context
from .metrics import MetricsLog, plot_metrics
from .objective import CompressorObjective
from .optim import lr_lambda, make_optimizer
from .runtime import barrier, init_distributed, seed_everything, train_device, use_bf16

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a finished run left its outputs, and its last logged numbers."""

    output_dir: Path
    final_dir: Path
    steps: int
    last_train: dict
    last_eval: dict | None


class Trainer:
    """Builds the compressor, data, optimizer and schedule from a TrainConfig and trains."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.rank, self.world, local_rank = init_distributed()
        self.is_main = self.rank == 0
        self.out = Path(config.output_dir)
        self.device = train_device(config, local_rank, self.world)
        seed_everything(config.seed)
        self.comp = _build_compressor(config, self.device)
        self.bf16 = use_bf16(config.precision, self.device)
        obj = config.objective
        cfg = self.comp.config
        self.candidates = list(cfg.candidates)
        if obj.mode == "static":
            self.comp.pooling.check_size(obj.static_factor)
        if obj.needs_teacher and cfg.decoder_training == "full":
            raise ValueError("distillation and alignment need a LoRA or frozen decoder (the teacher is the "
                             "base decoder)")
        if not obj.uses_head:
            self.comp.density_head.requires_grad_(False)
        if config.gradient_checkpointing:
            for m in (self.comp.encoder.model, self.comp.decoder.model):
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._load_data()
        self.objective = CompressorObjective(self.comp, obj)
        self.model = self.objective
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.objective, device_ids=ids)
        self.params = [(n, p) for n, p in self.comp.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: every module is frozen")
        self.optimizer = make_optimizer(self.params, config)

        def lr_scale(step: int) -> float:  # reads max_steps at each step: a subclass may re-plan it
            return lr_lambda(config, self.max_steps)(step)

        self._lr_scale = lr_scale
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_scale)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.step = 0
        self._resume()
        if self.step == 0 and config.calibrate_projector and config.init_from is None:
            unique = {tuple(c): None for ex in self.train_examples for c in ex.context_ids}
            ctx = list(unique)[: config.calibrate_projector]
            self.calibration = calibrate_projector(self.comp, ctx)

    # -- setup ----------------------------------------------------------------------------------

    def _load_data(self) -> None:
        cfg, obj = self.config, self.config.objective
        d = cfg.data
        kw = dict(max_answer_tokens=d.max_answer_tokens, reconstruction=obj.reconstruction_prob > 0,
                  distill=obj.distill_weight > 0, align=obj.hidden_align_weight > 0,
                  recon_instruction=obj.reconstruction_instruction,
                  recon_max_tokens=obj.reconstruction_max_tokens, progress=cfg.progress and self.is_main)
        train_paths = [d.train] if isinstance(d.train, str) else list(d.train)
        examples, records = load_examples(train_paths, self.comp, **kw)
        if d.eval is not None:
            eval_paths = [d.eval] if isinstance(d.eval, str) else list(d.eval)
            self.eval_examples = load_examples(eval_paths, self.comp, **{**kw, "reconstruction": False})[0]
            self.train_examples = examples
        elif d.eval_fraction > 0:
            tr, held, dropped = split_by_context(records, d.eval_fraction, cfg.seed)
            if dropped:
                logger.info("%d records mix held-out and training contexts; left out of both", dropped)
            self.train_examples = [examples[i] for i in tr]
            self.eval_examples = [examples[i] for i in held]
        else:
            self.train_examples, self.eval_examples = examples, []
        if d.eval_max_records is not None:
            self.eval_examples = self.eval_examples[: d.eval_max_records]
        if not self.train_examples:
            raise ValueError("no training records left after the held-out split")
        o = cfg.optim
        self.order = BatchOrder(len(self.train_examples), o.batch_size, cfg.seed, self.rank, self.world)
        self.max_steps = o.max_steps or max(1, math.ceil(o.epochs * self.order.per_epoch / o.grad_accum))
        n_lab = sum(y is not None for ex in self.train_examples for y in ex.labels)
        n_ctx = sum(len(ex.labels) for ex in self.train_examples)
        if self.is_main:
            logger.info("%d training records (%d of %d contexts labelled), %d held out; %d steps",
                        len(self.train_examples), n_lab, n_ctx, len(self.eval_examples), self.max_steps)
        if obj.uses_head and n_lab == 0:
            logger.warning("no training record has a density label: the head's MSE term is always 0")

    # -- one step -------------------------------------------------------------------------------

    def _draws(self, mb: int, n: int) -> tuple[list[int] | None, list[bool]]:
        """Per-sample sizes and reconstruction flags of micro-batch ``mb``: functions of (seed, mb)."""
        obj = self.config.objective
        g = torch.Generator().manual_seed(_mix(self.config.seed, mb))
        if obj.mode in ("semi_dynamic", "multi_ratio"):
            f = self.candidates[int(torch.randint(len(self.candidates), (1,), generator=g))]
            sizes = [f] * n
        elif obj.mode == "static":
            sizes = [obj.static_factor] * n
        else:
            sizes = None
        recon = [False] * n
        if obj.reconstruction_prob > 0:
            gr = torch.Generator().manual_seed(_mix(self.config.seed, mb, self.rank + 1))
            recon = (torch.rand(n, generator=gr) < obj.reconstruction_prob).tolist()
        return sizes, recon

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics row."""
        o = self.config.optim
        t0 = time.perf_counter()
        if not self.comp.training:
            self.comp.train()
        sums: dict[str, float] = {}
        loss_total, epoch = 0.0, 0
        for micro in range(o.grad_accum):
            mb = self.step * o.grad_accum + micro
            epoch, idx = self.order.batch(mb)
            examples = [self.train_examples[i] for i in idx]
            sizes, recon = self._draws(mb, len(examples))
            batch = collate(examples, sizes, recon, distill=self.config.objective.needs_teacher)
            sync = (self.model.no_sync() if self.world > 1 and micro < o.grad_accum - 1
                    else contextlib.nullcontext())
            with sync, self._autocast():
                out = self.model(batch)
                (out["loss"] / o.grad_accum).backward()
            loss_total += float(out["loss"].detach()) / o.grad_accum
            for k in ("lm_sum", "n_tok", "mse_sum", "n_lab", "kl_sum", "align_sum", "n_align", "n_latents",
                      "n_ctx_tokens", "size_sum"):
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k])
            sums["n_ctx"] = sums.get("n_ctx", 0.0) + len(batch.context_ids)
            sums["n_recon"] = sums.get("n_recon", 0.0) + batch.n_reconstruction
        grad_norm = None
        if o.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.params], o.max_grad_norm))
        lr = o.lr * self._lr_scale(self.step)  # the pretrained weights' rate at this step
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        sums = self._all_reduce(sums)
        if self.world > 1:
            loss_total = self._all_reduce({"l": loss_total})["l"] / self.world
        row = {"split": "train", "step": self.step, "epoch": epoch, "lr": lr, "loss": loss_total,
               **_summarise(sums), "grad_norm": grad_norm, "sec": time.perf_counter() - t0}
        return row

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out losses with the inference-time choice of factor; None without a held-out set."""
        if not self.eval_examples:
            return None
        obj = self.config.objective
        bs = self.config.optim.batch_size
        mine = self.eval_examples[self.rank :: self.world]
        self.comp.eval()
        sums: dict[str, float] = {}
        for b, s in enumerate(range(0, len(mine), bs)):
            examples = mine[s : s + bs]
            if obj.mode == "static":
                sizes = [obj.static_factor] * len(examples)
            elif obj.mode == "multi_ratio":
                sizes = [self.candidates[b % len(self.candidates)]] * len(examples)
            else:
                sizes = None  # the head chooses (semi_dynamic), or sets the size (fully_dynamic)
            batch = collate(examples, sizes, distill=obj.needs_teacher)
            with self._autocast():
                out = self.objective(batch)
            for k in ("lm_sum", "n_tok", "mse_sum", "n_lab", "kl_sum", "align_sum", "n_align", "n_latents",
                      "n_ctx_tokens", "size_sum"):
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k])
            sums["n_ctx"] = sums.get("n_ctx", 0.0) + len(batch.context_ids)
        self.comp.train()
        sums = self._all_reduce(sums)
        row = {"split": "eval", "step": self.step, **_summarise(sums)}
        row["loss"] = row["lm"] + (obj.lambda_mse * row["mse"] if obj.uses_head and row.get("mse") is not None
                                   else 0.0) + (obj.distill_weight * row["kl"] if "kl" in row else 0.0) + (
            obj.hidden_align_weight * row["align"] if "align" in row else 0.0)
        return row

    def _all_reduce(self, sums: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not sums:
            return sums
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Train to ``max_steps`` (evaluating, checkpointing, logging); save and return the result."""
        cfg = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(cfg.model_dump_json(indent=2))
        bar = tqdm(total=self.max_steps, initial=self.step, desc="training", dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        last_train, last_eval = {}, None
        while self.step < self.max_steps:
            row = self.train_step()
            last_train = row
            if self.is_main and (self.step % cfg.log_every == 0 or self.step == self.max_steps):
                self.metrics.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lm=f"{row['lm']:.3f}",
                            **({"mse": f"{row['mse']:.3f}"} if row.get("mse") is not None else {}))
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                last_eval = self._log_eval()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.max_steps:
                self.save_checkpoint()
        bar.close()
        if cfg.eval_every and (last_eval is None or last_eval["step"] != self.step):
            last_eval = self._log_eval()
        self.save_checkpoint()
        final = self.out / "final"
        if self.is_main:
            self.comp.save_pretrained(final)
            plot_metrics(self.metrics.rows(), self.out / "loss.png")
        barrier(self.world)
        return TrainResult(self.out, final, self.step, last_train, last_eval)

    def _log_eval(self) -> dict | None:
        row = self.evaluate()
        if row is not None and self.is_main:
            self.metrics.write(row)
            plot_metrics(self.metrics.rows(), self.out / "loss.png")
            logger.info("step %d eval: loss %.4f lm %.4f%s", self.step, row["loss"], row["lm"],
                        f" mse {row['mse']:.4f}" if row.get("mse") is not None else "")
        return row

    # -- checkpoints (the layout lives in checkpointing.py) ----------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (a crash mid-save leaves the previous one)."""
        state = {"step": self.step, "micro_batches": self.step * self.config.optim.grad_accum,
                 "max_steps": self.max_steps, "world_size": self.world,
                 "config": self.config.model_dump(mode="json")}
        return write_checkpoint(self.out / "checkpoints", self.step, state, self.comp, self.params,
                                self.optimizer, self.scheduler, rank=self.rank, world=self.world,
                                keep=self.config.keep_checkpoints)

    def _resume(self) -> None:
        path = find_resume_checkpoint(self.out, self.config.resume)
        if path is not None:
            self.load_checkpoint(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, RNG and step from a checkpoint folder."""
        path = Path(path)
        state = restore_checkpoint(path, self.config.model_dump(mode="json"), self.params, self.optimizer,
                                   self.scheduler, rank=self.rank, world=self.world, device=self.device)
        self.step = int(state["step"])
        if self.is_main:
            self.metrics.truncate(self.step)
            logger.info("resumed from %s at step %d", path, self.step)


def train(config: TrainConfig) -> TrainResult:
    """Train a compressor as ``config`` says; returns where the outputs are."""
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# -- helpers -------------------------------------------------------------------------------------

def _summarise(s: dict[str, float]) -> dict:
    """Averages from summed counters: token-weighted LM, label-weighted MSE, ratio, mean size."""
    row = {"lm": s.get("lm_sum", 0.0) / max(s.get("n_tok", 0.0), 1.0),
           "mse": s["mse_sum"] / s["n_lab"] if s.get("n_lab") else None,
           "labelled": int(s.get("n_lab", 0)),
           "answer_tokens": int(s.get("n_tok", 0)),
           "ratio": s.get("n_ctx_tokens", 0.0) / max(s.get("n_latents", 0.0), 1.0),
           "mean_size": s.get("size_sum", 0.0) / max(s.get("n_ctx", 0.0), 1.0)}
    if "kl_sum" in s:
        row["kl"] = s["kl_sum"] / max(s.get("n_tok", 0.0), 1.0)
    if "align_sum" in s:
        row["align"] = s["align_sum"] / max(s.get("n_align", 0.0), 1.0)
        row["align_rows"] = int(s.get("n_align", 0))
    if "n_recon" in s:
        row["reconstruction"] = int(s["n_recon"])
    return row


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _build_compressor(config: TrainConfig, device: torch.device) -> SemiDynamicCompressor:
    """The compressor to train, with fp32 master weights (bf16 comes from autocast).

    Its saved config keeps the user's ``device``/``dtype`` so the result loads as configured.
    """
    run = {"device": str(device), "dtype": "float32"}
    if config.init_from:
        comp = SemiDynamicCompressor.from_pretrained(config.init_from, is_trainable=True, **run)
        user = {"device": None, "dtype": "auto"}
    else:
        comp = SemiDynamicCompressor(config.compressor, **run)
        user = {"device": config.compressor.device, "dtype": config.compressor.dtype}
    comp.config = comp.config.model_copy(update=user)
    return comp


__all__ = ["Trainer", "TrainResult", "train"]
