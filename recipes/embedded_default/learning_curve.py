"""Learning curves of embedded-default runs: LM loss against samples seen, plus held-out accuracy.

Reads each run's ``metrics.jsonl`` (and ``train_config.json`` for the batch size) and, if given,
evaluation folders written by ``semidyn-rag eval`` at some checkpoints; ``--previous`` adds the
runs of an earlier plot from its JSON, so the recipe's plot gains new runs after the old run
folders are gone. Writes a PNG and the plotted numbers as JSON next to it. A run that continued
another (``init_from``) is drawn from where that one stopped; ``STEP`` in ``--accuracy`` counts
that run's own steps.

    python recipes/embedded_default/learning_curve.py --run calibrated=runs/run \
        --run "no calibration"=runs/run-uncalibrated --accuracy calibrated@1200=runs/eval-final \
        --accuracy "no calibration@500"=runs/eval-uncalibrated --out runs/curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lineage import lineage  # a sibling module: this folder is sys.path[0] when run as a script


def read_run(folder: Path, smooth: int = 25) -> dict:
    """A run's curve in samples seen, counting the runs it continued from (``init_from``)."""
    runs = lineage(folder)
    run, before = runs[-1], runs[-1].samples_before
    train = [r for r in run.train if r.get("lm") is not None]
    smoothed = []
    for i in range(smooth - 1, len(train), smooth):
        window = train[i - smooth + 1 : i + 1]
        smoothed.append([before + train[i]["step"] * run.per_step, sum(r["lm"] for r in window) / len(window)])
    return {"samples_per_step": run.per_step, "samples_before": before,
            "eval_data": "held-out file" if (run.config.get("data") or {}).get("eval") else "internal eval slice",
            "continued_from": [str(r.folder) for r in runs[:-1]], "train_lm": smoothed,
            "eval_lm": [[before + r["step"] * run.per_step, r["lm"]] for r in run.evals],
            "eval_mse": [[before + r["step"] * run.per_step, r.get("mse")] for r in run.evals]}


def read_accuracy(folder: Path) -> dict:
    data = json.loads((folder / "results.json").read_text())
    return {"n": data["meta"]["n_questions"], "accuracy": {s["system"]: s["accuracy"] for s in data["systems"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a training output folder")
    p.add_argument("--previous", action="append", default=[], metavar="JSON",
                   help="an earlier plot's JSON: its runs are drawn too (their folders need not exist)")
    p.add_argument("--accuracy", action="append", default=[], metavar="RUN@STEP=EVALDIR",
                   help="an eval folder of run RUN's checkpoint at STEP")
    p.add_argument("--out", required=True, help="PNG path (the JSON goes next to it)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, dict] = {}
    acc: dict[str, dict[int, dict]] = {}
    for path in args.previous:
        earlier = json.loads(Path(path).read_text())
        for run in earlier["runs"].values():
            run.setdefault("eval_data", "internal eval slice")  # plots made before the field existed
        runs.update(earlier["runs"])
        acc.update({k: {int(n): a for n, a in v.items()} for k, v in earlier["accuracy"].items()})
    runs.update({name: read_run(Path(d)) for name, d in (r.split("=", 1) for r in args.run)})
    if not runs:
        p.error("nothing to draw: give --run or --previous")
    for item in args.accuracy:
        where, d = item.split("=", 1)
        name, step = where.rsplit("@", 1)
        if name not in runs:
            p.error(f"--accuracy {item}: no --run named {name!r}")
        r = runs[name]
        acc.setdefault(name, {})[r["samples_before"] + int(step) * r["samples_per_step"]] = read_accuracy(Path(d))
    panels = 2 if acc else 1

    def below(ax):
        """Legends under the panels: with many runs, one inside would hide the points."""
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)

    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    fig.subplots_adjust(wspace=0.25)
    ax = axes[0][0]
    for i, (name, r) in enumerate(runs.items()):
        color = f"C{i}"
        if r["train_lm"]:
            ax.plot(*zip(*r["train_lm"]), color=color, alpha=0.35, lw=1, label=f"{name}: train (25-step mean)")
        if r["eval_lm"]:
            ax.plot(*zip(*r["eval_lm"]), color=color, marker="o", lw=2, label=f"{name}: {r['eval_data']}")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("LM loss (nats / target token)")
    ax.set_title("Learning curve")
    ax.grid(alpha=0.3)
    below(ax)
    if acc:
        ax = axes[0][1]
        marks = {"semi_dynamic_s+0": ("o", "-"), "fixed_x4": ("s", "--"), "fixed_x8": ("^", ":")}
        for i, name in enumerate(runs):
            points = acc.get(name, {})
            for system, (marker, style) in marks.items():
                pts = [(n, a["accuracy"][system]) for n, a in sorted(points.items()) if system in a["accuracy"]]
                if pts:
                    ax.plot(*zip(*pts), marker=marker, ls=style, color=f"C{i}", label=f"{name}: {system}")
        biggest = max((a for pts in acc.values() for a in pts.values()), key=lambda a: a["n"])
        for base, style in (("uncompressed", "--"), ("no_context", ":")):
            if base in biggest["accuracy"]:
                ax.axhline(biggest["accuracy"][base], color="k", ls=style, lw=1, label=f"{base} ({biggest['n']} q)")
        ax.set_xlabel("training samples seen")
        ax.set_ylabel("substring accuracy (held-out, gold context)")
        ax.set_title("Held-out QA accuracy (question counts in the README)")
        ax.grid(alpha=0.3)
        below(ax)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "accuracy": {k: {str(n): a for n, a in v.items()}
                                                                            for k, v in acc.items()}},
                                                   indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
