"""The head-to-head driver of the embedded-default recipe (CPU budget, resume, report) and run lineage."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from semidyn_rag.evaluation.metrics import sign_test_p
from semidyn_rag.training import write_records

from .test_checkpoint import _perturb_adapters
from .test_training_trainer import make_records

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "embedded_default"


@pytest.fixture(scope="module")
def h2h():
    return runpy.run_path(str(RECIPE / "head_to_head.py"))


@pytest.fixture(scope="module")
def lineage_mod():
    sys.path.insert(0, str(RECIPE))
    try:
        return runpy.run_path(str(RECIPE / "lineage.py"))
    finally:
        sys.path.remove(str(RECIPE))


def write_config(tmp_path, tiny_dirs, **objective) -> Path:
    enc, dec = tiny_dirs
    write_records(tmp_path / "train.jsonl", make_records())
    write_records(tmp_path / "eval.jsonl", make_records(4, seed=1))
    cfg = {"compressor": {"encoder": str(enc), "decoder": str(dec), "projector_hidden_size": 64, "device": "cpu",
                          "encoder_lora": {"r": 4, "alpha": 8}, "decoder_lora": {"r": 4, "alpha": 8}},
           "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
           "objective": objective, "optim": {"lr": 3e-3, "batch_size": 4, "max_steps": 1000},
           "output_dir": str(tmp_path / "arm"), "save_every": 2, "eval_every": 3, "progress": False}
    path = tmp_path / "arm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_an_arm_trains_to_its_cpu_budget_resumes_and_reports(h2h, tiny_dirs, tmp_path):
    path = write_config(tmp_path, tiny_dirs, hidden_align_weight=1.0)
    out = h2h["train_arm"](str(path), [], cpu_seconds=0.4, probe_steps=3)
    budget = json.loads((out / "budget.json").read_text())
    assert budget["max_steps"] == max(1, int(0.4 // budget["cpu_per_step"]))
    assert budget["start_eval"]["lm"] > 0 and budget["start_eval"]["align"] > 0  # the start, on data.eval
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == budget["max_steps"] and all(r["cpu_sec"] > 0 for r in train)
    assert (out / "final" / "config.json").is_file() and not (out / "probe" / "metrics.jsonl").exists()
    # a rerun keeps the budget (no new probe) and finds the run finished
    budget_text = (out / "budget.json").read_text()
    h2h["train_arm"](str(path), [], cpu_seconds=0.4, probe_steps=3)
    assert (out / "budget.json").read_text() == budget_text
    with pytest.raises(SystemExit, match="made for 0.4 CPU seconds"):
        h2h["train_arm"](str(path), [], cpu_seconds=9.0, probe_steps=3)
    # the report: CPU spent from the log, held-out LM at start and end
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.json").write_text(json.dumps({"meta": {"n_questions": 4}, "systems": [
        {"system": "fixed_x4", "accuracy": 0.25, "accuracy_ci95": [0.05, 0.7], "f1": 0.3, "mean_ratio": 3.9}]}))
    (row,) = h2h["report"]([f"b={out}:{tmp_path / 'ev'}"], tmp_path / "rep")
    assert row["cpu_seconds_spent"] == pytest.approx(sum(r["cpu_sec"] for r in train), abs=0.1)
    assert row["heldout_lm_start"] == budget["start_eval"]["lm"] and row["heldout_lm_end"] > 0
    assert row["fixed_x4"]["accuracy"] == 0.25 and row["done"]
    md = (tmp_path / "rep" / "h2h_summary.md").read_text()
    assert "| b |" in md and "25.0% (5.0%-70.0%) at 3.90x" in md
    with pytest.raises(ValueError, match="at least 2"):
        h2h["probe"](None, 1)


def test_the_step_count_follows_the_cpu_actually_spent(h2h, tiny_dirs, tmp_path):
    from semidyn_rag.training.config import load_train_config

    path = write_config(tmp_path, tiny_dirs)
    config = load_train_config(str(path), ["optim.max_steps=100", "optim.warmup_steps=0"])
    trainer = h2h["BudgetTrainer"](config, cpu_seconds=300.0)
    assert trainer.max_steps == 100  # nothing measured yet: the probe's plan stands
    first = trainer._lr_scale(50)
    trainer.step, trainer.cpu = 30, {k: 2.0 for k in range(1, 31)}  # 60 s spent at 2 s a step
    trainer._replan()
    assert trainer.max_steps == 30 + 120  # the 240 s left buy 120 more steps, not the probe's 70
    assert trainer._lr_scale(50) > first  # the cosine now ends at step 150
    assert trainer.scheduler.lr_lambdas[0](50) == trainer._lr_scale(50)
    trainer.cpu = {k: 20.0 for k in range(1, 31)}  # 600 s spent: over budget, stop where it is
    trainer._replan()
    assert trainer.max_steps == 30


def test_lineage_starts_at_a_shipped_checkpoint_known_by_its_card(lineage_mod, tmp_path):
    shipped = tmp_path / "assets" / "default-compressor"
    shipped.mkdir(parents=True)
    (shipped / "card.json").write_text(json.dumps({"recipe": "r)", "training": {
        "steps": 2700, "samples": 10800, "cpu_seconds": 11940,
        "runs": [{"run": "run2", "steps": 2700, "samples": 10800, "cpu_seconds": 11940, "init_from": None}]}}))
    (shipped / "config.json").write_text(json.dumps({"fingerprint": "ab12"}))
    run = tmp_path / "runs" / "h2h-a"
    run.mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({
        "init_from": str(shipped), "optim": {"batch_size": 4, "grad_accum": 1},
        "objective": {"hidden_align_weight": 1.0}, "data": {"train": ["data/wiki_recon_proxy.jsonl"]}}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"split": "train", "step": s, "sec": 2.0, "cpu_sec": 3.5,
                                                             "lm": 1.0}) for s in (1, 2, 3)) + "\n")
    start, arm = lineage_mod["lineage"](run)
    # an older card's "cpu_seconds" were wall seconds; it logged no process CPU time
    assert (start.samples, start.steps, start.wall_seconds, start.cpu_seconds) == (10800, 2700, 11940.0, None)
    assert arm.samples_before == 10800 and arm.samples == 12 and (arm.wall_seconds, arm.cpu_seconds) == (6.0, 10.5)
    # shipping such a run counts the shipped checkpoint's training too
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.json").write_text(json.dumps({
        "meta": {"n_questions": 2, "run": {"dataset": "d", "setting": "gold"}},
        "systems": [{"system": "fixed_x4", "accuracy": 0.5, "exact_match": 0.5, "f1": 0.5, "mean_ratio": 4.0,
                     "ratio_all": 4.0, "n": 2}]}))
    sys.path.insert(0, str(RECIPE))
    try:
        card = runpy.run_path(str(RECIPE / "ship.py"))["card"](run, tmp_path / "ev")
    finally:
        sys.path.remove(str(RECIPE))
    assert card["training"]["samples"] == 10812 and card["training"]["steps"] == 2703
    assert card["training"]["wall_seconds"] == 11946
    assert card["recipe"] == ("r, then a head-to-head config (wiki_recon_proxy.jsonl; hidden_align_weight 1.0) "
                              "(h2h-a from the default shipped before it, fingerprint ab12))")
    # the shipped start's own runs are listed, its wall seconds under their name now; then the arm
    assert [r["run"] for r in card["training"]["runs"]] == ["run2", "h2h-a"]
    assert card["training"]["runs"][0]["wall_seconds"] == 11940
    assert card["training"]["runs"][1]["process_cpu_seconds"] == 10


def test_paired_counts_the_questions_only_one_checkpoint_gets_right(h2h, tmp_path):
    def folder(name, system_correct):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("samples.jsonl").write_text("".join(
            json.dumps({"system": s, "sample_id": str(i), "correct": c}) + "\n"
            for s, cs in system_correct.items() for i, c in enumerate(cs)))
        return d

    a = folder("a", {"fixed_x4": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1], "no_context": [0]})
    b = folder("b", {"fixed_x4": [1, 0, 1, 1, 1, 1, 1, 1, 1, 1]})  # one question fewer: not paired
    (row,) = h2h["paired"](a, b, tmp_path / "out")
    assert (row["system"], row["questions"], row["a_correct"], row["b_correct"]) == ("fixed_x4", 10, 2, 9)
    assert (row["only_a"], row["only_b"]) == (1, 8)
    assert row["mcnemar_p"] == pytest.approx(2 * (1 + 9) / 2 ** 9, abs=1e-4)  # exact binomial, n = 9, k = 1
    assert json.loads((tmp_path / "out" / "paired.json").read_text())["systems"][0]["only_b"] == 8
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(5, 5) == 1.0
    with pytest.raises(SystemExit, match="no samples.jsonl"):
        h2h["paired"](a, tmp_path / "missing")


def test_ship_replaces_the_default_it_started_from_only_when_the_export_fits(make_compressor, tmp_path, monkeypatch):
    """The card is read from the shipped start before the export overwrites it, an export over the
    size limit leaves the shipped default as it was, and shipping twice is refused."""
    shipped = tmp_path / "assets" / "default-compressor"
    make_compressor().save_pretrained(shipped)
    compressor = make_compressor()
    _perturb_adapters(compressor, seed=3)  # the continued run: other weights, another fingerprint
    (shipped / "card.json").write_text(json.dumps({"recipe": "r)", "training": {
        "steps": 5, "samples": 20, "cpu_seconds": 50, "runs": []}}))
    run = tmp_path / "runs" / "long"
    compressor.save_pretrained(run / "final")
    (run / "train_config.json").write_text(json.dumps({
        "init_from": str(shipped), "optim": {"batch_size": 2, "grad_accum": 1},
        "objective": {}, "data": {"train": "data/wiki_cloze_proxy.jsonl"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "sec": 1.0, "lm": 1.0}) + "\n")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.json").write_text(json.dumps({
        "meta": {"n_questions": 1, "run": {"dataset": "d", "setting": "gold"}}, "systems": []}))
    sys.path.insert(0, str(RECIPE))
    try:
        ship = runpy.run_path(str(RECIPE / "ship.py"))
    finally:
        sys.path.remove(str(RECIPE))
    argv = ["--run", str(run), "--eval", str(tmp_path / "ev"), "--out", str(shipped)]
    monkeypatch.setitem(ship["main"].__globals__, "LIMIT_MB", 0)
    with pytest.raises(SystemExit, match="over the 0 MiB"):
        ship["main"](argv)
    assert json.loads((shipped / "card.json").read_text())["training"]["steps"] == 5  # untouched
    assert not (tmp_path / "assets" / "default-compressor.shipping").exists()
    before = json.loads((shipped / "config.json").read_text())["fingerprint"]
    monkeypatch.setitem(ship["main"].__globals__, "LIMIT_MB", 25)
    assert ship["main"](argv) == 0
    card = json.loads((shipped / "card.json").read_text())
    assert card["training"]["steps"] == 6 and card["training"]["wall_seconds"] == 51
    assert card["recipe"].endswith(f"(long from the default shipped before it, fingerprint {before}))")
    assert json.loads((shipped / "config.json").read_text())["weights_dtype"] == "bfloat16"
    shipped_fp = json.loads((shipped / "config.json").read_text())["fingerprint"]
    with pytest.raises(SystemExit, match="count its training twice"):  # the same run again
        ship["main"](argv)
    # a run continuing the shipped one names the folder its chain started from, which now holds the
    # shipped run: the card there counts the chain's first run, so it is counted once
    later = tmp_path / "runs" / "later"
    _perturb_adapters(compressor, seed=4)
    compressor.save_pretrained(later / "final")
    (later / "train_config.json").write_text(json.dumps({**json.loads((run / "train_config.json").read_text()),
                                                        "init_from": str(run / "final")}))
    (later / "metrics.jsonl").write_text("\n".join(json.dumps({"split": "train", "step": s, "sec": 1.0, "lm": 1.0})
                                                   for s in (1, 2)) + "\n")
    assert ship["main"](["--run", str(later), "--eval", str(tmp_path / "ev"), "--out", str(shipped)]) == 0
    card = json.loads((shipped / "card.json").read_text())
    assert card["training"]["steps"] == 8 and [r["run"] for r in card["training"]["runs"]] == ["long", "later"]
    assert card["recipe"].endswith(f"fingerprint {before}), then a head-to-head config (wiki_cloze_proxy.jsonl) "
                                   f"(later from the default shipped before it, fingerprint {shipped_fp}))")
