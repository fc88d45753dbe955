"""``semidyn-rag train``: train a compressor from a YAML config (LM + lambda * MSE, resumable).

Rerun the same command to resume from the newest checkpoint in the config's ``output_dir``.
Under ``torchrun --nproc_per_node N -m semidyn_rag.cli.train --config FILE.yaml`` each process
trains on its shard of every batch and gradients are averaged (DDP).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a compressor from a YAML config",
                              description=__doc__.splitlines()[0])
    _add_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML training config (see semidyn_rag.training.config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.max_steps=100 (repeatable; YAML values)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--resume", help="'auto' (default), 'never', or a checkpoint folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.config import load_train_config
    from ..training.records import RecordError

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"resume={args.resume}")
    if args.no_progress:
        overrides.append("progress=false")
    try:
        config = load_train_config(args.config, overrides)
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2
    from ..training.trainer import train

    try:
        result = train(config)
    except (RecordError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0
    last = result.last_eval or result.last_train
    print(f"trained {result.steps} steps; compressor saved to {result.final_dir}")
    if last:
        print(f"last {'eval' if result.last_eval else 'train'}: lm {last['lm']:.4f}"
              + (f", mse {last['mse']:.4f}" if last.get("mse") is not None else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m semidyn_rag.cli.train`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="semidyn-rag train", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
