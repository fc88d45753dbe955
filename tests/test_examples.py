import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "latents (factor" in out and "answer:" in out


def test_demo_describes_the_shipped_compressor_from_its_card(tmp_path):
    import json

    demo = runpy.run_path(str(EXAMPLES / "demo.py"))  # not __main__: only defines its functions
    card = {"name": "embedded default", "training": {"steps": 1200, "samples": 4800, "cpu_seconds": 5400},
            "heldout_eval": {"questions": 500, "systems": {
                "uncompressed": {"accuracy": 0.19, "mean_ratio": 1.0},
                "no_context": {"accuracy": 0.074, "mean_ratio": None},
                "semi_dynamic_s+0": {"accuracy": 0.09, "mean_ratio": 4.6}}}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    text = demo["describe_card"](tmp_path / "card.json")
    assert "1200 steps (4800 samples, 1.5 h" in text
    assert "uncompressed 19.0%, no_context 7.4%" in text and "s+0 9.0% at 4.6x" in text
    assert "below the first quality milestone" in text and "answers 9.0%, 1.22x no context" in text  # < 1.5x
    card["heldout_eval"]["systems"]["semi_dynamic_s+0"]["accuracy"] = 0.12
    card["training"] = {"steps": 3939, "samples": 15756, "wall_seconds": 20021}  # today's cards: wall seconds
    (tmp_path / "card.json").write_text(json.dumps(card))
    text = demo["describe_card"](tmp_path / "card.json")
    assert "milestone" not in text and "3939 steps (15756 samples, 5.6 h on 2 CPU cores)" in text
    assert "no model card" in demo["describe_card"](tmp_path / "missing.json")


def test_langchain_rag_example_runs_its_chain_on_tiny_models(ckpt, tmp_path, capsys):
    import json
    import re

    import pytest

    pytest.importorskip("langchain_semidyn_rag")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t, "title": t.split(" is ")[0]}) for t in [
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
        "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
        "Photosynthesis is the process by which green plants turn light, water and carbon dioxide into sugar."]))
    example = runpy.run_path(str(EXAMPLES / "langchain_rag.py"))  # not __main__: only defines its functions
    assert example["main"](["--compressor", str(ckpt), "--docs", str(docs), "--work", str(tmp_path / "work"),
                            "-k", "2", "--max-new-tokens", "3", "--question", "Where is the Eiffel Tower?"]) == 0
    out = capsys.readouterr().out
    assert "Q: Where is the Eiffel Tower?" in out and "A (compressed):" in out and "A (uncompressed):" in out
    assert "'The Eiffel Tower': " in out and "latents (factor" in out
    compressed, text = map(int, re.search(r"prefill: (\d+) positions compressed vs (\d+) as text", out).groups())
    assert 0 < compressed < text
