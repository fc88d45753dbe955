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
from pathlib import Path

from . import folder_arg

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a compressor from a YAML config",
                              description=__doc__.splitlines()[0])
    _add_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML training config (see semidyn_rag.training.config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.max_steps=100 (repeatable; YAML values)")
    p.add_argument("--output-dir", type=folder_arg, help="override output_dir")
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
    problem = yaml_problem(args.config)
    if problem:
        logger.error("%s", problem)
        return 2
    try:
        config = load_train_config(args.config, overrides)
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2
    except Exception as e:  # a --set value that is not YAML
        import yaml

        if not isinstance(e, yaml.YAMLError):
            raise
        logger.error("a --set value is not valid YAML: %s", _yaml_reason(e))
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


def yaml_problem(path: str) -> str | None:
    """Why the YAML file at ``path`` cannot be read (naming the file, line and column), or None."""
    import yaml

    file = Path(path)
    if not file.is_file():
        return None  # load_train_config says so
    try:
        yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); a training config is a YAML file"
    except yaml.YAMLError as e:
        return f"{path} is not valid YAML: {_yaml_reason(e)}"
    return None


def _yaml_reason(e) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m semidyn_rag.cli.train`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="semidyn-rag train", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
