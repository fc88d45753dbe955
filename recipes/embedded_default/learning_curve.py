"""Learning curves of embedded-default runs: LM loss against samples seen, plus held-out accuracy.

Reads each run's ``metrics.jsonl`` (and ``train_config.json`` for the batch size) and, if given,
evaluation folders written by ``semidyn-rag eval`` at some checkpoints. Writes a PNG and the
plotted numbers as JSON next to it.

    python recipes/embedded_default/learning_curve.py --run calibrated=runs/run \
        --run "no calibration"=runs/run-uncalibrated --accuracy 1200=runs/eval-final --out runs/curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_run(folder: Path, smooth: int = 25) -> dict:
    cfg = json.loads((folder / "train_config.json").read_text())
    per_step = cfg["optim"]["batch_size"] * cfg["optim"]["grad_accum"]
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["split"] == "train" and r.get("lm") is not None]
    evals = [r for r in rows if r["split"] == "eval"]
    smoothed = []
    for i in range(smooth - 1, len(train), smooth):
        window = train[i - smooth + 1 : i + 1]
        smoothed.append([train[i]["step"] * per_step, sum(r["lm"] for r in window) / len(window)])
    return {"samples_per_step": per_step, "train_lm": smoothed,
            "eval_lm": [[r["step"] * per_step, r["lm"]] for r in evals],
            "eval_mse": [[r["step"] * per_step, r.get("mse")] for r in evals]}


def read_accuracy(folder: Path) -> dict[str, float]:
    data = json.loads((folder / "results.json").read_text())
    return {s["system"]: s["accuracy"] for s in data["systems"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a training output folder")
    p.add_argument("--accuracy", action="append", default=[], metavar="STEP=EVALDIR",
                   help="an eval folder of the first run's checkpoint at STEP")
    p.add_argument("--out", required=True, help="PNG path (the JSON goes next to it)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: read_run(Path(d)) for name, d in (r.split("=", 1) for r in args.run)}
    first = next(iter(runs.values()))
    acc = {int(step) * first["samples_per_step"]: read_accuracy(Path(d))
           for step, d in (a.split("=", 1) for a in args.accuracy)}
    panels = 2 if acc else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for i, (name, r) in enumerate(runs.items()):
        color = f"C{i}"
        if r["train_lm"]:
            ax.plot(*zip(*r["train_lm"]), color=color, alpha=0.35, lw=1, label=f"{name}: train (25-step mean)")
        if r["eval_lm"]:
            ax.plot(*zip(*r["eval_lm"]), color=color, marker="o", lw=2, label=f"{name}: held-out")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("LM loss (nats / target token)")
    ax.set_title("Learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if acc:
        ax = axes[0][1]
        samples = sorted(acc)
        systems = sorted({s for a in acc.values() for s in a if s not in ("uncompressed", "no_context")})
        for i, s in enumerate(systems):
            pts = [(n, acc[n][s]) for n in samples if s in acc[n]]
            ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=s)
        for base, style in (("uncompressed", "--"), ("no_context", ":")):
            vals = [acc[n][base] for n in samples if base in acc[n]]
            if vals:
                ax.axhline(vals[-1], color="k", ls=style, lw=1, label=base)
        ax.set_xlabel("training samples seen")
        ax.set_ylabel("substring accuracy (held-out)")
        ax.set_title("Held-out QA accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "accuracy": {str(k): v for k, v in acc.items()}},
                                                   indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
