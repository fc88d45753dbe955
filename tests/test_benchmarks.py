"""The benchmarks run end to end on the tiny models and report consistent figures.

No timing is asserted anywhere (these machines are shared and noisy): only that each benchmark
produces its records, that derived figures agree with their definitions (ideal speed-up = ratio
of prefill positions, KV bytes from the decoder's shape, coarse means equal to ``derive``), and
that the helpers behave.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import cache, common, gpu_h200, run_all, scaling, throughput, ttft
from benchmarks.common import HashingEmbedder, Timing, measure_interleaved, table, texts_of_tokens

from .conftest import TEXTS


def test_measure_interleaves_and_skips_warmup():
    calls = []
    t = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, reps=3)
    assert calls == ["a", "b"] * 5
    assert len(t["a"].samples) == len(t["b"].samples) == 3
    with pytest.raises(ValueError, match="reps"):
        measure_interleaved({"a": lambda: None}, reps=0)


def test_timing_median_and_spread():
    t = Timing([1.0, 3.0, 2.0, 10.0])
    assert t.median == 2.5
    assert t.spread == pytest.approx((4.75 - 1.75) / 2 / 2.5)
    assert Timing([2.0]).spread == 0.0
    assert t.to_dict()["min_s"] == 1.0


def test_table_formats_and_fills_missing():
    out = table([{"a": 1.2345, "b": "x"}, {"a": 2.0}], [("a", "A", ".2f"), ("b", "B", "")])
    lines = out.splitlines()
    assert lines[0].split("|")[1].strip() == "A"
    assert "1.23" in lines[2] and "x" in lines[2]
    assert lines[3].split("|")[2].strip() == "-"


def test_kv_bytes_per_token_follows_the_decoder_shape():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    assert common.decoder_kv_bytes_per_token(cfg, 2) == 2 * 30 * 3 * 64 * 2


def test_texts_of_tokens_cut_windows(compressor):
    tok = compressor.encoder.tokenizer
    texts = texts_of_tokens(tok, 4, 40, seed=1, source=" ".join(TEXTS * 20))
    assert len(texts) == 4
    counts = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert all(36 <= c <= 40 for c in counts)
    with pytest.raises(ValueError, match="token counts"):
        texts_of_tokens(tok, 2, [10], source=TEXTS[0])


def test_hashing_embedder_is_deterministic_unit_norm():
    e = HashingEmbedder(32)
    a = e.embed(["kalo mine rusa", "kalo mine rusa", "toto vi"])
    assert a.shape == (3, 32)
    assert torch.allclose(torch.from_numpy(a).norm(dim=1), torch.ones(3))
    assert (a[0] == a[1]).all() and not (a[0] == a[2]).all()


def test_text_generator_known_item_queries_use_document_words():
    gen = common.TextGenerator(seed=0)
    doc = gen.document(7, 8).lower().replace(".", "")
    assert gen.document(7, 8) == common.TextGenerator(seed=0).document(7, 8)
    assert all(w in doc.split() for w in gen.query(7, 6, 8).split())


def test_encode_ids_matches_encode_and_checks_rows(compressor):
    ids = compressor.encoder.tokenize(TEXTS)
    a, b = compressor.encode(TEXTS, batch_size=2), compressor.encode_ids(ids, batch_size=2)
    for x, y in zip(a, b):
        assert torch.equal(x.features, y.features) and torch.equal(x.counts, y.counts)
        assert (x.y_hat, x.n_tokens, x.fingerprint) == (y.y_hat, y.n_tokens, y.fingerprint)
    with pytest.raises(ValueError, match="no tokens"):
        compressor.encode_ids([ids[0], []])
    from semidyn_rag import ContextTooLongError

    with pytest.raises(ContextTooLongError):
        compressor.encode_ids([[5] * (compressor.encoder.max_tokens + 1)])


def test_coarser_means_equal_derive(compressor):
    f = compressor.encode([TEXTS[1]])[0]
    c = cache.coarser(f, 8, compressor.pooling.finest)
    want = compressor.pooling.derive([f.features], [f.counts], [8])[0]
    assert torch.allclose(c.features, want, atol=1e-6)
    pooled = compressor.pooling.pooled_length(f.n_tokens)  # the end marker is pooled with the text
    assert int(c.counts.sum()) == pooled and c.features.shape[0] == math.ceil(pooled / 8)


def _load(path):
    return json.loads(path.read_text())


def test_ttft_tiny(tmp_path):
    rec = ttft.main(["--model", "tiny", "--ks", "2", "--lengths", "30", "--reps", "1", "--warmup", "0",
                     "--generate-reps", "1", "--new-tokens", "2", "--threads", "1", "--out", str(tmp_path),
                     "--no-plot"])
    assert _load(tmp_path / "ttft.json")["rows"] == json.loads(json.dumps(rec["rows"]))
    (row,) = rec["rows"]
    assert row["positions_compressed"] < row["positions_text"]
    assert row["ideal_speedup"] == row["positions_text"] / row["positions_compressed"]
    assert row["fraction_of_ideal"] == pytest.approx(row["ttft_speedup"] / row["ideal_speedup"])
    assert set(row["compressed_split_s"]) == {"store_read_s", "derive_project_s", "prompt_s", "prefill_s"}
    assert "e2e_speedup" in row and len(rec["machine"]["loadavg"]) == 3


def test_throughput_tiny(tmp_path):
    rec = throughput.main(["--model", "tiny", "--chunks", "8", "--batch-sizes", "1,4", "--reps", "1",
                           "--max-tokens", "40", "--threads", "1", "--out", str(tmp_path)])
    rows = {(r["batch_size"], r["batching"]): r for r in rec["rows"]}
    assert set(rows) == {(1, "bucketed"), (4, "bucketed"), (4, "unsorted")}
    assert rows[(1, "bucketed")]["padding"] == 0.0
    assert rows[(4, "unsorted")]["padding"] >= rows[(4, "bucketed")]["padding"]
    assert rec["worst_overhead"] == max(r["overhead"] for r in rec["rows"])
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_cache_tiny(tmp_path):
    rec = cache.main(["--model", "tiny", "--entries", "60", "--quick", "--reps", "1", "--threads", "1",
                      "--out", str(tmp_path), "--no-plot"])
    assert rec["store"]["entries"] == 60
    sizes = {s["what"]: s["bytes"] for s in rec["sizes"]}
    kv = [v for k, v in sizes.items() if k.startswith("decoder KV cache,") and "fp16" in k][0]
    tokens = float([k for k in sizes if k.startswith("decoder KV cache,")][0].split()[3])
    assert kv == pytest.approx(rec["kv_bytes_per_token_fp16"] * tokens, rel=1e-2)
    assert rec["kv_bytes_per_token_fp16"] == 2 * 2 * 2 * 16 * 2  # 2 layers, 2 kv heads, head dim 16, fp16
    assert sorted(rec["get_many"]) == [1, 5, 50, 500]
    assert rec["targets"]["speedup_vs_encode"] == pytest.approx(rec["get_many"][5]["chunks_s"] / rec["encode_chunks_s"])
    assert rec["targets"]["best_rate"] == max(r["chunks_s"] for r in rec["get_many"].values())


def test_scaling_tiny(tmp_path):
    rec = scaling.main(["--sizes", "120,240", "--beyond", "400", "--hnsw-max", "240", "--queries", "10",
                        "--reps", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--no-plot"])
    assert [r["chunks"] for r in rec["rows"]] == [120, 240]
    assert all(r["store_bytes_per_chunk"] > 0 and r["query_ms"] > 0 for r in rec["rows"])
    kinds = [(r["vectors"], r["kind"]) for r in rec["indexes"]]
    wide = f"ivf nprobe={scaling.IVF_WIDE_NPROBE}"
    assert kinds == [(120, "flat"), (120, "ivf"), (120, wide), (120, "hnsw"), (240, "flat"), (240, "ivf"), (240, wide),
                     (240, "hnsw"), (400, "flat"), (400, "ivf"), (400, wide)]
    small_wide = [r for r in rec["indexes"] if r["vectors"] == 120 and r["kind"] == wide][0]
    assert small_wide["recall_at_k"] == 1.0  # 120 vectors make 3 cells: probing all of them is exact search
    for r in rec["indexes"]:
        assert (r["recall_at_k"] is None) == (r["kind"] == "flat")
        assert 0.0 <= r["known_item_at_k"] <= 1.0


def test_gpu_script_dry_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    rec = gpu_h200.main(["--dry-run", "--threads", "1"])
    saved = _load(tmp_path / "gpu_h200_dry_run.json")
    assert saved["settings"]["dry_run"] and saved["settings"]["device"] == "cpu"
    assert rec["ttft"] and rec["throughput"] and not rec["skipped_over_budget"]
    for row in rec["ttft"]:
        assert row["ideal_speedup"] == row["positions_text"] / row["positions_compressed"]
        assert row["latents"] < row["chunk_tokens"] * row["k"]


def test_run_all_writes_a_summary(tmp_path):
    assert run_all.main(["--only", "gpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    summary = _load(tmp_path / "summary.json")
    assert summary["failed"] == {} and "gpu" in summary["seconds"]
    assert (tmp_path / "summary.md").read_text().startswith("# Benchmark summary")
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
