"""Reading the authors' checkpoints (``CtxCompModel`` and ``CtxCompSemiDynamicModel``), read only.

Their ``from_pretrained`` accepts several generations of names; this module maps every one of
them onto a :class:`CompressorConfig` whose stages compute what their code computes:

* kind: ``feature_extract_method`` (alias ``compress_method``; ``mean_pooling_by_ratio`` =
  ``mean_pooling``); ``mean_pooling`` is the only bidirectional one;
* semi-dynamic (a density head: ``discretize_*`` keys, or ``compress_ratio_head`` in
  ``projector.pth``): mean pooling over the context plus its eos, start-aligned true means
  (their inference path); static and multi-ratio: end-aligned, left zero padding, divided by
  the window (their fixed-pool path); both pool the eos their eval appends;
* ``comp_ratio_or_len`` (alias ``num_doc_tokens``): ratios in (0, 1] (factor = round(1/r)),
  a single one for static models, a list for multi-ratio and semi-dynamic ones; ints for the
  token methods;
* weights: ``encoder/`` or ``embed_model/``, ``decoder/`` or ``gen_model/`` (PEFT adapters or
  full weights); ``projector.pth`` nested, flat or ``projector.``-prefixed;
  ``memory_token_embedding.pth`` (``{"indices", "weight"}``) for the memory-token methods;
* base models: the caller's override, the stored path when it exists here, else a hub id
  derived from the stored folder name (``/share/models/Qwen3-0.6B`` -> ``Qwen/Qwen3-0.6B``).

A shared-base checkpoint (one base, LoRA on both sides) is laid out like any other and is
read as two model instances, as the authors' own evaluation does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import CompressorConfig
from .errors import CheckpointError, load_state, torch_load_tensors

_METHODS = {  # feature_extract_method -> (backbone, bidirectional encoder)
    "mean_pooling": ("mean_pool", True),
    "mean_pooling_by_ratio": ("mean_pool", True),
    "mean_pooling_causal": ("mean_pool", False),
    "mean_pooling_by_ratio_causal": ("mean_pool", False),
    "last_tokens": ("last_tokens", False),
    "same_memory_tokens": ("compression_tokens", False),
    "different_memory_tokens": ("compression_tokens", False),
}
_TRAINING = {"lora": "lora", "none": "frozen", "frozen": "frozen", "full": "full"}
_FOLDERS = {"encoder": ("encoder", "embed_model"), "decoder": ("decoder", "gen_model")}
# Hub organisations of base models whose folder names the authors' configs keep.
_HUB_ORGS = {"Qwen": "Qwen", "SmolLM": "HuggingFaceTB", "Llama": "meta-llama", "gemma": "google", "Mistral": "mistralai"}


def is_authors(raw: dict) -> bool:
    return "comp_ratio_or_len" in raw or "num_doc_tokens" in raw


def _get(raw: dict, key: str, alias: str | None, default=None):
    return raw.get(key, raw.get(alias, default) if alias else default)


def weights_folder(path: Path, side: str) -> Path:
    """``encoder/`` (or the older ``embed_model/``), ``decoder/`` (or ``gen_model/``)."""
    new, old = _FOLDERS[side]
    return path / old if not (path / new).is_dir() and (path / old).is_dir() else path / new


def hub_id_for(stored: str) -> str | None:
    """The hub id a stored local base path most likely names (None when no organisation is known)."""
    name = Path(stored).name
    org = next((o for prefix, o in _HUB_ORGS.items() if name.lower().startswith(prefix.lower())), None)
    return f"{org}/{name}" if org else None


def resolve_base(stored: str | None, override: str | None, side: str) -> str:
    """Which base model to load for ``side``: override, stored path that exists, derived hub id.

    Raises CheckpointError naming what was tried and the override to pass.
    """
    if override:
        return override
    if stored and Path(stored).expanduser().exists():
        return stored
    derived = hub_id_for(stored) if stored else None
    if derived:
        return derived
    raise CheckpointError(
        f"the checkpoint's base {side} {stored!r} is not a folder here and names no known hub model; "
        f"pass {side}=PATH_OR_HUB_ID" if stored else f"the checkpoint names no base {side}; pass {side}=PATH_OR_HUB_ID")


def _check_hub_base(hub_id: str, stored: str, side: str) -> None:
    """Raise CheckpointError, naming what was tried, when a derived hub id cannot be fetched."""
    from transformers.utils import cached_file

    try:
        cached_file(hub_id, "config.json")
    except OSError as e:
        raise CheckpointError(
            f"the checkpoint's base {side} {stored!r} is not a folder here, and the hub id derived from it, "
            f"{hub_id!r}, cannot be loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"pass {side}=PATH_OR_HUB_ID") from None


def _projector_state(path: Path) -> tuple[dict, dict | None]:
    """(projector tensors, density-head tensors or None) from ``projector.pth`` in any of its formats."""
    state = torch_load_tensors(path / "projector.pth")
    head = state.get("compress_ratio_head") if isinstance(state.get("compress_ratio_head"), dict) else None
    if isinstance(state.get("projector"), dict):
        proj = state["projector"]
    elif any(k.startswith("projector.") for k in state):
        proj = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    else:
        proj = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if "up_proj.weight" not in proj:
        raise CheckpointError(f"{path / 'projector.pth'} holds no projector weights (no up_proj.weight)")
    return proj, head


def authors_config(path: Path, raw: dict, overrides: dict) -> CompressorConfig:
    """The CompressorConfig that computes what the authors' checkpoint at ``path`` computes."""
    cfg_file = path / "config.json"
    method = _get(raw, "feature_extract_method", "compress_method", "last_tokens")
    if method not in _METHODS:
        raise CheckpointError(f"unknown feature_extract_method {method!r} in {cfg_file}; known: {', '.join(_METHODS)}")
    backbone, bidirectional = _METHODS[method]
    try:
        enc_mode = _TRAINING[_get(raw, "encoder_training", "emb_model_training", "none")]
        dec_mode = _TRAINING[_get(raw, "decoder_training", "gen_model_training", "none")]
    except KeyError as e:
        raise CheckpointError(f"unsupported training mode {e} in {cfg_file}") from None
    if "placeholder_token_id" not in raw:
        raise CheckpointError(f"{cfg_file} has no placeholder_token_id")
    proj, head = _projector_state(path)
    semi_dynamic = head is not None or "discretize_ratio_mode" in raw or "discretize_compare_in_log" in raw
    sizes = _get(raw, "comp_ratio_or_len", "num_doc_tokens", 1)
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    try:
        if backbone == "mean_pool":
            if any(not 0 < float(r) <= 1 for r in sizes):
                raise ValueError("ratios must lie in (0, 1]")
            size_fields = {"factors": tuple(max(1, round(1 / float(r))) for r in sizes)}
        else:
            size_fields = {"lengths": tuple(int(m) for m in sizes)}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad comp_ratio_or_len {sizes!r} in {cfg_file} for {method}: {e}") from None
    fields = dict(
        backbone=backbone, bidirectional=bidirectional, **size_fields,
        pool_end_marker=True, pool_align="start" if semi_dynamic else "end",
        density_head=semi_dynamic, length_rule="authors",
        rounding=raw.get("discretize_ratio_mode", "round"),
        compare_space="log" if raw.get("discretize_compare_in_log") else "linear",
        projector_hidden_size=int(_get(raw, "mlp_converter_hidden_dim", "mlp_hidden_dim",
                                       proj["up_proj.weight"].shape[0])),
        projector_gated="gate_proj.weight" in proj,
        encoder_training=enc_mode, decoder_training=dec_mode,
        max_context_tokens=max(2048, int(raw.get("max_context_tokens", 0) or 0)),
    )
    for side, key, alias in (("encoder", "base_encoder_model_path", "base_embed_model_path"),
                             ("decoder", "base_decoder_model_path", "base_gen_model_path")):
        stored = _get(raw, key, alias)
        fields[side] = resolve_base(stored, overrides.get(side), side)
        if fields[side] not in (stored, overrides.get(side)):  # a hub id guessed from the folder name
            _check_hub_base(fields[side], stored, side)
    fields.update({k: v for k, v in overrides.items() if k not in ("encoder", "decoder")})
    if "placeholder_token" not in overrides:
        from ..loading import load_tokenizer

        dec_tok = load_tokenizer(fields["decoder"], fields.get("decoder_gguf_file"))
        fields["placeholder_token"] = dec_tok.convert_ids_to_tokens(int(raw["placeholder_token_id"]))
    try:
        return CompressorConfig.model_validate(fields)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} describes a compressor this package cannot build: {e}") from None


def load_authors_weights(comp, path: Path, raw: dict) -> None:
    """Projector, density head and memory embeddings of an authors' checkpoint, into ``comp``."""
    proj, head = _projector_state(path)
    load_state(comp.projector, proj, f"{path / 'projector.pth'} (projector)")
    if head is not None:
        load_state(comp.density_head, head, f"{path / 'projector.pth'} (compress_ratio_head)")
    method = _get(raw, "feature_extract_method", "compress_method", "last_tokens")
    if not comp.pooling.has_weights:
        return
    begin = int(raw.get("memory_token_begin_id", 151000))
    n = comp.pooling.max_len
    ids = list(range(begin, begin + n)) if method == "different_memory_tokens" else [begin]
    table = comp.encoder.input_embeddings().weight.detach()
    rows = {i: table[i] for i in ids if i < table.shape[0]}
    mem_file = path / "memory_token_embedding.pth"
    if mem_file.is_file():  # trained rows; without the file the base rows are what the authors read
        saved = torch_load_tensors(mem_file)
        if "indices" not in saved or "weight" not in saved:
            raise CheckpointError(f"{mem_file} lacks 'indices' or 'weight'")
        idx = [int(i) for i in saved["indices"]]
        rows.update({i: w for i, w in zip(idx, saved["weight"])})
        with torch.no_grad():  # their loader writes the rows into the encoder's own table: a context
            for i, w in zip(idx, saved["weight"]):  # token with one of these (ordinary) ids reads them too
                if i < table.shape[0]:
                    table[i] = w.to(table)
    missing = [i for i in ids if i not in rows]
    if missing:
        raise CheckpointError(f"memory token ids {missing[:5]} lie outside the encoder's vocabulary "
                              f"({table.shape[0]} rows) and {mem_file.name} does not hold them")
    memory = torch.stack([rows[i] for i in ids]).expand(n, -1) if len(ids) == 1 else torch.stack([rows[i] for i in ids])
    comp.pooling.memory.data.copy_(memory.to(comp.pooling.memory))
