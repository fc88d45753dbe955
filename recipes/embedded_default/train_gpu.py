"""The embedded-default training on one GPU: the CPU recipe (``train.yaml``) in bf16, bigger batches.

Offline by design: the base model and the data come in as local paths (or hub ids where the
hub is reachable), and nothing is downloaded. The same samples-per-step budget as the CPU run
is kept per optimizer step by scaling the learning rates with the batch (square-root rule);
everything else (objective, calibration, schedule shape, checkpoints, resume) is the recipe's.

    # on the GPU machine (data from prepare_data.py + `synth proxy`; model = a local HF copy)
    python recipes/embedded_default/train_gpu.py --data data/train_proxy.jsonl \
        --model /path/to/SmolLM2-135M-Instruct --out runs/gpu --batch-size 32 --steps 2000
    # anywhere, to check the path in seconds (CPU, 2 steps, batch 2)
    python recipes/embedded_default/train_gpu.py --data data/train_proxy.jsonl --dry-run --out /tmp/gpu-dry
    # another recipe config (e.g. a head-to-head arm, which continues the shipped default), with overrides
    python recipes/embedded_default/train_gpu.py --config recipes/embedded_default/h2h_b.yaml \
        --data data/train_proxy.jsonl --set "data.train=[data/train_proxy.jsonl,data/wiki_recon_proxy.jsonl]" \
        --set init_from=$PWD/../semidyn_rag/assets/default-compressor --out runs/gpu-b

Rerunning the same command resumes from the newest checkpoint in ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

RECIPE = Path(__file__).with_name("train.yaml")
CPU_BATCH = 4  # the batch the recipe's learning rates were set for


def build_config(args: argparse.Namespace):
    from semidyn_rag.training import load_train_config

    recipe = Path(args.config) if args.config else RECIPE
    scale = math.sqrt(args.batch_size / CPU_BATCH)
    cfg = load_train_config(recipe)
    sets = {
        "data.train": args.data, "output_dir": args.out, "optim.batch_size": args.batch_size,
        "optim.max_steps": args.steps, "optim.lr": cfg.optim.lr * scale,
        "optim.new_modules_lr": (cfg.optim.new_modules_lr or cfg.optim.lr) * scale,
        "compressor.device": "cpu" if args.dry_run else "cuda",
        "precision": "fp32" if args.dry_run else "bf16",
    }
    if args.model:
        sets.update({"compressor.encoder": args.model, "compressor.decoder": args.model})
    if args.dry_run:
        sets.update({"eval_every": 1, "save_every": 1, "optim.warmup_steps": 0})
    return load_train_config(recipe, [f"{k}={v}" for k, v in sets.items()] + list(args.overrides))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training JSONL (prepare_data.py, then `synth proxy`)")
    p.add_argument("--model", help="base model for encoder and decoder (local folder or hub id); "
                                   "default: the recipe's (embedded SmolLM2)")
    p.add_argument("--out", default="runs/gpu", help="output folder (checkpoints, metrics, loss.png)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--dry-run", action="store_true", help="2 steps, batch 2, on the CPU")
    p.add_argument("--config", help="recipe config to scale (default: train.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field after scaling (repeatable; YAML values)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail on a missing local file instead of downloading
    if args.dry_run:
        args.batch_size, args.steps = 2, 2
    else:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device; use --dry-run to check the script on a CPU")
    from semidyn_rag.training.trainer import train

    result = train(build_config(args))
    print(f"{result.steps} steps; final compressor in {result.final_dir}; last eval {result.last_eval}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
