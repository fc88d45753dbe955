"""The trainer on tiny models: losses drop, resume is exact, every mode and backbone trains."""

from __future__ import annotations

import json
import random

import pytest
import torch

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.training import TrainConfig, TrainingRecord, load_train_config, write_records
from semidyn_rag.training.trainer import Trainer, train

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma tau "
         "upsilon omega red green blue cyan").split()
ANSWERS = ["Paris", "Tokyo", "Lima", "Oslo"]


def make_records(n: int = 12, seed: int = 0) -> list[TrainingRecord]:
    """Contexts of varied length naming a city; the summary length (hence label) varies too."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40)))
        city = ANSWERS[i % len(ANSWERS)]
        ctx = f"{filler}. The city is {city}."
        summary = " ".join(WORDS[: 1 + (i * 5) % 9])
        if i % 5 == 4:  # some records carry no summary: left out of the MSE
            out.append(TrainingRecord(context=ctx, question="Which city?", answer=city))
        else:
            out.append(TrainingRecord(context=ctx, question="Which city?", answer=city, concise_summary=summary))
    out.append(TrainingRecord(context=[out[0].contexts[0], out[1].contexts[0]], task="multi_doc_qa",
                              question="Which city comes first?", answer=ANSWERS[0],
                              concise_summary=[out[0].concise_summary, None]))
    return out


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_records(path, make_records())
    return path


def make_config(tiny_dirs, train_file, out, *, compressor=None, objective=None, optim=None, **top) -> TrainConfig:
    enc, dec = tiny_dirs
    comp = {"encoder": str(enc), "decoder": str(dec), "projector_hidden_size": 64, "device": "cpu",
            "encoder_lora": {"r": 4, "alpha": 8}, "decoder_lora": {"r": 4, "alpha": 8}, **(compressor or {})}
    opt = {"lr": 5e-3, "new_modules_lr": 1e-2, "batch_size": 4, "max_steps": 4, **(optim or {})}
    return TrainConfig.model_validate({"compressor": comp, "data": {"train": str(train_file)},
                                       "objective": objective or {}, "optim": opt, "output_dir": str(out),
                                       "progress": False, **top})


def rows(out, split="train"):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == split]


def test_losses_drop(tiny_dirs, train_file, tmp_path):
    # a fully trained tiny decoder: with LoRA alone its random, tiny tied embeddings cap how
    # peaked its output can get, and the LM loss cannot fall far in a few dozen steps
    cfg = make_config(tiny_dirs, train_file, tmp_path / "run", compressor={"decoder_training": "full"},
                      optim={"max_steps": 40, "warmup_steps": 2, "lr": 3e-3})
    result = train(cfg)
    r = rows(tmp_path / "run")
    assert len(r) == 40 and result.steps == 40
    lm = [x["lm"] for x in r]
    mse = [x["mse"] for x in r if x["mse"] is not None]
    first_lm, last_lm = sum(lm[:5]) / 5, sum(lm[-5:]) / 5
    first_mse, last_mse = sum(mse[:5]) / 5, sum(mse[-5:]) / 5
    print(f"lm {first_lm:.3f} -> {last_lm:.3f}; mse {first_mse:.3f} -> {last_mse:.3f}")
    assert last_lm < 0.6 * first_lm
    assert last_mse < 0.5 * first_mse
    # outputs: final compressor loads and reads like the trained one; plot and config written
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    comp = SemiDynamicCompressor.from_pretrained(result.final_dir)
    assert comp.device.type == "cpu"
    assert comp.config.device is None and comp.config.dtype == "auto"  # where it ran is not saved


def test_resume_reproduces_the_uninterrupted_run(tiny_dirs, train_file, tmp_path):
    # LoRA dropout and reconstruction draws exercise the RNG restore; grad_accum the data position;
    # the projector calibration runs on the fresh start only (a resumed run keeps its weights)
    kw = dict(compressor={"decoder_lora": {"r": 4, "alpha": 8, "dropout": 0.1}}, calibrate_projector=8,
              objective={"reconstruction_prob": 0.5}, optim={"max_steps": 6, "grad_accum": 2, "warmup_steps": 2})
    full = tmp_path / "full"
    train(make_config(tiny_dirs, train_file, full, save_every=3, **kw))
    ckpt = full / "checkpoints" / "step-00000003"
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.json", "rng-rank0.pt", "trainer_state.json"} <= \
        {p.name for p in ckpt.iterdir()}
    resumed = tmp_path / "resumed"
    train(make_config(tiny_dirs, train_file, resumed, resume=str(ckpt), **kw))
    a, b = rows(full), rows(resumed)
    assert [r["step"] for r in b] == [4, 5, 6]
    for ra, rb in zip(a[3:], b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra, rb)
        assert ra["reconstruction"] == rb["reconstruction"] and ra["mean_size"] == rb["mean_size"]
    from safetensors.torch import load_file

    wa = load_file(str(full / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    wb = load_file(str(resumed / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def test_auto_resume_continues_and_keeps_metrics_consistent(tiny_dirs, train_file, tmp_path):
    out = tmp_path / "run"
    train(make_config(tiny_dirs, train_file, out, optim={"max_steps": 2}))
    # the same output_dir with more steps resumes from step 2 instead of starting over
    train(make_config(tiny_dirs, train_file, out, optim={"max_steps": 3}))
    assert [r["step"] for r in rows(out)] == [1, 2, 3]


MODES = ["semi_dynamic", "static", "multi_ratio", "fully_dynamic"]
BACKBONES = ["mean_pool", "last_tokens", "compression_tokens"]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_backbone_trains(tiny_dirs, train_file, tmp_path, mode, backbone):
    comp = {"backbone": backbone, "lengths": [2, 4, 8], "factors": [2, 4, 8]}
    static = 4
    cfg = make_config(tiny_dirs, train_file, tmp_path / "run", compressor=comp,
                      objective={"mode": mode, "static_factor": static if mode == "static" else None},
                      optim={"max_steps": 2})
    tr = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.comp.named_parameters()}
    out = [tr.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out)
    changed = {n for n, p in tr.comp.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any(n.startswith("projector.") for n in changed)
    assert any("lora_" in n and n.startswith("encoder.") for n in changed)
    assert any("lora_" in n and n.startswith("decoder.") for n in changed)
    head_trained = any(n.startswith("density_head.") for n in changed)
    assert head_trained == (mode in ("semi_dynamic", "fully_dynamic"))
    if backbone == "compression_tokens":
        assert "pooling.memory" in changed
    if mode == "static":
        assert all(r["mean_size"] == static for r in out)
    if mode in ("semi_dynamic", "multi_ratio"):
        assert all(r["mean_size"] in (2, 4, 8) for r in out)
    ev = tr.evaluate()
    assert ev is None  # no held-out set configured


def test_distillation_and_reconstruction_terms(tiny_dirs, train_file, tmp_path):
    cfg = make_config(tiny_dirs, train_file, tmp_path / "run",
                      objective={"distill_weight": 0.5, "reconstruction_prob": 1.0, "reconstruction_max_tokens": 12},
                      optim={"max_steps": 2, "batch_size": 3})
    tr = Trainer(cfg)
    row = tr.train_step()
    assert row["reconstruction"] == 3
    # every sample reproduces its first context: the targets are its first 12 decoder tokens
    _, idx = tr.order.batch(0)
    expected = sum(len(tr.train_examples[i].recon_answer_ids) for i in idx)
    assert row["answer_tokens"] == expected == 3 * 12
    assert row["kl"] > 0
    mse = row["mse"] if row["mse"] is not None else 0.0
    assert row["loss"] == pytest.approx(row["lm"] + 1.0 * mse + 0.5 * row["kl"], rel=1e-5)


def test_distillation_teacher_is_the_base_decoder(tiny_dirs, train_file, tmp_path):
    """With adapters disabled the teacher ignores LoRA: perturbing LoRA B leaves the KL target alone."""
    cfg = make_config(tiny_dirs, train_file, tmp_path / "run", objective={"distill_weight": 1.0},
                      optim={"max_steps": 1})
    tr = Trainer(cfg)
    from semidyn_rag.training.data import collate

    batch = collate(tr.train_examples[:2], [4, 4], distill=True)
    tr.comp.eval()
    kl1 = float(tr.objective(batch)["kl"])
    with torch.no_grad():
        for n, p in tr.comp.decoder.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    kl2 = float(tr.objective(batch)["kl"])
    assert kl1 != kl2  # the student changed
    # and the teacher is exactly the bare base model reading text
    model = tr.comp.decoder.model
    ids = torch.tensor([batch.teacher_ids[0]])
    with torch.no_grad(), model.disable_adapter():
        t1 = model(input_ids=ids).logits
    base = model.get_base_model()
    with torch.no_grad(), model.disable_adapter():
        t2 = base(input_ids=ids).logits
    assert torch.allclose(t1, t2)


def test_gradient_checkpointing_gives_the_same_losses(tiny_dirs, train_file, tmp_path):
    losses = []
    for gc in (False, True):
        tr = Trainer(make_config(tiny_dirs, train_file, tmp_path / f"gc{gc}", gradient_checkpointing=gc,
                                 optim={"max_steps": 2}))
        for m in (tr.comp.encoder.model, tr.comp.decoder.model):
            assert m.get_base_model().is_activation_checkpointing == gc
        losses.append([tr.train_step()["loss"] for _ in range(2)])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_held_out_evaluation_uses_the_heads_choice(tiny_dirs, train_file, tmp_path):
    cfg = make_config(tiny_dirs, train_file, tmp_path / "run", eval_every=2, optim={"max_steps": 2})
    cfg.data.eval = str(train_file)
    result = train(cfg)
    ev = rows(tmp_path / "run", "eval")
    assert [r["step"] for r in ev] == [2] and result.last_eval["step"] == 2
    assert ev[0]["answer_tokens"] > 0 and ev[0]["labelled"] > 0
    # semi-dynamic evaluation pools each context at the factor the selector picks, as inference does
    tr = Trainer(make_config(tiny_dirs, train_file, tmp_path / "run", optim={"max_steps": 2}))
    tr.eval_examples = tr.train_examples
    ev = tr.evaluate()
    ids = [c for ex in tr.eval_examples for c in ex.context_ids]
    with torch.no_grad():
        y_hat, _ = tr.comp._encode_batch(ids)
    chosen = tr.comp.select(y_hat, torch.tensor([len(c) for c in ids])).tolist()
    assert ev["mean_size"] == pytest.approx(sum(chosen) / len(chosen))


def test_torchrun_ddp_two_processes(tiny_dirs, train_file, tmp_path):
    """Two CPU processes (gloo): sharded batches, synced steps, one RNG file per rank."""
    import subprocess
    import sys

    enc, dec = tiny_dirs
    f = tmp_path / "run.yaml"
    out = tmp_path / "out"
    f.write_text(f"""
compressor: {{encoder: {enc}, decoder: {dec}, projector_hidden_size: 64, device: cpu}}
data: {{train: {train_file}}}
optim: {{max_steps: 2, batch_size: 2, grad_accum: 2}}
output_dir: {out}
progress: false
save_every: 1
""")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "semidyn_rag.cli.train", "--config", str(f)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-00000001"
    assert (ckpt / "rng-rank0.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert [r["step"] for r in rows(out)] == [1, 2]
    # a 2-process checkpoint cannot be continued by one process (its data shards would differ)
    with pytest.raises(ValueError, match="2 process"):
        Trainer(make_config(tiny_dirs, train_file, tmp_path / "x", resume=str(ckpt)))


def test_config_errors(tiny_dirs, train_file, tmp_path):
    with pytest.raises(ValueError, match="static_factor"):
        make_config(tiny_dirs, train_file, tmp_path, objective={"mode": "static"})
    with pytest.raises(ValueError, match="multiple of the finest"):
        make_config(tiny_dirs, train_file, tmp_path, objective={"mode": "static", "static_factor": 3})
    with pytest.raises(ValueError, match="distillation"):
        make_config(tiny_dirs, train_file, tmp_path, compressor={"decoder_training": "full"},
                    objective={"distill_weight": 1.0})
    with pytest.raises(ValueError, match="max_steps or optim.epochs"):
        TrainConfig.model_validate({"data": {"train": "x"}, "optim": {}})


def test_yaml_config_and_overrides(tiny_dirs, train_file, tmp_path):
    enc, dec = tiny_dirs
    f = tmp_path / "run.yaml"
    f.write_text(f"""
compressor: {{encoder: {enc}, decoder: {dec}, projector_hidden_size: 64, device: cpu}}
data: {{train: {train_file}}}
optim: {{max_steps: 10, lr: 1.0e-4}}
output_dir: {tmp_path / "out"}
""")
    cfg = load_train_config(f, ["optim.max_steps=3", "objective.mode=multi_ratio"])
    assert cfg.optim.max_steps == 3 and cfg.objective.mode == "multi_ratio" and cfg.optim.lr == 1e-4
    f.write_text(f.read_text() + "optimiser: {}\n")
    with pytest.raises(ValueError, match="optimiser"):
        load_train_config(f)


def test_cli_train(tiny_dirs, train_file, tmp_path, capsys, caplog):
    from semidyn_rag.cli import main

    enc, dec = tiny_dirs
    f = tmp_path / "run.yaml"
    f.write_text(f"""
compressor: {{encoder: {enc}, decoder: {dec}, projector_hidden_size: 64, device: cpu}}
data: {{train: {train_file}}}
optim: {{max_steps: 2}}
output_dir: {tmp_path / "out"}
""")
    assert main(["train", "--config", str(f), "--no-progress"]) == 0
    assert "compressor saved to" in capsys.readouterr().out
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "question": "q", "answer": "a"}\n{"context": "", "answer": "a"}\n')
    assert main(["train", "--config", str(f), "--set", f"data.train={bad}", "--output-dir", str(tmp_path / "o2"),
                 "--no-progress"]) == 2
    assert "bad.jsonl:2: context: context is empty" in caplog.text
