"""The training loop: joint LM + MSE training of a compressor, resumable to the exact step.

Modes (Section 3 and the ablations): ``semi_dynamic`` draws one candidate factor per
micro-batch for the decoder and trains the density head alongside; ``multi_ratio`` draws the
same way with no head loss; ``static`` always uses one factor (one model per ratio);
``fully_dynamic`` pools with the head's own continuous prediction (the failing baseline).

A run writes ``output_dir/`` with ``train_config.json``, ``metrics.jsonl``, ``loss.png``,
``checkpoints/step-NNNNNNNN/`` (trainable weights, optimizer, scheduler, RNG states of every
process, the step, and a loadable ``compressor/``) and ``final/`` (the trained compressor).
Resuming restores all of it, and since the data order and every random draw are functions of
the seed and the step, the resumed run continues exactly as the uninterrupted one would.

Single process on CPU or one GPU works as is; under ``torchrun`` (WORLD_SIZE > 1) each process
reads its shard of every global batch and gradients are averaged by DDP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..compressor import SemiDynamicCompressor
from .calibration import calibrate_projector
from .config import TrainConfig
from .data import BatchOrder, collate, load_examples, split_by_context
from .metrics import MetricsLog, plot_metrics
from .objective import CompressorObjective

logger = logging.getLogger(__name__)

_NEW_MODULES = ("projector.", "density_head.", "backbone.")
# Config keys that may change between a run and its resumption without breaking exactness.
_RESUME_FREE = {"output_dir", "resume", "eval_every", "save_every", "keep_checkpoints", "log_every", "progress"}


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
        self.rank, self.world, local_rank = _init_distributed()
        self.is_main = self.rank == 0
        self.out = Path(config.output_dir)
        self.device = _device(config, local_rank, self.world)
        _seed_everything(config.seed)
        self.comp = _build_compressor(config, self.device)
        self.bf16 = _use_bf16(config.precision, self.device)
        obj = config.objective
        cfg = self.comp.config
        self.candidates = list(cfg.candidates)
        if obj.mode == "static":
            f = obj.static_factor
            if cfg.backbone == "mean_pool" and f % cfg.factors[0]:
                raise ValueError(f"static_factor {f} is not a multiple of the finest factor {cfg.factors[0]}")
        if obj.distill_weight > 0 and cfg.decoder_training == "full":
            raise ValueError("distillation needs a LoRA or frozen decoder (the teacher is the base decoder)")
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
        self.optimizer = _make_optimizer(self.params, config)
        self._lr_scale = _lr_lambda(config, self.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_scale)
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
                  distill=obj.distill_weight > 0, recon_instruction=obj.reconstruction_instruction,
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
            batch = collate(examples, sizes, recon, distill=self.config.objective.distill_weight > 0)
            sync = (self.model.no_sync() if self.world > 1 and micro < o.grad_accum - 1
                    else contextlib.nullcontext())
            with sync, self._autocast():
                out = self.model(batch)
                (out["loss"] / o.grad_accum).backward()
            loss_total += float(out["loss"].detach()) / o.grad_accum
            for k in ("lm_sum", "n_tok", "mse_sum", "n_lab", "kl_sum", "n_latents", "n_ctx_tokens", "size_sum"):
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
            batch = collate(examples, sizes, distill=obj.distill_weight > 0)
            with self._autocast():
                out = self.objective(batch)
            for k in ("lm_sum", "n_tok", "mse_sum", "n_lab", "kl_sum", "n_latents", "n_ctx_tokens", "size_sum"):
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k])
            sums["n_ctx"] = sums.get("n_ctx", 0.0) + len(batch.context_ids)
        self.comp.train()
        sums = self._all_reduce(sums)
        row = {"split": "eval", "step": self.step, **_summarise(sums)}
        row["loss"] = row["lm"] + (obj.lambda_mse * row["mse"] if obj.uses_head and row.get("mse") is not None
                                   else 0.0) + (obj.distill_weight * row["kl"] if "kl" in row else 0.0)
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
        _barrier(self.world)
        return TrainResult(self.out, final, self.step, last_train, last_eval)

    def _log_eval(self) -> dict | None:
        row = self.evaluate()
        if row is not None and self.is_main:
            self.metrics.write(row)
            plot_metrics(self.metrics.rows(), self.out / "loss.png")
            logger.info("step %d eval: loss %.4f lm %.4f%s", self.step, row["loss"], row["lm"],
                        f" mse {row['mse']:.4f}" if row.get("mse") is not None else "")
        return row

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (a crash mid-save leaves the previous one)."""
        ckpts = self.out / "checkpoints"
        final = ckpts / f"step-{self.step:08d}"
        tmp = ckpts / f".step-{self.step:08d}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.world)
        _save_rng(tmp / f"rng-rank{self.rank}")
        _barrier(self.world)
        if self.is_main:
            save_file({n: p.detach().contiguous().cpu() for n, p in self.params}, str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
            state = {"step": self.step, "micro_batches": self.step * self.config.optim.grad_accum,
                     "max_steps": self.max_steps, "world_size": self.world,
                     "config": self.config.model_dump(mode="json")}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            self.comp.save_pretrained(tmp / "compressor")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune(ckpts)
        _barrier(self.world)
        return final

    def _prune(self, ckpts: Path) -> None:
        keep = self.config.keep_checkpoints
        if keep is None:
            return
        for old in sorted(ckpts.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        how = self.config.resume
        if how == "never":
            return
        if how == "auto":
            found = sorted((self.out / "checkpoints").glob("step-*"))
            if not found:
                return
            path = found[-1]
        else:
            path = Path(how)
            if not (path / "trainer_state.json").is_file():
                raise FileNotFoundError(f"{path} is not a training checkpoint (no trainer_state.json)")
        self.load_checkpoint(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, RNG and step from a checkpoint folder."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("world_size", 1) != self.world:
            raise ValueError(f"{path} was written by {state['world_size']} process(es); this run has {self.world} "
                             "(the data shards would differ)")
        changed = _changed_keys(state.get("config", {}), self.config.model_dump(mode="json"))
        if changed:
            logger.warning("resuming %s with a changed config (%s): the run is no longer an exact "
                           "continuation", path, ", ".join(changed))
        weights = load_file(str(path / "trainable.safetensors"))
        names = {n for n, _ in self.params}
        if set(weights) != names:
            missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
            raise ValueError(f"{path} does not fit this model's trainable weights: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(weights[n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        rng = path / f"rng-rank{self.rank}"
        _load_rng(rng)
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
    if "n_recon" in s:
        row["reconstruction"] = int(s["n_recon"])
    return row


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if not prefix and k in _RESUME_FREE:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _device(config: TrainConfig, local_rank: int, world: int) -> torch.device:
    from ..device import resolve_device

    dev = resolve_device(config.compressor.device if config.init_from is None else None)
    if world > 1 and dev.type == "cuda":
        return torch.device("cuda", local_rank)
    return dev


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision bf16 needs a CUDA device; on CPU bf16 runs 5-30x slower than fp32, use fp32")
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


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


def _make_optimizer(params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the from-scratch modules in their own group; no decay on vectors (norms, biases)."""
    o = config.optim
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in params:
        groups.setdefault((n.startswith(_NEW_MODULES), p.dim() >= 2), []).append(p)
    param_groups = []
    for (new, decay), ps in sorted(groups.items()):
        param_groups.append({"params": ps, "lr": (o.new_modules_lr or o.lr) if new else o.lr,
                             "weight_decay": o.weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, betas=o.betas)


def _lr_lambda(config: TrainConfig, total: int):
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it at ``total``."""
    warm, floor = config.optim.warmup_steps, config.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _save_rng(stem: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    torch.save(tensors, stem.with_suffix(".pt"))
    py = random.getstate()
    npy = np.random.get_state()
    stem.with_suffix(".json").write_text(json.dumps({
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }))


def _load_rng(stem: Path) -> None:
    if not stem.with_suffix(".pt").is_file():
        raise FileNotFoundError(f"no RNG state {stem}.pt in the checkpoint")
    tensors = torch.load(stem.with_suffix(".pt"), weights_only=True)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    js = json.loads(stem.with_suffix(".json").read_text())
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


__all__ = ["Trainer", "TrainResult", "train"]
