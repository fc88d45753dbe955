"""Text-pruning peers: what a RAG developer could plug in instead of soft compression.

Each peer shortens every context to about 1/F of its decoder tokens; the decoder (base,
adapters off) then reads the shortened text in the same prompt as the uncompressed baseline.

* ``truncate_x{F}``: the first n/F tokens of each context (the zero-cost floor);
* ``sentence_optimizer_x{F}``: LlamaIndex's ``SentenceEmbeddingOptimizer`` with MiniLM sentence
  embeddings (keeps the sentences closest to the question). Its ``percentile_cutoff`` is
  chosen per context so that the kept sentences come closest to n/F tokens; the neighbour
  sentences it adds by default are off, since they would double the kept text;
* ``longllmlingua_x{F}``: ``llmlingua.PromptCompressor`` in LongLLMLingua mode (question-aware
  contrastive perplexity) with a local causal LM as scorer, target n/F scorer tokens.

Nothing is downloaded at run time: ``offline_text_tools`` points tiktoken and nltk at the
files llama-index-core ships (cl100k_base, punkt_tab). The query-time cost of a peer
(``compress_s``) is the pruning itself, timed per question.
"""

from __future__ import annotations

import contextlib
import os
import time
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

from .systems import ContextItem, Prepared, System, _n_tokens, text_prompt

PEER_FAMILIES = ("truncate", "sentence_optimizer", "longllmlingua")
_CL100K = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"  # tiktoken's cache name for cl100k_base


def _llama_static() -> Path:
    try:
        import llama_index.core as core
    except ImportError as e:
        raise ImportError("the text-pruning peers need llama-index-core (pip install 'semidyn-rag[peers]')") from e
    return Path(core.__file__).parent / "_static"


@contextlib.contextmanager
def offline_text_tools() -> Iterator[None]:
    """tiktoken reads cl100k_base, and nltk punkt_tab, from llama-index-core's shipped copies.

    ``PromptCompressor`` calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")`` when built,
    which downloads cl100k_base unless it is in ``TIKTOKEN_CACHE_DIR``; the variable is set for
    the duration of the block. Raises RuntimeError when the shipped files are missing.
    """
    static = _llama_static()
    tiktoken_dir, nltk_dir = static / "tiktoken_cache", static / "nltk_cache"
    if not (tiktoken_dir / _CL100K).is_file() or not (nltk_dir / "tokenizers" / "punkt_tab").is_dir():
        raise RuntimeError(f"{static} lacks the cl100k_base or punkt_tab files the peers need offline; "
                           "reinstall llama-index-core")
    import nltk

    if str(nltk_dir) not in nltk.data.path:
        nltk.data.path.append(str(nltk_dir))
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_dir)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = before


class PrunedText(System):
    """A peer: each context pruned to about 1/factor of its tokens, read as text."""

    baseline = True

    def __init__(self, factor: int):
        if int(factor) < 1:
            raise ValueError(f"a pruning factor must be >= 1, got {factor}")
        super().__init__(f"{self.family}_x{int(factor)}", float(factor))
        self.factor = int(factor)

    @abstractmethod
    def prune(self, comp, question: str, text: str) -> str:
        """The kept part of ``text`` (about 1/factor of its decoder tokens)."""

    def replayed_s(self) -> float:
        """Seconds of work served from a memo so far, charged as if it had run again."""
        return 0.0

    def prepare(self, comp, question: str, contexts: Sequence[ContextItem]) -> Prepared:
        t0, replayed = time.perf_counter(), self.replayed_s()
        short = [self.prune(comp, question, c.text) for c in contexts]
        seconds = time.perf_counter() - t0 + self.replayed_s() - replayed
        short = [s if s.strip() else truncate_tokens(comp, c.text, 1) for s, c in zip(short, contexts)]
        ids = comp.decoder.encode_prompts([text_prompt(comp, question, short)])[0]
        return Prepared(ids, [], [_n_tokens(comp, c.text) for c in contexts],
                        [max(1, _n_tokens(comp, s)) for s in short], [None] * len(contexts), seconds, texts=short)


def truncate_tokens(comp, text: str, keep: int) -> str:
    """The text of the first ``keep`` decoder tokens of ``text``."""
    ids = comp.decoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    return comp.decoder.tokenizer.decode(ids[: max(1, keep)], skip_special_tokens=True)


class TruncateText(PrunedText):
    family = "truncate"

    def prune(self, comp, question, text):
        n = len(comp.decoder.tokenizer(text, add_special_tokens=False)["input_ids"])
        return truncate_tokens(comp, text, round(n / self.factor))


class SentenceOptimizerText(PrunedText):
    """LlamaIndex's ``SentenceEmbeddingOptimizer``, its cutoff fitted to n/F tokens per context.

    Kept text grows with the number of sentences kept, so the cutoffs are tried from one
    sentence up and the first count at or over the target (or the one before it, if closer)
    is taken; each sentence is embedded once per question (the embedder caches them).
    """

    family = "sentence_optimizer"

    def __init__(self, factor: int, embed_model):
        super().__init__(factor)
        self.embed_model = embed_model

    def prune(self, comp, question, text):
        from llama_index.core.postprocessor import SentenceEmbeddingOptimizer
        from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

        self.embed_model.clear()
        target = _n_tokens(comp, text) / self.factor
        query = QueryBundle(question)  # the optimizer embeds it once and keeps it there
        opt = SentenceEmbeddingOptimizer(embed_model=self.embed_model, percentile_cutoff=1.0,
                                         context_before=0, context_after=0)
        n_sent = len(opt._tokenizer_fn(text))  # the optimizer's own sentence splitter
        best: tuple[float, str] | None = None
        for k in range(1, n_sent + 1):
            opt.percentile_cutoff = (k + 0.5) / n_sent  # int(n_sent * cutoff) == k sentences
            kept = opt.postprocess_nodes([NodeWithScore(node=TextNode(text=text))], query_bundle=query)
            out = kept[0].node.get_content()
            n = _n_tokens(comp, out)
            if best is None or abs(n - target) < best[0]:
                best = (abs(n - target), out)
            if n >= target:
                break
        return best[1]


class LongLLMLinguaText(PrunedText):
    """``PromptCompressor.compress_prompt`` in LongLLMLingua mode, one context at a time.

    Its scorer passes depend on the question and the context, not on the factor; with a
    ``ScorerMemo`` on the compressor, the systems at other factors reuse them and are charged
    the time they took when they ran (the cost a user running that one factor would pay).
    """

    family = "longllmlingua"

    def __init__(self, factor: int, lingua):
        super().__init__(factor)
        self.lingua = lingua

    def replayed_s(self) -> float:
        memo = self.lingua.get_ppl
        return memo.replayed_s if isinstance(memo, ScorerMemo) else 0.0

    def prune(self, comp, question, text):
        n = self.lingua.get_token_length(text, add_special_tokens=False)
        out = self.lingua.compress_prompt([text], question=question, target_token=max(1.0, n / self.factor),
                                          **longllmlingua_kwargs(self.lingua, question, [text]))
        return out["compressed_prompt"]


def longllmlingua_kwargs(lingua, question: str, texts: Sequence[str]) -> dict:
    """LongLLMLingua's question-aware settings, with one compression window over all of ``texts``.

    llmlingua 0.2.2 scores in windows of ``iterative_size`` (200) tokens: the last, partial
    window is never compressed, a context shorter than one window is compressed in the wrong
    place, and later windows index the KV cache as tuples (transformers 5 returns a Cache
    object). One window the exact length of the contexts avoids all three; it is scored in a
    single forward pass per condition, which is all a context of a few hundred tokens needs.
    """
    joined = "\n\n".join([question, *texts])
    total = lingua.get_token_length(joined, add_special_tokens=False)
    start = lingua.get_prefix_length(question + "\n\n", texts[0])
    return {"rank_method": "longllmlingua", "condition_in_question": "after_condition", "condition_compare": True,
            "concate_question": False, "iterative_size": max(1, total - start)}


class ScorerMemo:
    """Stands in for ``PromptCompressor.get_ppl``: remembers each first-window perplexity pass
    (the only kind a single-window call makes) with the seconds it took, and counts the
    seconds of every repeat it serves (``replayed_s``). The KV cache is not kept: the caller
    discards the first window's anyway. Other passes go to the scorer unchanged."""

    def __init__(self, lingua):
        self.scorer = lingua.get_ppl
        self.memo: dict = {}
        self.replayed_s = 0.0
        lingua.get_ppl = self

    def __call__(self, text, granularity="sentence", input_ids=None, attention_mask=None, past_key_values=None,
                 return_kv=False, end=None, condition_mode="none", condition_pos_id=0):
        args = (text, granularity, input_ids, attention_mask, past_key_values, return_kv, end, condition_mode,
                condition_pos_id)
        if input_ids is None or past_key_values is not None:
            return self.scorer(*args)
        key = (granularity, input_ids.cpu().numpy().tobytes(), attention_mask.cpu().numpy().tobytes(), end,
               condition_mode, condition_pos_id)
        hit = self.memo.get(key)
        if hit is None:
            t0 = time.perf_counter()
            out = self.scorer(*args)
            hit = self.memo[key] = ((out[0] if return_kv else out).detach(), time.perf_counter() - t0)
        else:
            self.replayed_s += hit[1]
        loss = hit[0].clone()
        return (loss, None) if return_kv else loss


def load_prompt_compressor(model: str, device: str = "cpu"):
    """An ``llmlingua.PromptCompressor`` scoring with the local causal LM ``model`` (no remote code).

    Raises ImportError when llmlingua is not installed, OSError when ``model`` cannot be loaded.
    """
    with offline_text_tools():
        from llmlingua import PromptCompressor

        return PromptCompressor(model_name=str(model), device_map=str(device), model_config={"trust_remote_code": False})


def default_scorer(comp) -> str:
    """The decoder's own base model: the LongLLMLingua scorer when none is given."""
    from ..loading import resolve_name

    return resolve_name(comp.config.decoder)


def make_embedding(name: str | None = None):
    """A llama-index ``BaseEmbedding`` over semidyn-rag's ``Embedder`` (MiniLM by default) that
    caches the vectors of one question's sentences (``clear()`` empties it). Raises ImportError
    without llama-index-core, OSError when the embedder cannot be loaded."""
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import PrivateAttr

    from ..corpus.embedding import DEFAULT_EMBEDDER, Embedder

    class _Cached(BaseEmbedding):
        _embedder: Embedder = PrivateAttr()
        _cache: dict = PrivateAttr(default_factory=dict)

        def clear(self) -> None:
            self._cache.clear()

        def _vectors(self, texts: list[str]) -> list[list[float]]:
            todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if todo:
                for t, v in zip(todo, self._embedder.embed(todo)):
                    self._cache[t] = v.tolist()
            return [self._cache[t] for t in texts]

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._vectors([query])[0]

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._vectors([text])[0]

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._vectors(list(texts))

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

    name = name or DEFAULT_EMBEDDER
    emb = _Cached(model_name=name)
    emb._embedder = Embedder(name)
    emb._embedder.model  # load now: a load is not a query-time cost
    with offline_text_tools():
        from llama_index.core.utils import globals_helper

        globals_helper.punkt_tokenizer  # the optimizer's sentence splitter, from the shipped punkt_tab
    return emb


def build_peers(comp, families: Sequence[str], factors: Sequence[int], *, scorer: str | None = None,
                device: str | None = None) -> list[System]:
    """The peer systems of ``families`` at each factor, in ``PEER_FAMILIES`` order.

    The sentence optimizer needs llama-index-core and the MiniLM embedder; LongLLMLingua needs
    llmlingua and its scorer (``scorer`` path, else the decoder's own base model). Peers run
    only when asked for, so one that cannot load raises EvalError saying why.
    """
    from .errors import EvalError

    systems: list[System] = []
    if "truncate" in families:
        systems += [TruncateText(f) for f in factors]
    if "sentence_optimizer" in families:
        try:
            emb = make_embedding()
        except (ImportError, OSError, RuntimeError) as e:
            raise EvalError(f"sentence_optimizer cannot run: {type(e).__name__}: {e}") from e
        systems += [SentenceOptimizerText(f, emb) for f in factors]
    if "longllmlingua" in families:
        where = scorer or default_scorer(comp)
        try:
            lingua = load_prompt_compressor(where, device or str(comp.device))
        except (ImportError, OSError, RuntimeError, ValueError) as e:
            raise EvalError(f"longllmlingua cannot run with scorer {where}: {type(e).__name__}: {e}") from e
        ScorerMemo(lingua)  # the factors share the scorer passes of each question
        systems += [LongLLMLinguaText(f, lingua) for f in factors]
    return systems
