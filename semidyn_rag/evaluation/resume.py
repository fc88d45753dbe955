"""Resume bookkeeping of an evaluation run: its key, its result log, and reused baselines.

A run's key (``run.json``) lists everything its answers depend on; ``samples.jsonl`` holds one
scored line per (system, question). Reopening a folder keeps those lines only when the key
matches, so a killed run resumes and a run with other settings is refused instead of mixed in;
text-baseline answers may be copied from another folder whose key differs only in the compressor.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .datasets import QASample
from .decoding import routed_backend
from .errors import EvalError
from .records import ResultLog
from .systems import System

if TYPE_CHECKING:
    from .runner import EvalConfig

logger = logging.getLogger(__name__)


def run_key(config: EvalConfig, comp, samples: Sequence[QASample], baseline_base: bool) -> dict:
    """What results depend on; a resumed run must match it exactly."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.question, list(s.answers), s.context]).encode())
    key = {
        "dataset": config.dataset, "split": config.split, "dataset_digest": h.hexdigest()[:32],
        "seed": config.seed, "setting": config.setting,
        "k": config.k if config.setting == "rag" else None,
        "corpus": config.corpus, "corpus_digest": _corpus_digest(config.corpus) if config.corpus else None,
        "retriever": config.retriever,
        "compressor_fingerprint": comp.fingerprint, "max_new_tokens": config.max_new_tokens,
        "question_suffix": config.question_suffix, "baseline_decoder_is_base": baseline_base,
        "decode_batch_size": config.decode_batch_size,
        "baseline_fingerprint": _baseline_fingerprint(comp, config),
    }
    # answers decoded by another backend (vLLM, bf16 kernels) are not interchangeable; recorded only
    # when not transformers, so the keys of existing folders still match
    backend = routed_backend()
    if backend not in (None, "transformers"):
        key["decoder_backend"] = backend
    return key


def _baseline_fingerprint(comp, config: EvalConfig) -> str:
    """What text-baseline answers depend on: the base decoder, its tokenizer and prompt template."""
    tok = comp.decoder.tokenizer
    h = hashlib.sha256(comp.decoder_base_signature.encode())
    h.update(json.dumps([len(tok), getattr(tok, "chat_template", None) or "", config.llmlingua_model]).encode())
    return h.hexdigest()[:32]


# Run-key fields that may differ between runs whose text baselines are interchangeable.
_BASELINE_FREE = {"compressor_fingerprint"}


def import_baselines(src: Path, key: dict, log: ResultLog, systems: list[System], questions) -> int:
    """Copy text-baseline answers from the eval folder ``src`` into ``log``; return how many."""
    run_file = src / "run.json"
    if not run_file.is_file():
        raise EvalError(f"--reuse-baselines {src}: no run.json there (not an eval folder)")
    other = json.loads(run_file.read_text())
    if not (key["baseline_decoder_is_base"] and other.get("baseline_decoder_is_base")):
        raise EvalError("--reuse-baselines needs both runs to read baselines with the base decoder")
    diff = _key_diff(other, key, ignore=_BASELINE_FREE)
    if diff:
        raise EvalError(f"--reuse-baselines {src}: its baselines come from another setup (differs in: "
                        f"{', '.join(diff)})")
    theirs = ResultLog(src / "samples.jsonl").results
    n = 0
    for system in systems:
        if not system.baseline:
            continue
        for q in questions:
            r = theirs.get((system.name, q.id))
            if r is not None and (system.name, q.id) not in log:
                log.append(r)
                n += 1
    logger.info("reused %d baseline answers from %s", n, src)
    return n


def _corpus_digest(path: str) -> str:
    from ..corpus import CorpusError, read_manifest

    try:
        return read_manifest(path).texts_digest
    except CorpusError as e:
        raise EvalError(str(e)) from None


_PATH_KEYS = {"dataset", "corpus"}


def _key_diff(old: dict, new: dict, ignore: set[str] = frozenset()) -> list[str]:
    """Run-key fields on which two runs differ (paths may be spelled differently between runs;
    their content digests are compared instead)."""
    return sorted(k for k in (set(old) | set(new)) - _PATH_KEYS - ignore if old.get(k) != new.get(k))


def open_log(out: Path, key: dict, overwrite: bool) -> ResultLog:
    """The folder's result log, after recording ``key`` in ``run.json``.

    Raises EvalError if the folder holds results of a run with another key (unless ``overwrite``,
    which discards them).
    """
    run_file, log_file = out / "run.json", out / "samples.jsonl"
    if run_file.is_file() and not overwrite:
        old = json.loads(run_file.read_text())
        diff = _key_diff(old, key)
        if diff:
            raise EvalError(f"{out} holds results of another run (differs in: {', '.join(diff)}); "
                            "use another --out, or --overwrite to discard them")
    elif log_file.exists():
        log_file.unlink()
    run_file.write_text(json.dumps(key, indent=2) + "\n")
    return ResultLog(log_file)
