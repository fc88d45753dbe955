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
import shutil
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


def _origin(run, before) -> str:
    """Where a continued run started, readable in a card: the default shipped before, or the
    checkpoint's path relative to the runs' folder rather than this machine's absolute path."""
    if before.card:
        fp = _fingerprint(before.folder)
        return "the default shipped before it" + (f", fingerprint {fp}" if fp else "")
    return _init_from(run)


def _init_from(run) -> str | None:
    """``init_from`` relative to the runs' folder or the repository (an absolute path names a machine)."""
    init = run.config.get("init_from")
    for base in (run.folder.resolve().parent, ASSET.parents[2]):  # the runs' folder, the repository
        if init and Path(init).is_absolute() and Path(init).is_relative_to(base):
            return str(Path(init).relative_to(base))
    return init


def _fingerprint(folder: Path) -> str | None:
    cfg = folder / "config.json"
    return json.loads(cfg.read_text()).get("fingerprint") if cfg.is_file() else None


def card(run: Path, eval_dir: Path) -> dict:
    """The model card; call it before exporting over a shipped checkpoint the run started from."""
    runs = lineage(run)  # the shipped run and the runs it continued from
    if runs[0].card and _fingerprint(runs[0].folder) == _fingerprint(run / "final"):
        raise SystemExit(f"{runs[0].folder} already holds {run}/final: shipping it again would count its "
                         "training twice")
    last_eval = next((r.evals[-1]["lm"] for r in reversed(runs) if r.evals), None)
    results = json.loads((eval_dir / "results.json").read_text())
    systems = {s["system"]: {k: s[k] for k in ("accuracy", "exact_match", "f1", "mean_ratio", "ratio_all", "n")}
               for s in results["systems"]}
    per_run = [{"run": r.folder.name, "steps": r.steps, "samples": r.samples, "wall_seconds": round(r.wall_seconds),
                "process_cpu_seconds": None if r.cpu_seconds is None else round(r.cpu_seconds),
                "init_from": _init_from(r)} for r in runs]
    if runs[0].card and "runs" in runs[0].card["training"]:  # the shipped start lists its own runs: those,
        per_run[:1] = [{("wall_seconds" if k == "cpu_seconds" else k): v for k, v in r.items()}  # in this card's terms
                       for r in runs[0].card["training"]["runs"]]
    return {
        "name": "semidyn-rag embedded default (SmolLM2-135M-Instruct encoder and decoder)",
        "recipe": (runs[0].card["recipe"].removesuffix(")") if runs[0].card else
                   "recipes/embedded_default (prepare_data.py, synth proxy --method zlib, train.yaml")
                  + "".join(f", then {_stage_config(r)} ({r.folder.name} from {_origin(r, b)})"
                            for b, r in zip(runs, runs[1:]))
                  + ")",
        "training": {"steps": sum(r.steps for r in runs), "samples": sum(r.samples for r in runs),
                     "wall_seconds": round(sum(r.wall_seconds for r in runs)),
                     "runs": per_run, "last_eval_lm": last_eval},
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
    meta = card(run, Path(args.eval))  # first: the run may have started from the checkpoint exported over
    out = Path(args.out)
    staged = out.with_name(out.name + ".shipping")  # the shipped default stays whole until the new one is
    report = export_compressor(args.checkpoint or run / "final", staged, overwrite=True)
    size_mb = report.bytes_after / 2**20
    if size_mb > LIMIT_MB:
        shutil.rmtree(staged)
        raise SystemExit(f"the export is {size_mb:.1f} MiB, over the {LIMIT_MB} MiB the package may carry; "
                         f"{out} is unchanged")
    (staged / "card.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    print(f"shipped {out}: {size_mb:.1f} MiB, card.json written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
