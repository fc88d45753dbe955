"""Fitting the scale to a target average ratio: the fit, the compressor method, precompress and fit-scale."""

from __future__ import annotations

import json
import math

import pytest
import torch

from semidyn_rag.cli import main
from semidyn_rag.corpus import CorpusDirectory, precompress, read_manifest
from semidyn_rag.pipeline.target_ratio import fit_scale, latent_counts
from semidyn_rag.testing import write_random_docs

from .conftest import TEXTS

# Predictions spread over the candidate set, lengths from one token to a long chunk.
Y = [0.4, 1.1, 1.6, 2.0, 2.3, 2.6, 3.1, 3.5, 4.2, 4.9, 1.9, 2.8]
N = [1, 7, 40, 95, 256, 130, 12, 300, 64, 200, 33, 150]


def _ratio(comp, scale, average, y=Y, n=N):
    _, lat = latent_counts(comp, y, n, scale)
    return sum(a / m for a, m in zip(n, lat)) / len(n) if average == "mean" else sum(n) / sum(lat)


@pytest.mark.parametrize("average", ["mean", "sums"])
@pytest.mark.parametrize("target", [2.5, 4.0, 7.3, 12.0])
def test_the_fit_is_the_smallest_scale_reaching_the_target(compressor, average, target):
    fit = fit_scale(compressor, Y, N, target, average=average)
    got = fit.ratio_mean if average == "mean" else fit.ratio_sums
    assert got >= target
    assert got == pytest.approx(_ratio(compressor, fit.scale, average))
    assert _ratio(compressor, fit.scale - 3e-4, average) < target  # a hair lower misses it
    # no scale on a fine grid below the fit reaches the target (the fit is not just any answer)
    grid = [fit.scale - 0.01 * i for i in range(1, 1500)]
    assert all(_ratio(compressor, s, average) < target for s in grid)
    assert sum(fit.histogram.values()) == fit.contexts == len(Y)
    assert fit.takes == "factor" and set(fit.histogram) <= {"2", "4", "8", "16", "32"}
    assert round(fit.scale, 4) == fit.scale  # a number one can type back


def test_the_ratio_grows_with_the_scale(compressor):
    values = [_ratio(compressor, s / 10, "mean") for s in range(-80, 80)]
    assert values == sorted(values)


def test_latent_counts_match_the_latents_the_compressor_makes(compressor):
    feats = compressor.encode(TEXTS * 3)
    fit = compressor.scale_for_ratio(feats, 3.0)
    ctxs = compressor.compress_features(feats, scale=fit.scale)
    assert sum(c.ratio for c in ctxs) / len(ctxs) == pytest.approx(fit.ratio_mean)
    assert fit.ratio_mean >= 3.0
    assert {str(f): n for f, n in sorted(
        {c.factor: sum(d.factor == c.factor for d in ctxs) for c in ctxs}.items())} == fit.histogram


@pytest.mark.parametrize("backbone", ["last_tokens", "compression_tokens"])
def test_token_backbones_fit_latent_counts(make_compressor, backbone):
    comp = make_compressor(backbone=backbone, lengths=(2, 4, 8, 16))
    n = [20, 40, 64, 90, 128, 33]
    y = [1.0, 2.0, 2.5, 3.0, 3.5, 4.0]
    fit = fit_scale(comp, y, n, 10.0)
    assert fit.takes == "length" and fit.ratio_mean >= 10.0
    assert _ratio(comp, fit.scale - 3e-4, "mean", y, n) < 10.0


def test_weights_count_a_context_as_often_as_it_is_read(compressor):
    w = [1, 0, 3, 1, 2, 5, 1, 1, 0, 2, 1, 4]
    fit = fit_scale(compressor, Y, N, 4.0, weights=w)
    repeated_y = [y for y, k in zip(Y, w) for _ in range(k)]
    repeated_n = [n for n, k in zip(N, w) for _ in range(k)]
    same = fit_scale(compressor, repeated_y, repeated_n, 4.0)
    assert fit.scale == same.scale and fit.ratio_mean == pytest.approx(same.ratio_mean)
    assert fit_scale(compressor, Y, N, 4.0, weights=[2] * len(Y)).scale == fit_scale(compressor, Y, N, 4.0).scale
    for bad, msg in (([1] * 3, "3 weights for 12"), ([-1] + [1] * 11, "non-negative"), ([0] * 12, "not all zero"),
                     ([math.nan] + [1] * 11, "finite")):
        with pytest.raises(ValueError, match=msg):
            fit_scale(compressor, Y, N, 4.0, weights=bad)


def test_bad_targets_and_inputs_are_named(compressor, make_compressor):
    with pytest.raises(ValueError, match="out of reach: the coarsest choice .* gives"):
        fit_scale(compressor, Y, N, 1000)
    with pytest.raises(ValueError, match="finest choice already gives"):
        fit_scale(compressor, Y, N, 1.1)
    for bad in (0, -2, math.nan, math.inf, "four", True):
        with pytest.raises(ValueError, match="target ratio must be"):
            fit_scale(compressor, Y, N, bad)
    with pytest.raises(ValueError, match="average must be one of"):
        fit_scale(compressor, Y, N, 4, average="median")
    with pytest.raises(ValueError, match="no contexts"):
        fit_scale(compressor, [], [], 4)
    with pytest.raises(ValueError, match="3 predictions for 2"):
        fit_scale(compressor, [1.0, 2.0, 3.0], [5, 6], 4)
    with pytest.raises(ValueError, match="no density head"):
        fit_scale(make_compressor(density_head=False), Y, N, 4)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    write_random_docs(root, 14, seed=3, words=(5, 60))
    return root


ARGS = ["--chunk-tokens", "40", "--batch-size", "4", "--no-progress"]


def test_precompress_records_the_fitted_scale(tmp_path, docs, ckpt, capsys):
    out = tmp_path / "corpus"
    assert main(["precompress", str(docs), "--out", str(out), "--compressor", str(ckpt), "--target-ratio", "5",
                 *ARGS]) == 0
    assert "fitted to a mean ratio of 5" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    scale = read_manifest(out).scale
    assert stats["scale"] == scale and stats["fitted_to"] == {"ratio": 5.0, "average": "mean"}
    # the fit over the stored chunks, again through the library: same scale
    from semidyn_rag import SemiDynamicCompressor

    comp = SemiDynamicCompressor.from_pretrained(str(ckpt))
    with CorpusDirectory(out) as cd:
        chunks = cd.chunks(range(len(cd)))
        ctxs, _ = cd.contexts(chunks, comp)  # at the recorded scale
    assert sum(c.ratio for c in ctxs) / len(ctxs) >= 5.0
    assert comp.scale_for_ratio(comp.encode([c.text for c in chunks]), 5.0).scale == scale

    # fit-scale on the directory (store reads) and on the documents (encoding) agree with it
    assert main(["fit-scale", str(out), "--target-ratio", "5", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["scale"] == scale
    assert main(["fit-scale", str(docs), "--target-ratio", "5", "--compressor", str(ckpt), "--chunk-tokens", "40",
                 "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["scale"] == scale
    # a store missing some chunks: those are encoded, the rest read, same answer
    from semidyn_rag.store import LatentStore

    with LatentStore(out / "latents.sqlite") as store:
        assert store.delete([c.key for c in chunks[::2]], comp.feature_fingerprint) == len(chunks[::2])
    assert main(["fit-scale", str(out), "--target-ratio", "5", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["scale"] == scale
    # a store that is gone: the chunks are encoded instead, same answer
    (out / "latents.sqlite").unlink()
    assert main(["fit-scale", str(out), "--target-ratio", "5", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["scale"] == scale

    # the framework packages' settings default to the recorded scale; an explicit one wins
    from semidyn_rag.session_settings import SessionSettings

    assert SessionSettings(store_path=str(out)).scale == scale
    assert SessionSettings(store_path=str(out), scale=1.5).scale == 1.5
    assert SessionSettings(store_path=str(tmp_path / "s.sqlite"), compressor_path=str(ckpt)).scale == 0.0

    # a rerun at an explicit scale records that one, and stats no longer claim a fit
    assert main(["precompress", str(docs), "--out", str(out), "--compressor", str(ckpt), "--scale", "0.5",
                 *ARGS]) == 0
    assert read_manifest(out).scale == 0.5
    assert json.loads((out / "stats.json").read_text())["fitted_to"] is None


def test_precompress_refuses_a_scale_and_a_target_before_any_work(tmp_path, docs, ckpt, make_compressor, capsys):
    out = tmp_path / "corpus"
    with pytest.raises(SystemExit) as e:
        main(["precompress", str(docs), "--out", str(out), "--compressor", str(ckpt), "--scale", "1",
              "--target-ratio", "4", *ARGS])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["precompress", str(docs), "--out", str(out), "--compressor", str(ckpt), "--ratio-average", "sums",
                 *ARGS]) == 2
    assert "only applies with --target-ratio" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a scale or a target ratio, not both"):
        precompress(docs, out, make_compressor(), scale=1.0, target_ratio=4.0)
    with pytest.raises(ValueError, match="no density head"):
        precompress(docs, out, make_compressor(density_head=False, factors=(4,)), target_ratio=4.0)
    assert not out.exists() or not any(out.iterdir())  # refused before writing anything


def test_fit_scale_errors_are_one_line(tmp_path, docs, ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit-scale", str(docs), "--target-ratio", "0.5", "--compressor", str(ckpt)])
    assert e.value.code == 2 and "must be a finite number above 1" in capsys.readouterr().err
    assert main(["fit-scale", str(tmp_path / "nothing"), "--target-ratio", "4", "--compressor", str(ckpt)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fit-scale", str(docs), "--target-ratio", "900", "--compressor", str(ckpt), "--chunk-tokens", "40",
                 "--no-progress"]) == 1
    assert "out of reach" in capsys.readouterr().err
    assert main(["fit-scale", str(docs), "--target-ratio", "4", "--compressor", str(ckpt), "--chunk-tokens", "40",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("scale ")


def test_scale_fit_needs_no_grad(compressor):
    with torch.inference_mode():  # callers in serving code may hold inference mode
        assert fit_scale(compressor, Y, N, 4.0).ratio_mean >= 4.0
