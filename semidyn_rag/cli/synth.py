"""``semidyn-rag synth``: make training records with a teacher LLM, or label them offline.

* ``synth generate``: seed contexts -> phase 1 (QA pairs + summaries) and phase 2
  (ultra-concise summaries) -> ``OUT/records.jsonl``. Resumable: rerun to continue.
* ``synth summarize``: phase 2 alone, adding teacher summaries to existing records.
* ``synth proxy``: no teacher; an offline density proxy (LM surprisal or zlib) fills in
  ``pseudo_summary_fraction``. A proxy for the paper's label, not the label itself.
* ``synth cloze``: no teacher; QA records that blank a name, date or number in one sentence
  of each chunk and ask for it (deterministic; see ``training.cloze``).

The teacher is ``--teacher-url`` (an OpenAI-compatible server such as ``vllm serve``) or
``--teacher-model`` (a local transformers model).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _teacher_args(p) -> None:
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher-url", help="OpenAI-compatible API root, e.g. http://localhost:8000/v1")
    g.add_argument("--teacher-model", help="model name at the endpoint, or a local transformers model")
    g.add_argument("--teacher-gguf-file", help="GGUF file inside --teacher-model (local teacher)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoint's API key")
    g.add_argument("--max-tokens", type=int, default=1024, help="reply length limit (default 1024)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--concurrency", type=int, default=8, help="parallel HTTP requests (default 8)")
    g.add_argument("--device", help="device of a local teacher (default: CUDA if available)")
    g.add_argument("--batch-size", type=int, default=8, help="seeds per teacher call / state flush (default 8)")
    g.add_argument("--retry-rejected", action="store_true", help="ask again for seeds whose output was rejected")


def _limit_args(p) -> None:
    g = p.add_argument_group("validation")
    g.add_argument("--max-answer-words", type=int, default=30)
    g.add_argument("--max-question-words", type=int, default=40)
    g.add_argument("--max-concise-ratio", type=float, default=0.5,
                   help="ultra-concise summary words / context words, at most (default 0.5)")
    g.add_argument("--grounding", choices=("substring", "overlap"), default="substring",
                   help="answer must be a substring of the context, or mostly its words")


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="synthesize training records (teacher LLM or offline proxy)",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="synth_command", metavar="ACTION", required=True)

    g = sub.add_parser("generate", help="seed contexts -> QA pairs, summaries, ultra-concise summaries")
    g.add_argument("seeds", nargs="+", help="seed files or folders (.txt/.md chunked, .jsonl/.json, .parquet)")
    g.add_argument("--out", required=True, help="output folder (phase files + records.jsonl)")
    g.add_argument("--text-field", default="context", help="JSON/parquet field holding the text")
    g.add_argument("--min-words", type=int, default=50)
    g.add_argument("--max-words", type=int, default=700, help="longer texts are chunked (default 700)")
    g.add_argument("--limit", type=int, help="use at most this many seeds")
    g.add_argument("--questions", type=int, default=3, help="QA pairs asked per context (default 3)")
    g.add_argument("--phases", default="1,2", help="phases to run (default 1,2)")
    g.add_argument("--multi-doc-fraction", type=float, default=0.0,
                   help="share of QA pairs also turned into multi-document QA (default 0)")
    g.add_argument("--multi-doc-contexts", type=int, default=3)
    g.add_argument("--seed", type=int, default=0)
    _teacher_args(g)
    _limit_args(g)
    g.set_defaults(func=run)

    s = sub.add_parser("summarize", help="add teacher ultra-concise summaries to existing records")
    s.add_argument("records", help="training records (JSONL)")
    s.add_argument("--out", required=True, help="output JSONL (state kept next to it)")
    _teacher_args(s)
    _limit_args(s)
    s.set_defaults(func=run)

    x = sub.add_parser("proxy", help="offline density proxy: no teacher needed")
    x.add_argument("records", help="training records (JSONL)")
    x.add_argument("--out", required=True, help="output JSONL")
    x.add_argument("--method", choices=("lm", "zlib"), default="lm",
                   help="lm: mean surprisal under --model; zlib: compressed bits per char")
    x.add_argument("--model", help="small causal LM for --method lm (e.g. embedded:smollm2, a folder)")
    x.add_argument("--gguf-file", help="GGUF file inside --model")
    x.add_argument("--device")
    x.add_argument("--y-mid", type=float, default=3.0, help="label of a median-density text (default 3 = 8x)")
    x.add_argument("--gain", type=float, default=1.0, help="label change per doubling of density (default 1)")
    x.add_argument("--reference", type=float, help="density mapped to --y-mid (default: the corpus median)")
    x.add_argument("--overwrite", action="store_true", help="also replace teacher summaries")
    x.set_defaults(func=run)

    c = sub.add_parser("cloze", help="cloze QA records from any text: blank a name, date or number and ask for it")
    c.add_argument("seeds", nargs="+", help="text files or folders (.txt/.md chunked, .jsonl/.json, .parquet)")
    c.add_argument("--out", required=True, help="output JSONL of training records")
    c.add_argument("--text-field", default="context", help="JSON/parquet field holding the text")
    c.add_argument("--min-words", type=int, default=20, help="shorter chunks are dropped (default 20)")
    c.add_argument("--max-words", type=int, default=300, help="longer texts are chunked (default 300)")
    c.add_argument("--limit", type=int, help="use at most this many chunks")
    c.add_argument("--per-chunk", type=int, default=1, help="questions per chunk, on distinct sentences (default 1)")
    c.add_argument("--seed", type=int, default=0, help="which sentence and span each chunk gets (default 0)")
    c.set_defaults(func=run)


def _teacher(args):
    from ..training.teachers import OpenAITeacher, TransformersTeacher

    if args.teacher_url:
        if not args.teacher_model:
            raise ValueError("--teacher-url needs --teacher-model (the model name the server serves)")
        return OpenAITeacher(args.teacher_url, args.teacher_model, api_key_env=args.api_key_env,
                             max_tokens=args.max_tokens, temperature=args.temperature,
                             concurrency=args.concurrency)
    if args.teacher_model:
        return TransformersTeacher(args.teacher_model, gguf_file=args.teacher_gguf_file, device=args.device,
                                   max_new_tokens=args.max_tokens, temperature=args.temperature,
                                   batch_size=args.batch_size)
    raise ValueError("no teacher: pass --teacher-url URL --teacher-model NAME, or --teacher-model PATH "
                     "(or use `synth proxy` for the offline density proxy)")


def _limits(args):
    from ..training.prompts import Limits

    return Limits(max_answer_words=args.max_answer_words, max_question_words=args.max_question_words,
                  max_concise_ratio=args.max_concise_ratio, grounding=args.grounding)


def run(args) -> int:
    from ..training.records import RecordError
    from ..training.teachers import TeacherError

    try:
        return _run(args)
    except (ValueError, FileNotFoundError, RecordError, TeacherError) as e:
        logger.error("%s", e)
        return 2


def _run(args) -> int:
    from ..training import synth

    if args.synth_command == "cloze":
        from ..training.cloze import cloze_records
        from ..training.records import write_records

        if args.per_chunk < 1:
            raise ValueError(f"--per-chunk must be at least 1, got {args.per_chunk}")
        seeds = synth.load_seeds(args.seeds, text_field=args.text_field, min_words=args.min_words,
                                 max_words=args.max_words, limit=args.limit)
        if not seeds:
            raise ValueError("no chunk left after the length filter (see --min-words/--max-words)")
        records, empty = cloze_records([(s.source, s.text) for s in seeds], per_chunk=args.per_chunk, seed=args.seed)
        n = write_records(args.out, records)
        print(f"{n} cloze records from {len(seeds)} chunks written to {args.out} ({empty} chunks had no "
              "blankable name, date or number)")
        return 0

    if args.synth_command == "generate":
        phases = [int(p) for p in args.phases.split(",") if p.strip()]
        if not phases or any(p not in (1, 2) for p in phases):
            raise ValueError(f"--phases must list 1 and/or 2, got {args.phases!r}")
        seeds = synth.load_seeds(args.seeds, text_field=args.text_field, min_words=args.min_words,
                                 max_words=args.max_words, limit=args.limit)
        if not seeds:
            raise ValueError("no seed context left after the length filter (see --min-words/--max-words)")
        stats = synth.synthesize(seeds, _teacher(args), args.out, phases=phases, n_questions=args.questions,
                                 limits=_limits(args), batch_size=args.batch_size,
                                 retry_rejected=args.retry_rejected, multi_doc_fraction=args.multi_doc_fraction,
                                 multi_doc_contexts=args.multi_doc_contexts, seed=args.seed)
        print(f"{stats.seeds} seeds ({stats.done_before[1]} already done in phase 1, {stats.done_before[2]} in "
              f"phase 2); kept {stats.kept_qa} new QA pairs; {stats.records} records in {args.out}/records.jsonl")
        if stats.rejected:
            print("rejected: " + ", ".join(f"{k} x{v}" for k, v in sorted(stats.rejected.items())))
        return 0
    if args.synth_command == "summarize":
        stats = synth.summarize_records(args.records, _teacher(args), args.out, limits=_limits(args),
                                        batch_size=args.batch_size, retry_rejected=args.retry_rejected)
        print(f"{stats.records} records written to {args.out} ({stats.asked[2]} contexts asked)")
        return 0
    from ..training.proxy import SurprisalProxy, annotate_with_proxy
    from ..training.records import load_records, write_records

    records = load_records(args.records)
    proxy = None
    if args.method == "lm":
        if not args.model:
            raise ValueError("--method lm needs --model (a small causal LM); or use --method zlib")
        proxy = SurprisalProxy(args.model, gguf_file=args.gguf_file, device=args.device)
    out = annotate_with_proxy(records, args.method, proxy=proxy, y_mid=args.y_mid, gain=args.gain,
                              reference=args.reference, overwrite=args.overwrite)
    n = write_records(args.out, out)
    print(f"{n} records with proxy density labels ({args.method}) written to {args.out}")
    return 0
