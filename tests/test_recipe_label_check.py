"""The recipe's density-label check: a teacher's summary labels against the offline proxies."""

from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import pytest

from semidyn_rag.training import TrainingRecord, write_records
from semidyn_rag.training.proxy import annotate_with_proxy

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "embedded_default" / "label_check.py"


@pytest.fixture(scope="module")
def check():
    return runpy.run_path(str(SCRIPT))


def row(y_teacher, y_zlib, y_lm, tokens=100):
    return {"source": "x", "context_tokens": tokens, "y_teacher": y_teacher, "y_zlib": y_zlib, "y_lm": y_lm}


def test_correlations_rank_the_teacher_against_each_proxy(check):
    rows = [row(2 * z, z, -z, tokens=50 + 10 * i) for i, z in enumerate([0.5, 1.0, 2.0, 3.0, 4.5])]
    rows.append(row(None, 9.0, 9.0))  # a rejected summary: no label, left out of the teacher's figures
    out = check["compare"](rows)
    assert (out["n"], out["accepted"]) == (6, 5)
    assert out["spearman"]["teacher_vs_zlib"] == 1.0 and out["spearman"]["teacher_vs_lm"] == -1.0
    assert out["spearman"]["teacher_vs_context_length"] == 1.0
    assert out["y_teacher"]["mean"] == pytest.approx(4.4)
    # a teacher whose label never changes carries no signal: no correlation, not a number
    flat = check["compare"]([row(3.0, z, z) for z in (1.0, 2.0, 3.0, 4.0)])
    assert flat["spearman"]["teacher_vs_zlib"] is None and flat["y_teacher"]["std"] == 0.0


def test_the_script_labels_a_sample_with_a_local_teacher(tiny_dirs, tmp_path, monkeypatch):
    rng = random.Random(0)
    words = "tower river mountain energy light city capital plant water stone king ship sea island".split()

    def records(n, source):
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 80))) for _ in range(n)]
        return annotate_with_proxy([TrainingRecord(context=t, question="Which?", answer=t.split()[0],
                                                   source=f"{source}/{i}") for i, t in enumerate(texts)],
                                   "zlib", y_mid=2.5, gain=4, progress=False)

    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train_proxy.jsonl", records(5, "adversarialqa"))
    write_records(data / "wiki_recon_proxy.jsonl", records(5, "wiki"))
    out = tmp_path / "check"
    argv = ["label_check.py", "--data", str(data), "--n", "6", "--model", str(tiny_dirs[1]), "--max-tokens", "8",
            "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    result = json.loads((out / "label_check.json").read_text())
    assert result["n"] == 6 and 0 <= result["accepted"] <= 6
    assert sum(r["source"].startswith("wiki") for r in result["rows"]) == 3
    assert all(r["y_lm"] > -50 and r["y_zlib"] > -50 for r in result["rows"])
    assert (out / "label_check.png").stat().st_size > 0
