"""The authors' checkpoints: every layout their code writes loads and computes what their code computes.

Each test writes a folder as ``modeling_ctxcomp.py``'s ``save_pretrained`` lays it out (config
keys and their older aliases, ``encoder/``/``decoder/`` or ``embed_model/``/``gen_model/``, PEFT
adapters trained on ``AutoModel`` (encoder, no task type) and ``AutoModelForCausalLM`` (decoder),
a flat, nested or ``projector.``-prefixed ``projector.pth`` in bf16, ``memory_token_embedding.pth``)
over tiny random Qwen3 models, with every trained weight non-trivial (LoRA B, projector, norm,
head, memory rows). ``SemiDynamicCompressor.from_pretrained(folder, device="cpu")`` must then match
``Reference``: the authors' computation written out here with transformers, peft and plain torch
only (never semidyn_rag.pipeline), following .notes/authors_spec.md:

* context = encoder tokens + eos (+ memory ids after eos); ``mean_pooling`` is bidirectional
  (their ``is_causal=False`` switch, unpadded), every other method causal;
* semi-dynamic: head on the eos state, + scale in log2 space, nearest of 1/r to 2^y in linear
  space, M = ceil(L/S), start-aligned true means (L = n + 1: the eos is pooled); int lists:
  M = nearest of floor(L * 2^-y), min(M, L);
* static / multi-ratio: left zero padding to a multiple of S, every window divided by S;
* last_tokens: last M states of context + eos; memory tokens: first M memory states;
* projector RMSNorm(eps 1e-6) -> up -> exact GELU -> down; the placeholder's embedding row is
  replaced by the M latents; greedy ``generate(inputs_embeds=...)``.

Checked per case: the latent count (and chosen factor), latents to 1e-5 in fp32, the same greedy
text. Also: hub id + subfolder from a hub cache on disk, base-path resolution, no remote code
from a checkpoint, and a refused pickle in projector.pth.
"""

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from semidyn_rag import CheckpointError, SemiDynamicCompressor

# placeholder and its id; memory_token_begin_id: inside the vocab, as theirs is (CONTEXTS[3] holds id 306,
# which reads the overwritten row in their encoder)
PH, PH_ID, BEGIN = "<|video_pad|>", 3, 300
CONTEXTS = [  # n + 1 (eos included) = 8, 13, 12, 31, 32, 11 tokens with the tiny tokenizer
    "The Eiffel Tower is in Paris.",
    "The Eiffel Tower is in Paris, the capital of France.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas, on the border of Nepal.",
    "The king and the queen crossed the bridge by the sea.",
    "Photosynthesis converts light energy into chemical energy in plants.",
]
SHORT = "Paris."  # n + 1 = 4; with the candidate 16, contexts of 11-13 tokens exercise M = min(M, L)
QUESTION, NEW_TOKENS, ATOL = "Where is it?", 6, 1e-5
RATIOS = [0.5, 0.25, 0.125, 0.0625]
ENC_LORA = dict(r=16, lora_alpha=32, use_rslora=True, lora_dropout=0.1, target_modules="all-linear")
DEC_LORA = dict(r=16, lora_alpha=16, use_rslora=True, lora_dropout=0.1, target_modules="all-linear",
                task_type="CAUSAL_LM")
OLD_KEYS = {"base_encoder_model_path": "base_embed_model_path", "base_decoder_model_path": "base_gen_model_path",
            "encoder_training": "emb_model_training", "decoder_training": "gen_model_training",
            "comp_ratio_or_len": "num_doc_tokens", "feature_extract_method": "compress_method",
            "mlp_converter_hidden_dim": "mlp_hidden_dim"}


@dataclass
class Written:
    """What a checkpoint holds: its settings and the random non-adapter weights written to it."""

    path: Path
    enc_base: str
    dec_base: str
    method: str
    sizes: object  # comp_ratio_or_len as written: a float/int, or a list
    semi: bool
    enc: str
    dec: str
    legacy: bool
    proj: dict = field(default_factory=dict)
    head: dict | None = None
    memory: dict | None = None


def _rand(g, *shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


def write_authors(path, enc_base, dec_base, *, method="mean_pooling", sizes=RATIOS, semi=True, enc="lora",
                  dec="lora", projector="nested", legacy=False, memory_file=True, stored=None, seed=0) -> Written:
    """Write an authors' checkpoint (their save_pretrained layout) with trained-looking weights."""
    path, g = Path(path), torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    folders = ("embed_model", "gen_model") if legacy else ("encoder", "decoder")
    models = (AutoModel.from_pretrained(enc_base), AutoModelForCausalLM.from_pretrained(dec_base))
    for mode, model, lora, folder in zip((enc, dec), models, (ENC_LORA, DEC_LORA), folders):
        if mode == "lora":
            model = get_peft_model(model, LoraConfig(**lora))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or (mode == "full" and p.dim() == 2):
                    p.add_(_rand(g, *p.shape, std=0.02))
        if mode != "none":
            model.to(torch.bfloat16).save_pretrained(path / folder)  # they train and save in bf16
    h_enc, h_dec = models[0].config.hidden_size, models[1].config.hidden_size
    w = Written(path, str(enc_base), str(dec_base), method, sizes, semi, enc, dec, legacy)
    w.proj = {"rms_norm.weight": 1 + _rand(g, h_enc), "up_proj.weight": _rand(g, 128, h_enc, std=0.2),
              "down_proj.weight": _rand(g, h_dec, 128, std=0.2)}
    w.proj = {k: v.to(torch.bfloat16) for k, v in w.proj.items()}
    if semi:
        w.head = {"weight": _rand(g, 1, h_enc, std=0.3).bfloat16(), "bias": torch.tensor([2.5]).bfloat16()}
        state = {"projector": w.proj, "compress_ratio_head": w.head}
    else:
        state = {f"projector.{k}": v for k, v in w.proj.items()} if projector == "prefixed" else w.proj
    torch.save(state, path / "projector.pth")
    if method.endswith("memory_tokens") and enc != "none" and memory_file:
        n = max(sizes) if isinstance(sizes, list) else sizes
        idx = [BEGIN] if method == "same_memory_tokens" else list(range(BEGIN, BEGIN + n))
        w.memory = {"indices": idx, "weight": _rand(g, len(idx), h_enc, std=1.0).bfloat16()}
        torch.save(w.memory, path / "memory_token_embedding.pth")
    stored = stored or (w.enc_base, w.dec_base)
    cfg = {"comp_ratio_or_len": sizes, "placeholder_token_id": PH_ID, "mlp_converter_hidden_dim": 128,
           "feature_extract_method": method, "memory_token_begin_id": BEGIN, "encoder_training": enc,
           "decoder_training": dec, "base_encoder_model_path": stored[0], "base_decoder_model_path": stored[1]}
    if semi:
        cfg.update(discretize_ratio_mode="round", discretize_compare_in_log=False)
    if legacy:
        cfg = {OLD_KEYS.get(k, k): v for k, v in cfg.items()}
        cfg["compress_method"] = {"mean_pooling": "mean_pooling_by_ratio"}.get(method, method)
    (path / "config.json").write_text(json.dumps(cfg))
    return w


class Reference:
    """The authors' inference, step by step, for one context at a time (batch 1, no padding)."""

    def __init__(self, w: Written):
        self.w = w
        folders = ("embed_model", "gen_model") if w.legacy else ("encoder", "decoder")
        kw = {"dtype": torch.float32, "attn_implementation": "sdpa"}
        sides = []
        for mode, base, folder, cls in ((w.enc, w.enc_base, folders[0], AutoModel),
                                        (w.dec, w.dec_base, folders[1], AutoModelForCausalLM)):
            model = cls.from_pretrained(w.path / folder if mode == "full" else base, **kw)
            sides.append(PeftModel.from_pretrained(model, w.path / folder) if mode == "lora" else model)
        self.enc, self.dec = (m.eval() for m in sides)
        if w.method == "mean_pooling":  # their _set_encoder_attention_non_causal
            base = self.enc.get_base_model() if isinstance(self.enc, PeftModel) else self.enc
            for module in base.modules():
                if hasattr(module, "is_causal"):
                    module.is_causal = False
        if w.memory:  # rows of the encoder's own embedding table, overwritten in place
            self.enc.get_input_embeddings().weight.data[w.memory["indices"]] = w.memory["weight"].float()
        self.enc_tok = AutoTokenizer.from_pretrained(w.enc_base)
        self.dec_tok = AutoTokenizer.from_pretrained(w.dec_base)
        self.sizes = w.sizes if isinstance(w.sizes, list) else [w.sizes]

    @torch.no_grad()
    def latents(self, text, scale=0.0, factor=None):
        """(projected latents (M, d_dec), window size S or None)."""
        w, ids = self.w, self.enc_tok(text, add_special_tokens=False)["input_ids"] + [self.enc_tok.eos_token_id]
        n_ctx, ratio_based = len(ids), w.method.startswith("mean_pooling")
        if w.method.endswith("memory_tokens"):
            m_max = max(self.sizes)
            ids += [BEGIN] * m_max if w.method == "same_memory_tokens" else list(range(BEGIN, BEGIN + m_max))
        x = torch.tensor([ids])
        h = self.enc(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False,
                     output_hidden_states=True).last_hidden_state[0]
        size = None
        if w.semi:
            y = (h[n_ctx - 1] @ w.head["weight"].float().T + w.head["bias"].float() + scale)[0]
            if ratio_based:
                inv = torch.tensor([1.0 / r for r in self.sizes])
                r = self.sizes[int((2.0 ** y - inv).abs().argmin())]
                size = max(1, round(1 / r))
                m = math.ceil(n_ctx / size)
            else:
                raw = int((torch.tensor(float(n_ctx)) * torch.pow(2.0, -y).clamp(1e-9, 1.0)).long())
                m = self.sizes[int((torch.tensor(self.sizes) - raw).abs().argmin())]
            m = max(1, min(m, n_ctx))
        elif ratio_based:
            r = 1.0 / factor if factor else self.sizes[0]
            assert r in self.sizes, "their multi-ratio models take only a listed ratio"
            size = max(1, round(1 / r))
            m = math.ceil(n_ctx / size)
        else:
            m = int(self.sizes[0])
        if ratio_based and w.semi:  # start-aligned windows, true means (last one partial)
            pooled = torch.stack([h[i:min(i + size, n_ctx)].mean(0) for i in range(0, n_ctx, size)])
        elif ratio_based:  # end-aligned: left zeros to a multiple of S, each window / S
            padded = torch.cat([h.new_zeros(m * size - n_ctx, h.shape[1]), h[:n_ctx]])
            pooled = padded.view(m, size, -1).mean(1)
        elif w.method == "last_tokens":
            pooled = h[n_ctx - m:n_ctx]
        else:
            pooled = h[n_ctx:n_ctx + m]
        assert pooled.shape[0] == m
        p = {k: v.float() for k, v in w.proj.items()}
        normed = p["rms_norm.weight"] * pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
        up = torch.nn.functional.gelu(normed @ p["up_proj.weight"].T)
        return up @ p["down_proj.weight"].T, size

    @torch.no_grad()
    def answer(self, latents, question=QUESTION):
        tok = self.dec_tok
        text = tok.apply_chat_template([{"role": "user", "content": f"Context: {PH}\n\nQuestion: {question}"}],
                                       tokenize=False, add_generation_prompt=True, enable_thinking=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids.count(PH_ID) == 1
        p = ids.index(PH_ID)
        emb = self.dec.get_input_embeddings()(torch.tensor(ids))
        emb = torch.cat([emb[:p], latents, emb[p + 1:]])[None]
        out = self.dec.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0], skip_special_tokens=True)


def check(comp, ref, label, scales=(0.0,), factors=(None,), texts=CONTEXTS) -> set:
    """Compare ``comp`` with ``ref`` on every text, scale and forced factor; returns the sizes chosen."""
    worst, chosen, outs = 0.0, set(), []
    for scale in scales:
        for factor in factors:
            kw = {"scale": scale} if factor is None else {"factor": factor}
            got = comp.compress(texts, **kw)  # one padded batch
            for text, c in zip(texts, got):
                want, size = ref.latents(text, scale, factor)
                assert c.latents.shape == want.shape, (label, text, scale, factor)
                assert c.factor == size, (label, text, scale)
                worst = max(worst, float((c.latents - want).abs().max()))
                torch.testing.assert_close(c.latents, want, atol=ATOL, rtol=ATOL)
                chosen.add(size or want.shape[0])
                outs.append(ref.answer(want))
                assert comp.generate(QUESTION, c, max_new_tokens=NEW_TOKENS) == outs[-1], (label, text, scale)
    assert any(outs), "the reference generations are all empty: the greedy check would be vacuous"
    print(f"\n[{label}] max |latent diff| = {worst:.2e} over {len(outs)} cases; sizes {sorted(chosen)}")
    return chosen


def load(path, **kw):
    return SemiDynamicCompressor.from_pretrained(str(path), device="cpu", **kw)


# -- mean pooling ------------------------------------------------------------------------------


def test_semi_dynamic_mean_pooling(tiny_dirs, tmp_path):
    w = write_authors(tmp_path / "semi", *tiny_dirs)
    comp = load(w.path)
    assert comp.config.factors == (2, 4, 8, 16) and comp.config.density_head
    chosen = check(comp, Reference(w), "semi-dynamic mean_pooling", scales=(-1, 0, 1, 2))
    assert len(chosen) >= 3, f"the head should pick several factors across scales, got {chosen}"


@pytest.mark.parametrize("method", ["mean_pooling", "mean_pooling_causal"])
def test_static_mean_pooling(tiny_dirs, tmp_path, method):
    w = write_authors(tmp_path / "static", *tiny_dirs, method=method, sizes=0.25, semi=False)
    comp = load(w.path)
    assert comp.config.is_bidirectional == (method == "mean_pooling")
    check(comp, Reference(w), f"static {method} (S=4)")


@pytest.mark.parametrize("projector", ["flat", "prefixed"])
def test_multi_ratio_mean_pooling(tiny_dirs, tmp_path, projector):
    w = write_authors(tmp_path / "multi", *tiny_dirs, sizes=[0.5, 0.25, 0.125], semi=False, projector=projector)
    comp = load(w.path)
    assert not comp.config.density_head
    check(comp, Reference(w), f"multi-ratio mean_pooling ({projector} projector.pth)", factors=(2, 4, 8))
    with pytest.raises(ValueError, match="no density head.*factor="):
        comp.compress(CONTEXTS[0])


# -- token methods -----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [6, [2, 4, 16]], ids=["static", "semi-dynamic"])
def test_last_tokens(tiny_dirs, tmp_path, sizes):
    semi = isinstance(sizes, list)
    w = write_authors(tmp_path / "last", *tiny_dirs, method="last_tokens", sizes=sizes, semi=semi)
    scales, texts = ((-1, -0.5, 0, 0.5, 1, 1.5, 2), CONTEXTS + [SHORT]) if semi else ((0.0,), CONTEXTS)
    check(load(w.path), Reference(w), f"last_tokens {sizes}", scales=scales, texts=texts)


@pytest.mark.parametrize("method", ["same_memory_tokens", "different_memory_tokens"])
@pytest.mark.parametrize("sizes,memory_file", [(8, True), (8, False), ([2, 4, 16], True)])
def test_memory_tokens(tiny_dirs, tmp_path, method, sizes, memory_file):
    """With the file the trained rows are used; without it (a frozen encoder) the base rows."""
    semi, enc = isinstance(sizes, list), "lora" if memory_file else "none"
    w = write_authors(tmp_path / "mem", *tiny_dirs, method=method, sizes=sizes, semi=semi, enc=enc)
    assert (w.path / "memory_token_embedding.pth").is_file() == memory_file
    scales, texts = ((-1, -0.5, 0, 0.5, 1, 1.5, 2), CONTEXTS + [SHORT]) if semi else ((0.0,), CONTEXTS)
    check(load(w.path), Reference(w), f"{method} {sizes} file={memory_file}", scales=scales, texts=texts)


# -- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("semi", [True, False])
def test_old_key_and_folder_names(tiny_dirs, tmp_path, semi):
    w = write_authors(tmp_path / "old", *tiny_dirs, sizes=RATIOS if semi else 0.25, semi=semi, legacy=True)
    raw = json.loads((w.path / "config.json").read_text())
    assert raw["compress_method"] == "mean_pooling_by_ratio" and "mlp_hidden_dim" in raw and "num_doc_tokens" in raw
    assert (w.path / "embed_model").is_dir() and not (w.path / "encoder").exists()
    check(load(w.path), Reference(w), f"old names semi={semi}", scales=(-1, 1) if semi else (0.0,))


def test_shared_base_two_adapters(tiny_dirs, tmp_path):
    """One base for both sides, LoRA on each: loaded as two instances, as their eval does."""
    base = tiny_dirs[1]
    w = write_authors(tmp_path / "shared", base, base)
    enc_keys = json.loads((w.path / "encoder" / "adapter_config.json").read_text())
    assert enc_keys.get("task_type") is None  # trained on AutoModel
    check(load(w.path), Reference(w), "shared base, two adapters", scales=(-1, 0, 1))


@pytest.mark.parametrize("enc,dec", [("none", "none"), ("full", "lora"), ("lora", "none")])
def test_frozen_and_full_sides(tiny_dirs, tmp_path, enc, dec):
    w = write_authors(tmp_path / "ck", *tiny_dirs, enc=enc, dec=dec)
    assert (w.path / "encoder").exists() == (enc != "none") and (w.path / "decoder").exists() == (dec != "none")
    check(load(w.path), Reference(w), f"encoder {enc} / decoder {dec}", scales=(0, 1))


# -- hub ids, base paths, safety ---------------------------------------------------------------

HUB_REPO = "yuyijiong/qwen3-semi-dynamic-soft-context-compress"
SUBFOLDER = "static/ctxcomp-encoder=qwen3-embedding-0.6b-lora-decoder=qwen3-0.6b-lora-contextlen=1300to128-ratio=0.25"
STORED = ("/share/models/Qwen3-Embedding-0.6B", "/share/models/Qwen3-0.6B")


def fake_hub(monkeypatch, root: Path, repos: dict) -> dict:
    """A Hugging Face hub cache on disk (refs/main -> snapshots/<commit>/); returns repo -> snapshot."""
    import huggingface_hub.constants

    snaps = {}
    for repo in repos:
        folder = root / f"models--{repo.replace('/', '--')}"
        commit = hashlib.sha1(repo.encode()).hexdigest()
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        snaps[repo] = folder / "snapshots" / commit
        if repos[repo] is not None:
            shutil.copytree(repos[repo], snaps[repo])
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return snaps


def test_hub_id_subfolder_and_derived_base_ids(tiny_dirs, tmp_path, monkeypatch):
    enc, dec = tiny_dirs
    snaps = fake_hub(monkeypatch, tmp_path / "hub", {HUB_REPO: None, "Qwen/Qwen3-Embedding-0.6B": enc,
                                                      "Qwen/Qwen3-0.6B": dec})
    w = write_authors(snaps[HUB_REPO] / SUBFOLDER, enc, dec, sizes=0.25, semi=False, stored=STORED)
    comp = SemiDynamicCompressor.from_pretrained(HUB_REPO, subfolder=SUBFOLDER, device="cpu")
    assert (comp.config.encoder, comp.config.decoder) == ("Qwen/Qwen3-Embedding-0.6B", "Qwen/Qwen3-0.6B")
    check(comp, Reference(w), "hub id + subfolder, derived base ids", texts=CONTEXTS[:2])
    # an explicit override wins over the derived id
    comp = SemiDynamicCompressor.from_pretrained(HUB_REPO, subfolder=SUBFOLDER, device="cpu", decoder=str(dec))
    assert comp.config.decoder == str(dec)
    with pytest.raises(CheckpointError, match="subfolder 'static/nothing'|no config.json"):
        SemiDynamicCompressor.from_pretrained(HUB_REPO, subfolder="static/nothing", device="cpu")


def test_unresolvable_base_names_what_was_tried(tiny_dirs, tmp_path, monkeypatch):
    enc, dec = tiny_dirs
    fake_hub(monkeypatch, tmp_path / "hub", {})
    write_authors(tmp_path / "unknown", enc, dec, sizes=0.25, semi=False, stored=("/nowhere/my-encoder", str(dec)))
    with pytest.raises(CheckpointError, match=r"(?s)/nowhere/my-encoder.*encoder=PATH_OR_HUB_ID"):
        load(tmp_path / "unknown")
    assert load(tmp_path / "unknown", encoder=str(enc)).config.encoder == str(enc)
    # a derived hub id that is not available: the stored path, the id tried and the override
    write_authors(tmp_path / "uncached", enc, dec, sizes=0.25, semi=False, stored=(STORED[0], str(dec)))
    with pytest.raises(CheckpointError, match=r"(?s)Qwen3-Embedding-0.6B.*Qwen/Qwen3-Embedding-0.6B.*encoder="):
        load(tmp_path / "uncached")


def test_checkpoint_cannot_enable_remote_code(tiny_dirs, tmp_path):
    """A config asking for remote code, over a base whose auto_map points at code: nothing runs."""
    enc, dec = tiny_dirs
    base = Path(shutil.copytree(enc, tmp_path / "base"))
    marker = tmp_path / "ran"
    (base / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('remote code ran')\n")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.Evil",
                                                                      "AutoModelForCausalLM": "evil.Evil"}}))
    w = write_authors(tmp_path / "ck", str(base), dec, sizes=0.25, semi=False, enc="none")
    raw = json.loads((w.path / "config.json").read_text())
    (w.path / "config.json").write_text(json.dumps({**raw, "trust_remote_code": True}))
    comp = load(w.path)
    assert comp.config.trust_remote_code is False and not marker.exists()


def test_refused_pickle_in_projector(tiny_dirs, tmp_path):
    w = write_authors(tmp_path / "ck", *tiny_dirs, sizes=0.25, semi=False, enc="none", dec="none")
    torch.save({"up_proj.weight": torch.zeros(2, 2), "evil": print}, w.path / "projector.pth")
    with pytest.raises(CheckpointError, match=r"(?s)projector\.pth was refused.*weights_only=True"):
        load(w.path)
