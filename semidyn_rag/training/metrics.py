"""Training metrics: one JSON line per logged step or evaluation, and a loss plot drawn from them.

The JSONL file is the record of a run (resuming cuts it back to the checkpoint's step, so a
resumed run's file reads as if it had never stopped); the PNG is redrawn from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_text


class MetricsLog:
    """Appends metric rows to ``path``; ``truncate(step)`` drops rows after ``step``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, step: int) -> None:
        kept = [r for r in self.rows() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_metrics(rows: list[dict], png: str | Path) -> Path | None:
    """Draw train/eval loss (and the head's MSE when logged) against step; None if nothing to draw."""
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_mse = any(r.get("mse") is not None for r in train + evals)
    fig, axes = plt.subplots(1, 2 if has_mse else 1, figsize=(11 if has_mse else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["lm"] for r in train], lw=0.8, alpha=0.5, label="train LM")
        ax.plot([r["step"] for r in train], _smooth([r["lm"] for r in train]), lw=1.5, label="train LM (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["lm"] for r in evals], "o-", label="eval LM")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (answer tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_mse:
        ax = axes[0][1]
        tr = [r for r in train if r.get("mse") is not None]
        if tr:
            ax.plot([r["step"] for r in tr], _smooth([r["mse"] for r in tr]), label="train MSE (smoothed)")
        ev = [r for r in evals if r.get("mse") is not None]
        if ev:
            ax.plot([r["step"] for r in ev], [r["mse"] for r in ev], "o-", label="eval MSE")
        ax.set_xlabel("step")
        ax.set_ylabel("density head MSE")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out
