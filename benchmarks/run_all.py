"""Run every CPU benchmark in one go (``make bench``) and summarise the figures against the targets.

Order: ttft, throughput, cache, scaling, chunking, then the GPU script (on a GPU when there is one, else
its ``--dry-run`` as a check that it works). A benchmark that fails is reported and the others
still run; the exit code is non-zero if any failed. Targets are reported as met or missed,
never enforced. Writes ``summary.json`` and ``summary.md`` next to the per-benchmark results.

    python -m benchmarks.run_all [--quick] [--only ttft,cache] [--threads auto] [--out DIR]

The default sizes took 16 minutes on a shared 2-core machine (one thread, load 3 to 5), two
thirds of it in ``ttft`` (its text prefills of up to 5,000 tokens); ``--quick`` cuts sizes and
repetitions to a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from . import cache, chunking, gpu_h200, scaling, throughput, ttft
from .common import RESULTS_DIR, machine_info, write_json

BENCHMARKS = {"ttft": ttft, "throughput": throughput, "cache": cache, "scaling": scaling, "chunking": chunking,
              "gpu": gpu_h200}


def summarise(records: dict[str, dict]) -> list[dict]:
    """One line per target: what was asked, what was measured, met or not."""
    lines = []
    if r := records.get("ttft"):
        for row in r["rows"]:
            if row["k"] == ttft.TARGET_K:
                lines.append({"benchmark": "ttft", "figure": f"TTFT speed-up at k=5, {row['chunk_tokens']}-token chunks",
                              "measured": f"{row['ttft_speedup']:.2f}x of ideal {row['ideal_speedup']:.2f}x "
                                          f"= {row['fraction_of_ideal']:.0%}",
                              "target": f">= {ttft.TARGET_FRACTION:.0%} of ideal",
                              "met": row["fraction_of_ideal"] >= ttft.TARGET_FRACTION})
    if r := records.get("throughput"):
        lines.append({"benchmark": "throughput", "figure": "compress() / bare encoder forward, worst batch setting",
                      "measured": f"{r['worst_overhead']:.3f}x", "target": f"<= {throughput.TARGET:.2f}x",
                      "met": r["meets_target"]})
    if r := records.get("cache"):
        t = r["targets"]
        lines.append({"benchmark": "cache", "figure": "store hit (get_many, 5 keys) vs re-encoding",
                      "measured": f"{t['speedup_vs_encode']:,.0f}x", "target": f">= {cache.TARGET_SPEEDUP}x",
                      "met": t["speedup_met"]})
        lines.append({"benchmark": "cache", "figure": f"store read rate (best batch: {t['best_batch']})",
                      "measured": f"{t['best_rate']:,.0f} chunks/s", "target": f">= {cache.TARGET_RATE:,} chunks/s",
                      "met": t["rate_met"]})
    if r := records.get("scaling"):
        lin = r["linearity"]
        big, small = r["rows"][-1], r["rows"][0]
        lines.append({"benchmark": "scaling",
                      "figure": f"per-chunk time / store size, {big['chunks']:,} vs {small['chunks']:,} chunks",
                      "measured": f"{lin['time_per_chunk_largest_vs_smallest']:.2f}x / "
                                  f"{lin['store_per_chunk_largest_vs_smallest']:.2f}x",
                      "target": "about 1x (linear)", "met": None})
        lines.append({"benchmark": "scaling", "figure": f"query latency, flat index, {big['chunks']:,} vs {small['chunks']:,}",
                      "measured": f"{big['query_ms']:.2f} ms vs {small['query_ms']:.2f} ms", "target": "flat",
                      "met": None})
    return lines


def markdown(lines: list[dict], failures: dict[str, str], info: dict) -> str:
    out = [f"# Benchmark summary ({info['time']})", "",
           f"{info['cpu_count']} CPUs, load {info['loadavg'][0]:.2f} at start, torch {info['torch']}.", "",
           "| benchmark | figure | measured | target | met |", "|---|---|---|---|---|"]
    for x in lines:
        met = "-" if x["met"] is None else ("yes" if x["met"] else "no")
        out.append(f"| {x['benchmark']} | {x['figure']} | {x['measured']} | {x['target']} | {met} |")
    for name, err in failures.items():
        out.append(f"| {name} | FAILED | {err.splitlines()[-1] if err else ''} | | |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (about 5 minutes)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--threads", default="auto", help="torch threads, or 'auto' (free cores at start)")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR})")
    p.add_argument("--model", default=None, choices=["embedded", "tiny"],
                   help="model for every CPU benchmark (default: embedded SmolLM2, tiny for scaling)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    info = machine_info()
    common = ["--threads", str(args.threads)] + (["--quick"] if args.quick else []) + \
             (["--out", args.out] if args.out else []) + (["--no-plot"] if args.no_plot else []) + \
             (["--model", args.model] if args.model else [])
    records, failures, seconds = {}, {}, {}
    t_all = time.perf_counter()
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            if name == "gpu":
                import torch

                gpu_args = ([] if torch.cuda.is_available() else ["--dry-run", "--threads", str(args.threads)]) + \
                           (["--out", args.out] if args.out else [])
                records[name] = gpu_h200.main(gpu_args)
            elif name == "scaling":
                records[name] = scaling.main(common + ["--no-progress"])
            else:
                records[name] = BENCHMARKS[name].main(common)
        except Exception:  # one failure must not hide the other figures
            failures[name] = traceback.format_exc()
            print(failures[name], file=sys.stderr)
        seconds[name] = round(time.perf_counter() - t0, 1)
    lines = summarise(records)
    summary = {"machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()], "quick": args.quick,
               "seconds": seconds, "total_seconds": round(time.perf_counter() - t_all, 1), "targets": lines,
               "failed": failures}
    write_json("summary", summary, args.out)
    md = markdown(lines, failures, info)
    out = Path(args.out) if args.out else RESULTS_DIR
    (out / "summary.md").write_text(md, encoding="utf-8")
    print("\n" + md)
    print(f"total {summary['total_seconds']:.0f} s; per benchmark: {json.dumps(seconds)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
