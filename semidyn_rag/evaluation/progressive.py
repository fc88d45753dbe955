"""Eval systems for progressive reading, each at a latent budget matched to flat reading.

The budget of a question is what flat reading of its top ``budget_k`` retrieved chunks at
factor F spends (``b{n}x{F}`` in the names), so every system below is compared at equal latent
budgets, question by question. Run them in the rag setting with ``--k`` above ``budget_k``
(e.g. ``--k 20 --budget-k 5``):

* ``progressive_flat_top{n}_x{F}``: the top n chunks at factor F (the budget's reference);
* ``progressive_flat_all_b{n}x{F}``: every retrieved chunk at the finest factor that fits
  the budget (the least relevant dropped when even the coarsest does not fit);
* ``progressive_{signal}_b{n}x{F}``: coarse scan, relevance by ``signal`` (retriever,
  attention, likelihood), fine re-reads of the relevant chunks within the budget.

Each answer's ``extra`` (in ``samples.jsonl``) keeps the budget, the positions used, the scan's
positions and time, and per chunk ``[index, factor (1 = text, 0 = dropped), expanded]``; the
scan's time is part of ``compress_s`` and so of the time to first token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..progressive import ProgressiveReader, ReadPlan
from .systems import ContextItem, Prepared, System, _sync

PROGRESSIVE_FAMILIES = ("progressive_flat", "progressive_retriever", "progressive_attention",
                        "progressive_likelihood")


def question_budget(comp, contexts: Sequence[ContextItem], n: int, factor: int) -> int:
    """Latents flat reading of the first ``n`` contexts at ``factor`` takes (the matched budget)."""
    return sum(comp.pooling.n_latents(c.features.n_tokens, factor) for c in contexts[:n])


class _BudgetSystem(System):
    needs_features = True
    baseline = False

    def __init__(self, name: str, factor: int, budget_k: int):
        super().__init__(name, float(factor))
        self.factor, self.budget_k = int(factor), int(budget_k)

    def _plan(self, comp, question: str, contexts: Sequence[ContextItem], budget: int) -> tuple[ReadPlan, list]:
        raise NotImplementedError

    def prepare(self, comp, question, contexts):
        for i, c in enumerate(contexts):
            if c.features is None:
                raise ValueError(f"{self.name}: context {i} has no encoder features")
        budget = question_budget(comp, contexts, self.budget_k, self.factor)
        _sync(comp)
        t0 = time.perf_counter()
        plan, items = self._plan(comp, question, contexts, budget)
        reader = self._reader(comp)
        ids, latents = reader.inputs(question, plan, [c.features for c in items], [c.text for c in items])
        _sync(comp)
        seconds = time.perf_counter() - t0
        read = plan.read_chunks
        return Prepared(
            ids, [c.latents for c in latents], [c.n_tokens for c in read], [c.positions for c in read],
            [c.factor for c in read], compress_s=seconds + sum(c.encode_s for c in items),
            extra={"budget": budget, "used": plan.used, "scan_positions": plan.scan_positions,
                   "scan_s": round(plan.scan_s, 6), "signal": plan.signal,
                   "reads": [[c.index, 0 if c.read == "dropped" else c.factor, int(c.expanded)] for c in plan.chunks]},
        )

    def _reader(self, comp) -> ProgressiveReader:
        return ProgressiveReader(comp)


class FlatTop(_BudgetSystem):
    """The top ``budget_k`` contexts at the budget's factor: the reference every budget is matched to."""

    family = "progressive_flat"

    def __init__(self, factor: int, budget_k: int):
        super().__init__(f"progressive_flat_top{budget_k}_x{factor}", factor, budget_k)

    def _reader(self, comp):
        return ProgressiveReader(comp, coarse=self.factor, fine=self.factor, allow_text=False)

    def _plan(self, comp, question, contexts, budget):
        items = list(contexts[: self.budget_k])
        return self._reader(comp).flat_plan([c.features for c in items], max_latents=budget), items


class FlatAll(_BudgetSystem):
    """Every retrieved context at the finest factor that fits the budget."""

    family = "progressive_flat"

    def __init__(self, factor: int, budget_k: int):
        super().__init__(f"progressive_flat_all_b{budget_k}x{factor}", factor, budget_k)

    def _plan(self, comp, question, contexts, budget):
        return ProgressiveReader(comp).flat_plan([c.features for c in contexts], max_latents=budget), list(contexts)


class Progressive(_BudgetSystem):
    """Coarse scan, relevance by ``signal``, fine re-reads of the relevant contexts."""

    def __init__(self, signal: str, factor: int, budget_k: int):
        super().__init__(f"progressive_{signal}_b{budget_k}x{factor}", factor, budget_k)
        self.signal = signal
        self.family = f"progressive_{signal}"

    def _reader(self, comp):
        return ProgressiveReader(comp, signal=self.signal)

    def _plan(self, comp, question, contexts, budget):
        plan = self._reader(comp).plan(question, [c.features for c in contexts], max_latents=budget,
                                       texts=[c.text for c in contexts])
        return plan, list(contexts)


def build_progressive(comp, families: Sequence[str], factors: Sequence[int], budget_k: int = 5) -> list[System]:
    """The progressive systems of ``families``, one per factor F (budget: top ``budget_k`` at F).

    Raises ValueError for a pooling stage that takes latent counts (budgets are set by factors).
    """
    if not families:
        return []
    if comp.pooling.takes != "factor":
        raise ValueError("progressive systems match budgets by factor: they need a mean-pooling compressor")
    if budget_k < 1:
        raise ValueError(f"budget_k must be positive, got {budget_k}")
    out: list[System] = []
    for fam in families:
        if fam == "progressive_flat":
            out += [FlatTop(f, budget_k) for f in factors] + [FlatAll(f, budget_k) for f in factors]
        elif fam in PROGRESSIVE_FAMILIES:
            out += [Progressive(fam.removeprefix("progressive_"), f, budget_k) for f in factors]
    return out
