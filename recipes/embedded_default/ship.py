"""Ship a trained run as the package's embedded default: a bf16 export plus a model card.

    python recipes/embedded_default/ship.py --run runs/run --eval runs/eval-final

writes ``semidyn_rag/assets/default-compressor/`` with ``export_compressor`` (the function
behind ``semidyn-rag export``) and ``card.json``: what it was trained on, for how long, and
its measured held-out figures, which ``make demo`` prints. A run that continued another
(``init_from``) is counted with the runs before it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lineage import lineage  # a sibling module: this folder is sys.path[0] when run as a script

ASSET = Path(__file__).resolve().parents[2] / "semidyn_rag" / "assets" / "default-compressor"
LIMIT_MB = 25


def _stage_config(run) -> str:
    """The recipe file a continued run follows: distill.yaml adds the KL term, continue.yaml does not;
    the head-to-head configs add hidden-state alignment or cloze data (train files named)."""
    obj, files = run.config["objective"], _as_list(run.config["data"]["train"])
    align = obj.get("hidden_align_weight", 0)
    if align > 0 or any("wiki" in t for t in files):
        what = ", ".join(Path(t).name for t in files) + (f"; hidden_align_weight {align}" if align > 0 else "")
        return f"a head-to-head config ({what})"
    return "distill.yaml" if obj.get("distill_weight", 0) > 0 else "continue.yaml"


def _as_list(x) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def card(run: Path, eval_dir: Path) -> dict:
    runs = lineage(run)  # the shipped run and the runs it continued from
    last_eval = next((r.evals[-1]["lm"] for r in reversed(runs) if r.evals), None)
    results = json.loads((eval_dir / "results.json").read_text())
    systems = {s["system"]: {k: s[k] for k in ("accuracy", "exact_match", "f1", "mean_ratio", "ratio_all", "n")}
               for s in results["systems"]}
    return {
        "name": "semidyn-rag embedded default (SmolLM2-135M-Instruct encoder and decoder)",
        "recipe": (runs[0].card["recipe"].removesuffix(")") if runs[0].card else
                   "recipes/embedded_default (prepare_data.py, synth proxy --method zlib, train.yaml")
                  + "".join(f", then {_stage_config(r)} ({r.folder.name} from {r.config['init_from']})" for r in runs[1:])
                  + ")",
        "training": {"steps": sum(r.steps for r in runs), "samples": sum(r.samples for r in runs),
                     "cpu_seconds": round(sum(r.cpu_seconds for r in runs)),
                     "runs": [{"run": r.folder.name, "steps": r.steps, "samples": r.samples,
                               "cpu_seconds": round(r.cpu_seconds), "init_from": r.config.get("init_from")}
                              for r in runs],
                     "last_eval_lm": last_eval},
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
