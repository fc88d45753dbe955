"""The recipe's learning-curve plot keeps the runs of an earlier plot (``--previous``)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "embedded_default"


@pytest.fixture(scope="module")
def curve():
    sys.path.insert(0, str(RECIPE))  # the script imports its sibling lineage.py
    try:
        return runpy.run_path(str(RECIPE / "learning_curve.py"))
    finally:
        sys.path.remove(str(RECIPE))


def test_an_earlier_plot_is_redrawn_from_its_json(curve, tmp_path):
    earlier = {"runs": {"old": {"samples_per_step": 4, "samples_before": 0, "eval_data": "held-out file",
                                "continued_from": [], "train_lm": [[100, 2.5], [200, 2.2]],
                                "eval_lm": [[0, 3.0], [200, 2.4]], "eval_mse": [[0, 1.0], [200, 0.5]]}},
               "accuracy": {"old": {"200": {"n": 50, "accuracy": {"fixed_x4": 0.1, "no_context": 0.05}}}}}
    (tmp_path / "old.json").write_text(json.dumps(earlier))
    assert curve["main"](["--previous", str(tmp_path / "old.json"), "--out", str(tmp_path / "new.png")]) == 0
    assert json.loads((tmp_path / "new.json").read_text()) == earlier
    assert (tmp_path / "new.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        curve["main"](["--out", str(tmp_path / "none.png")])  # nothing to draw
