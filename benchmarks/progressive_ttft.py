"""Time to first token of flat and progressive reading at one matched latent budget.

Over a ``precompress`` corpus directory: for each question, the top ``k`` chunks are retrieved
and their features read from the store once (outside the timings, as every path shares it).
Then, interleaved (A B C A B C ...), each reading answers up to its first token:

* ``flat_top{n}_x{F}``: the top n chunks at factor F (the budget's reference);
* ``flat_all``: all k chunks at the finest factor that fits that budget;
* ``progressive_{signal}``: the coarse scan (attention, likelihood: a decoder pass), the plan,
  the re-read at the planned factors.

TTFT = derive + projector (+ scan) + prompt + placeholder expansion + the prefill forward +
arg-max, i.e. everything after the store read up to the first token. Medians per question
over ``--reps`` after a warm-up, then the median over questions; also the decoder positions
prefilled (answering read, plus the scan's).

    python -m benchmarks.progressive_ttft --corpus DIR --dataset heldout.jsonl --compressor CKPT \
        [--questions 20] [--k 20] [--budget-k 5] [--factor 4] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

from .common import Run, configure_threads, measure_interleaved, table
from .ttft import first_token


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--compressor", required=True)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--budget-k", type=int, default=5)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--signals", default="retriever,attention,likelihood")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--question-suffix", default=" Answer briefly.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    threads = configure_threads(args.threads)

    from semidyn_rag import SemiDynamicCompressor
    from semidyn_rag.corpus import CorpusDirectory
    from semidyn_rag.evaluation.datasets import load_qa_dataset, sample_subset
    from semidyn_rag.evaluation.progressive import FlatAll, FlatTop, Progressive
    from semidyn_rag.evaluation.systems import ContextItem

    run = Run("progressive_ttft", {**vars(args), "threads": threads})
    comp = SemiDynamicCompressor.from_pretrained(args.compressor, device="cpu")
    systems = [FlatTop(args.factor, args.budget_k), FlatAll(args.factor, args.budget_k)]
    systems += [Progressive(s, args.factor, args.budget_k) for s in args.signals.split(",")]
    per: dict[str, list[float]] = {s.name: [] for s in systems}
    positions: dict[str, list[int]] = {s.name: [] for s in systems}
    questions = sample_subset(load_qa_dataset(args.dataset), args.questions, 0)
    with CorpusDirectory(args.corpus, readonly_store=True) as cd:
        for i, q in enumerate(questions):
            hits = cd.search(q.question, args.k)
            feats = cd.features(hits, comp, write_back=False).features
            items = [ContextItem(h.chunk.text, f) for h, f in zip(hits, feats)]
            question = q.question + args.question_suffix

            def path(system):
                def go():
                    prep = system.prepare(comp, question, items)
                    inp = comp.decoder.expand([prep.prompt_ids], [[x.to(comp.device) for x in prep.latents]])
                    first_token(comp.decoder.model, inp)
                    return prep
                return go

            fns = {s.name: path(s) for s in systems}
            timings = measure_interleaved(fns, warmup=1, reps=args.reps)
            for s in systems:
                per[s.name].append(timings[s.name].median)
                prep = fns[s.name]()
                positions[s.name].append(len(prep.prompt_ids) - len(prep.latents)
                                         + sum(x.shape[0] for x in prep.latents) + prep.extra["scan_positions"])
            print(f"question {i + 1}/{len(questions)}: " + ", ".join(
                f"{k} {v[-1]:.3f} s" for k, v in per.items()), flush=True)
    ref = statistics.median(per[systems[0].name])
    rows = [{"system": name, "ttft_s": statistics.median(v), "vs_flat_top": statistics.median(v) / ref,
             "prefill_positions": statistics.fmean(positions[name])} for name, v in per.items()]
    print(table(rows, [("system", "system", ""), ("ttft_s", "TTFT s (median)", ".3f"),
                       ("vs_flat_top", "x flat top", ".2f"), ("prefill_positions", "prefill positions", ".0f")]))
    run.results = {"rows": rows, "per_question_s": per, "positions": positions}
    return run.finish(args.out)


if __name__ == "__main__":
    main()
