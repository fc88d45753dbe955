"""Evaluation harness: the same questions answered with and without compression, side by side.

``datasets`` loads QA samples, ``retrieval`` finds chunks for the RAG setting, ``systems``
turns (question, contexts) into decoder inputs for each compared system, ``decoding`` answers
with a timed greedy decode, ``metrics`` scores answers and compression, ``runner`` ties them
into one resumable run and ``report`` writes results.json, a Markdown table and a Pareto plot.
"""

from .datasets import DatasetError, QASample, load_qa_dataset
from .metrics import (
    exact_match,
    f1_score,
    normalize_answer,
    normalize_substring,
    substring_match,
    summarize,
)
from .runner import EvalConfig, EvalOutcome, run_evaluation

__all__ = [
    "DatasetError",
    "EvalConfig",
    "EvalOutcome",
    "QASample",
    "exact_match",
    "f1_score",
    "load_qa_dataset",
    "normalize_answer",
    "normalize_substring",
    "run_evaluation",
    "substring_match",
    "summarize",
]
