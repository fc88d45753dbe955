"""Objectives head to head at equal CPU time: the training and reporting half of ``head_to_head.sh``.

``train``: one arm, trained until its steps have used ``--cpu-seconds`` of CPU time. A probe
times ``--probe-steps`` steps of this very objective (process CPU time, all threads, the first
step dropped as warm-up) on the same starting checkpoint for a first ``max_steps = budget /
mean step``; the run then re-plans the count every 25 steps from its own measured steps
(``BudgetTrainer``), so a probe taken under other load does not give one arm more CPU than another. The probe also records the
starting checkpoint's held-out losses (``start_eval.json``: the same ``data.eval`` every arm
reports). Both land in ``OUT/budget.json``; a rerun reads it and resumes the run from its
newest checkpoint (the trainer's ``resume: auto``), so the arm keeps its schedule. Every
training row of ``metrics.jsonl`` gets ``cpu_sec``, the step's measured CPU time, so the CPU
actually spent is summed from the log, resumes included.

``report``: one table of the arms (CPU spent, steps, held-out LM loss at start and end,
held-out accuracy at 4x) as ``h2h_summary.json`` and ``.md`` next to each other.

``paired``: two checkpoints' eval folders over the same questions, system by system: the
questions only one of them gets right and the exact two-sided McNemar p-value. Intervals of
two accuracies overlap long before a paired difference is ruled out or in.

CPU time, not wall time, is the budget because this 2-core machine is shared: other people's
work stretches wall time but not the CPU time a step needs (``--cpu-seconds 5400`` is 45
minutes of both cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from pathlib import Path

from semidyn_rag.evaluation.metrics import sign_test_p
from semidyn_rag.training.config import load_train_config
from semidyn_rag.training.metrics import MetricsLog
from semidyn_rag.training.trainer import Trainer

logger = logging.getLogger("head_to_head")


class TimedTrainer(Trainer):
    """The trainer, with each step's process CPU time in its metrics row (``cpu_sec``)."""

    def train_step(self) -> dict:
        c0 = time.process_time()
        row = super().train_step()
        row["cpu_sec"] = time.process_time() - c0
        return row


class BudgetTrainer(TimedTrainer):
    """Trains until ``cpu_seconds`` of CPU time are spent, re-planning its step count as it goes.

    A probe's CPU time per step is only an estimate (measured once, under whatever else ran then:
    arm a's probe said 11.4 s and its steps then took 7-8 s), so every ``REPLAN_EVERY`` steps the
    count is set again to the steps done plus the CPU left over the median of the steps measured
    so far (this run's ``metrics.jsonl``, resumes included). The trainer's cosine schedule reads
    the current count, so the learning rate follows the re-planned end smoothly.
    """

    REPLAN_EVERY = 25

    def __init__(self, config, cpu_seconds: float):
        super().__init__(config)
        self.cpu_seconds = cpu_seconds
        done = MetricsLog(self.out / "metrics.jsonl").rows() if (self.out / "metrics.jsonl").is_file() else []
        self.cpu = {r["step"]: r["cpu_sec"] for r in done
                    if r["split"] == "train" and r.get("cpu_sec") is not None and r["step"] <= self.step}
        self._replan()

    def _replan(self) -> None:
        steps = [v for k, v in sorted(self.cpu.items()) if k > 1]  # the first step warms up
        if len(steps) < 10:
            return
        spent, per_step = sum(self.cpu.values()), statistics.median(steps)
        planned = self.step + max(0, int((self.cpu_seconds - spent) // per_step))
        if planned != self.max_steps:
            logger.info("step %d: %.0f of %.0f CPU s spent, %.2f s per step -> %d steps (was %d)", self.step,
                        spent, self.cpu_seconds, per_step, planned, self.max_steps)
            self.max_steps = planned

    def train_step(self) -> dict:
        row = super().train_step()
        self.cpu[self.step] = row["cpu_sec"]
        if self.step % self.REPLAN_EVERY == 0:
            self._replan()
        return row


def probe(config, steps: int) -> tuple[float, dict | None]:
    """(mean CPU seconds per step after the first, held-out losses of the starting checkpoint)."""
    if steps < 2:
        raise ValueError(f"--probe-steps must be at least 2 (the first is a warm-up), got {steps}")
    cfg = config.model_copy(update={"resume": "never", "output_dir": str(Path(config.output_dir) / "probe")})
    trainer = TimedTrainer(cfg)
    start = trainer.evaluate()
    times = [trainer.train_step()["cpu_sec"] for _ in range(steps)]
    del trainer
    gc.collect()
    return statistics.mean(times[1:]), start


def train_arm(config_path: str, overrides: list[str], cpu_seconds: float, probe_steps: int) -> Path:
    """Probe (once), then train the arm to its step budget; returns the run folder."""
    config = load_train_config(config_path, overrides)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget_file = out / "budget.json"
    if budget_file.is_file():
        budget = json.loads(budget_file.read_text())
        if budget["cpu_seconds"] != cpu_seconds:
            raise SystemExit(f"{budget_file} was made for {budget['cpu_seconds']} CPU seconds, not {cpu_seconds}: "
                             "use another output folder for another budget")
    else:
        per_step, start = probe(config, probe_steps)
        budget = {"cpu_seconds": cpu_seconds, "probe_steps": probe_steps, "cpu_per_step": per_step,
                  "max_steps": max(1, int(cpu_seconds // per_step)), "start_eval": start}
        budget_file.write_text(json.dumps(budget, indent=1))
        logger.info("%s: %.1f CPU s per step -> %d steps", out, per_step, budget["max_steps"])
    final = load_train_config(config_path, [*overrides, f"optim.max_steps={budget['max_steps']}"])
    trainer = BudgetTrainer(final, cpu_seconds)
    trainer.train()
    budget.update(max_steps=trainer.step, probe_max_steps=budget.get("probe_max_steps", budget["max_steps"]))
    budget_file.write_text(json.dumps(budget, indent=1))  # the steps the budget bought, as re-planned
    return out


def eval_figures(eval_dir: Path | None) -> dict:
    """Per system of a ``semidyn-rag eval`` folder: accuracy, its 95% interval, F1, ratio (empty if not done)."""
    if eval_dir is None or not (eval_dir / "results.json").is_file():
        return {}
    res = json.loads((eval_dir / "results.json").read_text())
    out: dict = {"questions": res["meta"]["n_questions"]}
    for s in res["systems"]:
        out[s["system"]] = {"accuracy": s["accuracy"], "ci95": s.get("accuracy_ci95"), "f1": s["f1"],
                            "ratio": s.get("mean_ratio")}
    return out


def summary_row(name: str, run: Path, eval_dir: Path | None) -> dict:
    """One arm's figures from its folder (budget, metrics) and its eval folder, if done."""
    budget = json.loads((run / "budget.json").read_text())
    rows = MetricsLog(run / "metrics.jsonl").rows() if (run / "metrics.jsonl").is_file() else []
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    row = {"arm": name, "run": str(run), "steps": train[-1]["step"] if train else 0, "max_steps": budget["max_steps"],
           "cpu_per_step": budget["cpu_per_step"], "cpu_seconds_budget": budget["cpu_seconds"],
           "cpu_seconds_spent": round(sum(r.get("cpu_sec") or 0 for r in train), 1),
           "wall_seconds": round(sum(r.get("sec") or 0 for r in train), 1),
           "heldout_lm_start": (budget.get("start_eval") or {}).get("lm"),
           "heldout_lm_end": evals[-1]["lm"] if evals else None, "done": (run / "final" / "config.json").is_file()}
    if evals and "align" in evals[-1]:
        row["heldout_align_end"] = evals[-1]["align"]
    return {**row, **eval_figures(eval_dir)}


def report(arms: list[str], out: Path, start_eval: Path | None = None) -> list[dict]:
    """Write ``h2h_summary.json`` and ``.md`` for ``NAME=RUN[:EVAL]`` arms; returns the rows.

    ``start_eval``: the eval folder of the starting checkpoint, reported as the first row.
    """
    rows = []
    for item in arms:
        name, spec = item.split("=", 1)
        run, _, ev = spec.partition(":")
        if (Path(run) / "budget.json").is_file():
            rows.append(summary_row(name, Path(run), Path(ev) if ev else None))
    if start_eval is not None:
        lm = next((r["heldout_lm_start"] for r in rows if r["heldout_lm_start"] is not None), None)
        rows.insert(0, {"arm": "start", "run": None, "steps": 0, "max_steps": 0, "cpu_per_step": None,
                        "cpu_seconds_budget": 0, "cpu_seconds_spent": 0, "wall_seconds": 0,
                        "heldout_lm_start": lm, "heldout_lm_end": lm, "done": True, **eval_figures(start_eval)})
    systems = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict)})
    lines = ["| arm | steps | CPU s (budget) | held-out LM start -> end | "
             + " | ".join(f"{s} acc (95% CI)" for s in systems) + " |",
             "|---|---|---|---|" + "---|" * len(systems)]
    for r in rows:
        lm = (f"{r['heldout_lm_start']:.3f} -> {r['heldout_lm_end']:.3f}"
              if r["heldout_lm_start"] is not None and r["heldout_lm_end"] is not None else "-")
        cells = []
        for s in systems:
            v = r.get(s)
            cells.append("-" if v is None else f"{v['accuracy']:.1%}" + (
                f" ({v['ci95'][0]:.1%}-{v['ci95'][1]:.1%})" if v.get("ci95") else "")
                + (f" at {v['ratio']:.2f}x" if v.get("ratio") else ""))
        lines.append(f"| {r['arm']} | {r['steps']}/{r['max_steps']} | {r['cpu_seconds_spent']:.0f} "
                     f"({r['cpu_seconds_budget']:.0f}) | {lm} | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "h2h_summary.json").write_text(json.dumps(rows, indent=1))
    (out / "h2h_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def _correct(eval_dir: Path) -> dict[tuple[str, str], bool]:
    path = eval_dir / "samples.jsonl"
    if not path.is_file():
        raise SystemExit(f"{eval_dir} has no samples.jsonl: not a finished `semidyn-rag eval` folder")
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {(r["system"], str(r["sample_id"])): bool(r["correct"]) for r in rows}


def paired(a: Path, b: Path, out: Path | None = None) -> list[dict]:
    """Per system in both eval folders, over the questions both answered: A's and B's correct
    counts, the questions only one gets right, and McNemar's p (``paired.json`` and ``.md``)."""
    ca, cb = _correct(a), _correct(b)
    rows = []
    for system in sorted({s for s, _ in ca} & {s for s, _ in cb}):
        ids = sorted(q for s, q in ca if s == system and (s, q) in cb)
        only_a = sum(ca[(system, q)] and not cb[(system, q)] for q in ids)
        only_b = sum(cb[(system, q)] and not ca[(system, q)] for q in ids)
        rows.append({"system": system, "questions": len(ids), "a_correct": sum(ca[(system, q)] for q in ids),
                     "b_correct": sum(cb[(system, q)] for q in ids), "only_a": only_a, "only_b": only_b,
                     "mcnemar_p": round(sign_test_p(only_a, only_b), 4)})
    if not rows:
        raise SystemExit(f"{a} and {b} share no system and question")
    lines = [f"A = {a}, B = {b}", "", "| system | questions | A right | B right | only A | only B | McNemar p |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['questions']} | {r['a_correct']} | {r['b_correct']} | {r['only_a']} | "
              f"{r['only_b']} | {r['mcnemar_p']:.2f} |" for r in rows]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "paired.json").write_text(json.dumps({"a": str(a), "b": str(b), "systems": rows}, indent=1))
        (out / "paired.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="probe once, then train one arm to its CPU budget (rerun to resume)")
    t.add_argument("--config", required=True)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--cpu-seconds", type=float, required=True, help="CPU time of the arm's training steps")
    t.add_argument("--probe-steps", type=int, default=10, help="steps timed before the budget is fixed")
    r = sub.add_parser("report", help="summary table of finished (or running) arms")
    r.add_argument("--arm", action="append", required=True, metavar="NAME=RUN[:EVALDIR]")
    r.add_argument("--start", type=Path, help="eval folder of the starting checkpoint (first row)")
    r.add_argument("--out", required=True, type=Path)
    c = sub.add_parser("paired", help="two eval folders over the same questions, question by question")
    c.add_argument("a", type=Path, help="eval folder A (e.g. the starting checkpoint's)")
    c.add_argument("b", type=Path, help="eval folder B")
    c.add_argument("--out", type=Path, help="folder for paired.json and paired.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "train":
        if args.cpu_seconds <= 0:
            p.error("--cpu-seconds must be positive")
        train_arm(args.config, args.overrides, args.cpu_seconds, args.probe_steps)
    elif args.cmd == "paired":
        paired(args.a, args.b, args.out)
    else:
        report(args.arm, args.out, args.start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
