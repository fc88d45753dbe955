"""Ship a trained run as the package's embedded default: a bf16 export plus a model card.

    python recipes/embedded_default/ship.py --run runs/run --eval runs/eval-final

writes ``semidyn_rag/assets/default-compressor/`` with ``export_compressor`` (the function
behind ``semidyn-rag export``) and ``card.json``: what it was trained on, for how long, and
its measured held-out figures, which ``make demo`` prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ASSET = Path(__file__).resolve().parents[2] / "semidyn_rag" / "assets" / "default-compressor"
LIMIT_MB = 25


def card(run: Path, eval_dir: Path) -> dict:
    cfg = json.loads((run / "train_config.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    results = json.loads((eval_dir / "results.json").read_text())
    systems = {s["system"]: {k: s[k] for k in ("accuracy", "exact_match", "f1", "mean_ratio", "ratio_all", "n")}
               for s in results["systems"]}
    steps = train[-1]["step"] if train else 0
    per_step = cfg["optim"]["batch_size"] * cfg["optim"]["grad_accum"]
    return {
        "name": "semidyn-rag embedded default (SmolLM2-135M-Instruct encoder and decoder)",
        "recipe": "recipes/embedded_default (prepare_data.py, synth proxy --method zlib, train.yaml)",
        "training": {"steps": steps, "samples": steps * per_step,
                     "cpu_seconds": round(sum(r.get("sec") or 0 for r in train)),
                     "last_eval_lm": evals[-1]["lm"] if evals else None},
        "heldout_eval": {"dataset": results["meta"]["run"]["dataset"], "setting": results["meta"]["run"]["setting"],
                         "questions": results["meta"]["n_questions"], "systems": systems},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training output folder (its final/ is shipped)")
    p.add_argument("--checkpoint", help="checkpoint to ship instead of RUN/final")
    p.add_argument("--eval", required=True, help="held-out eval folder of that checkpoint")
    p.add_argument("--out", default=str(ASSET))
    args = p.parse_args(argv)
    from semidyn_rag.checkpoint import export_compressor

    run = Path(args.run)
    report = export_compressor(args.checkpoint or run / "final", args.out, overwrite=True)
    size_mb = report.bytes_after / 2**20
    if size_mb > LIMIT_MB:
        raise SystemExit(f"{args.out} is {size_mb:.1f} MiB, over the {LIMIT_MB} MiB the package may carry")
    (Path(args.out) / "card.json").write_text(json.dumps(card(run, Path(args.eval)), indent=2) + "\n")
    print(f"shipped {args.out}: {size_mb:.1f} MiB, card.json written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
