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

    scale = math.sqrt(args.batch_size / CPU_BATCH)
    cfg = load_train_config(RECIPE)
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
    return load_train_config(RECIPE, [f"{k}={v}" for k, v in sets.items()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training JSONL (prepare_data.py, then `synth proxy`)")
    p.add_argument("--model", help="base model for encoder and decoder (local folder or hub id); "
                                   "default: the recipe's (embedded SmolLM2)")
    p.add_argument("--out", default="runs/gpu", help="output folder (checkpoints, metrics, loss.png)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--dry-run", action="store_true", help="2 steps, batch 2, on the CPU")
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
