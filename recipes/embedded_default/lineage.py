"""A training run and the runs it continued from (``init_from``), for cards and curves.

A continuation's ``init_from`` names a checkpoint of an earlier run (``run2/final``); its
steps count from 0 again. These helpers put the runs back in one line of samples seen. A
chain may start at a shipped checkpoint (``semidyn_rag/assets/default-compressor``), known
only by its ``card.json``: it stands for all the training its card counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from semidyn_rag.training.metrics import MetricsLog


@dataclass(frozen=True)
class Run:
    folder: Path
    config: dict
    rows: list[dict]
    samples_before: int  # samples the runs it continued from had seen
    card: dict | None = None  # a shipped checkpoint known by its model card only

    @property
    def per_step(self) -> int:
        return self.config["optim"]["batch_size"] * self.config["optim"]["grad_accum"]

    @property
    def train(self) -> list[dict]:
        return [r for r in self.rows if r["split"] == "train"]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.rows if r["split"] == "eval"]

    @property
    def steps(self) -> int:
        if self.card:
            return int(self.card["training"]["steps"])
        return self.train[-1]["step"] if self.train else 0

    @property
    def samples(self) -> int:
        return int(self.card["training"]["samples"]) if self.card else self.steps * self.per_step

    @property
    def wall_seconds(self) -> float:
        """Seconds of training on the 2-core machine (older cards called this ``cpu_seconds``)."""
        if self.card:
            t = self.card["training"]
            return float(t.get("wall_seconds", t.get("cpu_seconds", 0)))
        return sum(r.get("sec") or 0 for r in self.train)

    @property
    def cpu_seconds(self) -> float | None:
        """Process CPU time (what the head-to-head budgets count); None where it was not logged."""
        if self.card:
            got = self.card["training"].get("process_cpu_seconds")
            return None if got is None else float(got)
        if not self.train or any(r.get("cpu_sec") is None for r in self.train):
            return None
        return sum(r["cpu_sec"] for r in self.train)


def lineage(folder: str | Path) -> list[Run]:
    """``folder``'s run and every run it was initialised from, oldest first."""
    chain: list[tuple[Path, dict, int | None]] = []
    folder, upto, shipped = Path(folder), None, None
    while True:
        if any(f.resolve() == folder.resolve() for f, _, _ in chain):
            raise ValueError(f"init_from loops back to {folder}")
        cfg = json.loads((folder / "train_config.json").read_text())
        chain.append((folder, cfg, upto))
        init = cfg.get("init_from")
        if not init:
            break
        # init_from is relative to where that training ran: the runs' common parent here
        ckpt = next((p for p in (folder.parent / init, Path(init)) if p.exists()), None)
        if ckpt is None:
            raise FileNotFoundError(f"{folder} continued from {init}, which is not at {folder.parent / init}")
        if (ckpt / "card.json").is_file() and not (ckpt.parent / "train_config.json").is_file():
            shipped = ckpt  # a shipped checkpoint: its card is all that is known of its training
            break
        # a mid-run checkpoint (checkpoints/step-00000900) continues from that step, final/ from the end
        upto = int(ckpt.name.removeprefix("step-")) if ckpt.name.startswith("step-") else None
        folder = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    runs, seen, counted = [], 0, set()
    if shipped is not None:
        card = json.loads((shipped / "card.json").read_text())
        runs.append(Run(shipped, {"init_from": None, "optim": {"batch_size": 1, "grad_accum": 1}}, [], 0, card))
        seen = runs[0].samples
        # a default shipped after the chain started may count the chain's first runs already
        counted = {(r["run"], r.get("steps")) for r in card["training"].get("runs", [])}
    for f, cfg, upto in reversed(chain):
        log = MetricsLog(f / "metrics.jsonl")
        if not log.path.is_file():  # a run without metrics has nothing to count: say so, not 0 steps
            raise FileNotFoundError(f"{log.path} is missing")
        rows = [r for r in log.rows() if upto is None or r["step"] <= upto]
        run = Run(f, cfg, rows, seen)
        if len(runs) == 1 and (f.name, run.steps) in counted:
            continue  # inside the shipped card's own count
        runs.append(run)
        seen += run.samples
    return runs
