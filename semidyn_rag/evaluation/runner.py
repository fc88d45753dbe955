"""One evaluation run: every system answers every question; results land in ``--out``.

Order of work: load the questions; find each question's contexts (its own in the ``gold``
setting; top-k retrieved in ``rag``); encode every needed context ONCE (``comp.encode``),
from which each fixed factor and semi-dynamic scale derives its latents
(``comp.compress_features``); then, system by system, answer each question with a timed
greedy decode and append the scored line to ``samples.jsonl``. A rerun with the same
settings skips what is already there, so a killed run resumes where it stopped; a rerun with
other settings is refused (the ``run.json`` key differs) rather than mixed in. This module
holds the run's config and its answering loop; ``contexts`` plans and encodes the contexts,
``resume`` keeps the run key and the result log.

Decoding runs one question at a time by default, so that latencies are per question (prefill,
decode, time to first token). ``decode_batch_size`` > 1 decodes that many questions of one
system as a left-padded batch: several times the throughput for large runs, with latencies
then reported as per-question shares of each batch's time.

Contexts over the encoder's limit are handled alike for every system (``on_overflow``): the
default ``skip`` leaves out every question reading one (counted in the report and in
``overflow.json``, so a resumed run skips the same ones); ``truncate`` cuts them to the limit
for text and latent systems alike; ``error`` stops the run naming the questions.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..compressor import SemiDynamicCompressor
from .contexts import Overflow, encode_contexts, handle_overflow, plan_contexts
from .datasets import QASample, load_qa_dataset, sample_subset
from .decoding import has_adapters, timed_generate, timed_generate_batch
from .errors import EvalError
from .metrics import exact_match, f1_score, substring_match, summarize
from .records import ResultLog, SampleResult, SystemSummary
from .resume import import_baselines, open_log, run_key
from .retrieval import CorpusRetriever
from .systems import DEFAULT_FAMILIES, DEFAULT_LLMLINGUA_MODEL, FAMILIES, ContextItem, System, build_systems

logger = logging.getLogger(__name__)

PAPER_SCALES = tuple(x / 2 for x in range(-4, 9))  # -2, -1.5, ..., 4 (the paper's Figure 4 sweep)


class EvalConfig(BaseModel):
    """Everything that defines an evaluation run (saved as ``config.json`` in the output folder)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    out: str
    compressor: str | None = Field(None, description="Checkpoint folder or hub id (or pass a compressor object).")
    trust_remote_code: bool = Field(False, description="Let the base models' own Python files run (never set "
                                    "by a checkpoint; only by the caller).")
    split: str = "validation"
    setting: Literal["gold", "rag"] = "gold"
    k: int = Field(5, ge=1)
    corpus: str | None = Field(None, description="A corpus folder made by `precompress` to retrieve from.")
    retriever: str | None = Field(None, description="sentence-transformers model; None = MiniLM.")
    systems: list[str] = list(DEFAULT_FAMILIES)
    factors: list[int] | None = Field(None, description="Fixed factors; None = the compressor's candidates.")
    scales: list[float] = list(PAPER_SCALES)
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    max_new_tokens: int = Field(32, ge=1)
    question_suffix: str = Field("", description="Appended to every question, e.g. ' Answer briefly.'")
    baseline_decoder: Literal["base", "tuned"] = "base"
    batch_size: int = Field(16, ge=1, description="Contexts per encoder batch.")
    reuse_baselines: str | None = Field(None, description="An earlier eval folder whose text-baseline answers "
                                        "(uncompressed, no context, LLMLingua-2) are copied instead of recomputed; "
                                        "it must match this run in everything but the compressor.")
    decode_batch_size: int = Field(1, ge=1, description="Questions of one system decoded as one batch; "
                                   "> 1 reports latencies as per-question shares of the batch.")
    warmup: int = Field(2, ge=0, description="Untimed generate calls before timing starts.")
    llmlingua: Literal["auto", "on", "off"] = "auto"
    llmlingua_model: str = DEFAULT_LLMLINGUA_MODEL
    lingua_scorer: str | None = Field(None, description="LongLLMLingua's scorer (a causal LM folder or hub id); "
                                      "None = the decoder's own base model.")
    on_overflow: Literal["error", "truncate", "skip"] = Field(
        "skip", description="Contexts over the encoder limit: skip the questions reading them, truncate them "
        "(for every system alike), or stop with an error.")
    budget_k: int = Field(5, ge=1, description="Progressive systems: the latent budget is what the top budget_k "
                          "contexts take at each fixed factor.")
    device: str | None = None
    overwrite: bool = False
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.corpus and self.setting != "rag":
            raise ValueError("--corpus is for the rag setting; gold reads each question's own context")
        if self.corpus and self.retriever:
            raise ValueError("--retriever does not apply with --corpus: the corpus folder fixes its embedder")
        if not self.systems:
            raise ValueError("no systems to run")
        unknown = sorted(set(self.systems) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(FAMILIES)}")
        return self


@dataclass
class EvalOutcome:
    """What a run produced: per-system summaries, how much was computed vs reused, and files."""

    out_dir: Path
    summaries: list[SystemSummary]
    computed: int
    reused: int
    skipped_systems: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def run_evaluation(config: EvalConfig, compressor: SemiDynamicCompressor | None = None) -> EvalOutcome:
    """Run (or resume) the evaluation ``config`` describes and write its report.

    Raises EvalError for a dataset that does not fit the setting, a resumed output folder
    holding another run, or contexts the encoder cannot take.
    """
    from .report import write_report

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _seed(config.seed)
    all_samples = load_qa_dataset(config.dataset, split=config.split)  # before the models: fail fast
    comp = compressor if compressor is not None else _load_compressor(config)
    questions = sample_subset(all_samples, config.limit, config.seed)
    baseline_base = _baseline_is_base(comp, config.baseline_decoder)
    key = run_key(config, comp, all_samples, baseline_base)
    if config.on_overflow == "truncate":  # changes what over-limit questions read (skip and error do not)
        key["on_overflow"] = "truncate"
    if config.lingua_scorer:
        key["lingua_scorer"] = config.lingua_scorer
    log = open_log(out, key, config.overwrite)
    (out / "config.json").write_text(config.model_dump_json(indent=2) + "\n")
    overflow = _load_overflow(out, config, comp)

    systems, skipped = build_systems(comp, config.systems, factors=config.factors, scales=config.scales,
                                     llmlingua=config.llmlingua, llmlingua_model=config.llmlingua_model,
                                     scorer=config.lingua_scorer, budget_k=config.budget_k)
    if config.reuse_baselines:
        import_baselines(Path(config.reuse_baselines), key, log, systems, questions)
    pending = [(s, q) for s in systems for q in questions
               if (s.name, q.id) not in log and q.id not in overflow.skipped_questions]
    reads = {}
    if pending:
        reads, pending = _run_pending(config, comp, all_samples, pending, log, baseline_base, out, overflow)
    kept = [q for q in questions if q.id not in overflow.skipped_questions]
    if not kept:
        raise EvalError(f"every question reads a context over the encoder limit ({overflow.limit} tokens); "
                        "use --on-overflow truncate")
    reused = len(systems) * len(kept) - len(pending)
    summaries = [summarize([log.results[(s.name, q.id)] for q in kept], s.family, s.param) for s in systems]
    ov = overflow.to_json()
    meta = {"run": key, "n_questions": len(kept), "skipped_systems": skipped,
            "overflow": {k: v for k, v in ov.items() if k != "context_digests"},
            "last_invocation": {"computed": len(pending), "reused": reused, **reads}}
    files = write_report(out, summaries, meta)
    return EvalOutcome(out, summaries, len(pending), reused, skipped, files)


def _load_overflow(out: Path, config: EvalConfig, comp) -> Overflow:
    """What earlier invocations of this run found over the encoder limit (``overflow.json``)."""
    path = out / "overflow.json"
    if path.is_file():
        found = Overflow.from_json(json.loads(path.read_text()))
        if found.mode == config.on_overflow and found.limit == comp.encoder.max_tokens:
            return found
    return Overflow(config.on_overflow, comp.encoder.max_tokens)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _load_compressor(config: EvalConfig) -> SemiDynamicCompressor:
    if not config.compressor:
        raise EvalError("no compressor given: pass --compressor CKPT")
    overrides = {"device": config.device} if config.device else {}
    if config.trust_remote_code:
        overrides["trust_remote_code"] = True
    return SemiDynamicCompressor.from_pretrained(config.compressor, **overrides)


def _baseline_is_base(comp: SemiDynamicCompressor, wanted: str) -> bool:
    """Whether the baselines can really read with the base decoder (adapters switched off)."""
    if wanted == "tuned":
        return False
    if has_adapters(comp.decoder.model):
        return True
    if comp.config.decoder_training == "full":
        logger.warning("the decoder is fully fine-tuned (no base weights kept): baselines use the tuned decoder")
    return False  # frozen decoder: base and tuned are the same weights


def _run_pending(config: EvalConfig, comp, all_samples, pending: list[tuple[System, QASample]],
                 log: ResultLog, baseline_base: bool, out: Path, overflow: Overflow) -> tuple[dict, list]:
    """Answer every pending (system, question) pair; return what feature reads cost and the
    pairs answered (those of questions skipped for an over-limit context left out)."""
    # Every pending question is planned, the no-context ones too: on_overflow applies to all alike.
    needing = list({q.id: q for s, q in pending}.values())
    ctx = plan_contexts(config, comp, all_samples, needing, out)
    try:
        handle_overflow(config, comp, ctx, overflow)
        atomic_write_text(out / "overflow.json", json.dumps(overflow.to_json(), indent=2) + "\n")
        pending = [(s, q) for s, q in pending if q.id not in overflow.skipped_questions]
        plan = ctx.plan
        latent_ids = sorted({i for s, q in pending if s.needs_features for i in plan[q.id].corpus_ids})
        items = {i: ContextItem(t) for i, t in enumerate(ctx.texts)}
        encode_contexts(config, comp, items, latent_ids, plan, ctx.features, encoded=ctx.encoded)
    finally:
        if ctx.retriever is not None and hasattr(ctx.retriever, "close"):
            ctx.retriever.close()

    def prepare(system: System, q: QASample):
        contexts = [items[i] for i in plan[q.id].corpus_ids] if system.uses_context else []
        return system.prepare(comp, q.question + config.question_suffix, contexts)

    if not pending:
        return {"contexts_encoded_or_read": 0}, pending
    if config.warmup:  # first calls pay one-off costs; keep them out of the timings
        s, q = pending[0]
        prep = prepare(s, q)
        for _ in range(config.warmup):
            timed_generate(comp.decoder, prep.prompt_ids, prep.latents, max_new_tokens=2,
                           base=baseline_base and s.baseline)
    bar = tqdm(total=len(pending), desc="answering", unit="q", disable=not config.progress)
    for group in _decode_groups(pending, config.decode_batch_size):
        system = group[0][0]
        bar.set_postfix_str(system.name, refresh=False)
        preps = [prepare(system, q) for _, q in group]
        gens = timed_generate_batch(comp.decoder, [p.prompt_ids for p in preps], [p.latents for p in preps],
                                    max_new_tokens=config.max_new_tokens, base=baseline_base and system.baseline)
        for (_, q), prep, gen in zip(group, preps, gens):
            qp = plan.get(q.id) if system.uses_context else None
            retrieve_s = qp.retrieve_s if qp is not None else 0.0
            log.append(SampleResult(
                system=system.name, sample_id=q.id, prediction=gen.text, answers=list(q.answers),
                correct=substring_match(gen.text, q.answers), exact_match=exact_match(gen.text, q.answers),
                f1=f1_score(gen.text, q.answers), chunk_tokens=prep.chunk_tokens,
                chunk_positions=prep.chunk_positions, factors=prep.factors, prefill_tokens=gen.prefill_tokens,
                new_tokens=gen.new_tokens, retrieve_s=retrieve_s, compress_s=prep.compress_s,
                prefill_s=gen.prefill_s, decode_s=gen.decode_s, ttft_s=retrieve_s + prep.compress_s + gen.prefill_s,
                gold_retrieved=qp.gold_retrieved if qp is not None else None,
                compress_cached_s=prep.compress_cached_s, compress_uncached_s=prep.compress_uncached_s,
                extra=prep.extra,
            ))
        bar.update(len(group))
    bar.close()
    reads = {"contexts_encoded_or_read": len(latent_ids)}
    if isinstance(ctx.retriever, CorpusRetriever):
        reads.update(store_hits=ctx.retriever.hits, store_misses_encoded=ctx.retriever.encoded)
    return reads, pending


def _decode_groups(pending: list[tuple[System, QASample]], size: int):
    """Consecutive runs of at most ``size`` pending pairs of one system (pending is system-major)."""
    group: list[tuple[System, QASample]] = []
    for pair in pending:
        if group and (len(group) == size or pair[0].name != group[0][0].name):
            yield group
            group = []
        group.append(pair)
    if group:
        yield group


