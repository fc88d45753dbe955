"""``semidyn-rag eval``: answer a QA set with and without compression and report side by side.

Writes ``results.json``, ``results.md``, ``pareto.png`` and the resumable ``samples.jsonl``
into ``--out``; rerun the same command to resume an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
import math

from . import (add_backend_arguments, add_trust_remote_code, allow_negative_values, backend_choice,
               compressor_overrides, folder_arg)

logger = logging.getLogger(__name__)

def parse_scales(text: str) -> list[float]:
    """``START:STOP:STEP`` (inclusive) or a comma list, e.g. ``-2:4:0.5`` or ``0,1,2``."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise argparse.ArgumentTypeError(f"need START <= STOP and STEP > 0 in {text!r}")
            if not all(map(math.isfinite, parts)):
                raise argparse.ArgumentTypeError(f"scales must be finite numbers, got {text!r}")
            n = int((stop - start) / step + 1e-9)
            return [round(start + i * step, 10) for i in range(n + 1)]
        scales = [float(p) for p in text.split(",") if p.strip()]
        if not all(map(math.isfinite, scales)):
            raise argparse.ArgumentTypeError(f"scales must be finite numbers (NaN and infinity select no "
                                             f"factor), got {text!r}")
        return scales
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be START:STOP:STEP or a comma list, got {text!r}") from None


def parse_ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def parse_names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def register(subparsers) -> None:
    from ..evaluation.systems import DEFAULT_FAMILIES, FAMILIES

    p = subparsers.add_parser("eval", help="QA accuracy with and without compression, side by side",
                              description="Answer a QA set with and without compression; report side by side.")
    allow_negative_values(p)  # `--scales -2:4:0.5` works as written
    p.add_argument("--dataset", required=True, help="a .jsonl/.json/.parquet file, or squad, adversarial_qa, "
                   "hotpot_qa, nq (needs the `datasets` package and the hub)")
    p.add_argument("--compressor", required=True, help="compressor checkpoint folder or hub id")
    p.add_argument("--out", required=True, type=folder_arg, help="output folder (results, table, plot, resumable log)")
    p.add_argument("--split", default="validation", help="split of a named dataset (default validation)")
    p.add_argument("--setting", choices=("gold", "rag"), default="gold",
                   help="gold: each question's own context; rag: top-k retrieved chunks (default gold)")
    p.add_argument("--k", type=int, default=5, help="chunks retrieved per question in rag (default 5)")
    p.add_argument("--corpus", help="rag: retrieve from this corpus folder (made by precompress)")
    p.add_argument("--retriever", help="sentence-transformers model for rag (default MiniLM)")
    p.add_argument("--systems", type=parse_names, default=list(DEFAULT_FAMILIES),
                   help=f"comma list of system families, from {','.join(FAMILIES)} (default: "
                        f"{','.join(DEFAULT_FAMILIES)}; the text-pruning peers truncate, sentence_optimizer "
                        "and longllmlingua run at the fixed factors when named)")
    p.add_argument("--scales", type=parse_scales, default=None,
                   help="semi-dynamic scales, START:STOP:STEP or a list (default -2:4:0.5)")
    p.add_argument("--factors", type=parse_ints, default=None,
                   help="fixed factors, comma list (default: the compressor's candidates)")
    p.add_argument("--limit", type=int, help="evaluate a seeded random subset of N questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--question-suffix", default="", help="appended to each question, e.g. ' Answer briefly.'")
    p.add_argument("--baseline-decoder", choices=("base", "tuned"), default="base",
                   help="decoder for uncompressed/no-context/LLMLingua: base LLM (adapters off) or tuned")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per encoder batch")
    p.add_argument("--reuse-baselines", metavar="DIR",
                   help="copy the text baselines' answers from an earlier eval folder of the same setup "
                        "(another checkpoint of the same base model)")
    p.add_argument("--decode-batch-size", type=int, default=1,
                   help="questions decoded together (default 1: per-question latencies; more = faster runs, "
                        "latencies become per-question shares of a batch)")
    p.add_argument("--llmlingua", choices=("auto", "on", "off"), default="auto",
                   help="LLMLingua-2 baseline: auto = when installed and loadable")
    p.add_argument("--llmlingua-model", default=None, help="LLMLingua-2 model name")
    p.add_argument("--lingua-scorer", metavar="MODEL",
                   help="longllmlingua's scoring causal LM, a local folder or hub id (default: the decoder's "
                        "own base model)")
    p.add_argument("--on-overflow", choices=("error", "truncate", "skip"), default="skip",
                   help="contexts over the encoder limit, for every system alike: skip the questions reading "
                        "them (default; counted in the report), truncate them to the limit, or stop")
    p.add_argument("--budget-k", type=int, default=5,
                   help="progressive_* systems: each question's latent budget is what its top N retrieved "
                        "chunks take at each fixed factor (default 5; use --k above it)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the checkpoint's)")
    add_trust_remote_code(p)
    add_backend_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="discard results of another run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.errors import EvalError
    from ..evaluation.runner import EvalConfig, run_evaluation

    fields = dict(
        dataset=args.dataset, compressor=args.compressor, out=args.out, split=args.split, setting=args.setting,
        k=args.k, corpus=args.corpus, retriever=args.retriever, systems=args.systems, factors=args.factors,
        limit=args.limit, seed=args.seed, max_new_tokens=args.max_new_tokens,
        question_suffix=args.question_suffix, baseline_decoder=args.baseline_decoder,
        batch_size=args.batch_size, decode_batch_size=args.decode_batch_size,
        reuse_baselines=args.reuse_baselines, llmlingua=args.llmlingua, device=args.device,
        lingua_scorer=args.lingua_scorer, on_overflow=args.on_overflow, budget_k=args.budget_k,
        overwrite=args.overwrite, progress=not args.no_progress,
        trust_remote_code=bool(compressor_overrides(args).get("trust_remote_code")),
    )
    if args.scales is not None:
        fields["scales"] = args.scales
    if args.llmlingua_model:
        fields["llmlingua_model"] = args.llmlingua_model
    from pydantic import ValidationError

    from ..checkpoint import CheckpointError
    from ..corpus import CorpusError
    from ..evaluation.datasets import DatasetError

    try:
        outcome = _evaluate(args, EvalConfig(**fields), run_evaluation)
    except ValidationError as e:
        logger.error("invalid options: %s", "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}" for err in e.errors()))
        return 2
    except (EvalError, DatasetError, CorpusError, CheckpointError) as e:
        logger.error("%s", e)
        return 2
    print((outcome.out_dir / "results.md").read_text())
    print(f"{outcome.computed} answers computed, {outcome.reused} reused; files: "
          + ", ".join(str(p) for p in outcome.files.values()))
    return 0


def _evaluate(args: argparse.Namespace, config, run_evaluation):
    """Run the evaluation, decoding on vLLM when ``--backend vllm`` / ``--vllm-url`` asks for it.

    In process, the compressed systems read with an engine on the merged decoder and the base-LLM
    baselines with a second engine on the base weights, started only if a baseline is decoded.
    """
    from ..evaluation.errors import EvalError

    try:
        name, url = backend_choice(args)
    except argparse.ArgumentTypeError as e:
        raise EvalError(str(e)) from None
    if name == "transformers":
        return run_evaluation(config)
    from ..compressor import SemiDynamicCompressor
    from ..evaluation.decoding import decoding_backends, has_adapters
    from ..serving import make_backend

    overrides = {"device": config.device} if config.device else {}
    if config.trust_remote_code:
        overrides["trust_remote_code"] = True
    comp = SemiDynamicCompressor.from_pretrained(config.compressor, **overrides)
    base = None
    if url is None and config.baseline_decoder == "base" and has_adapters(comp.decoder.model):
        base = lambda: make_backend(comp, "vllm", base=True)  # noqa: E731 (made on first use)
    routes = {"tuned": make_backend(comp, "vllm", vllm_url=url), "base": None}
    try:
        with decoding_backends(routes["tuned"], base) as routes:
            return run_evaluation(config, compressor=comp)
    finally:
        for backend in routes.values():
            if hasattr(backend, "close"):
                backend.close()
