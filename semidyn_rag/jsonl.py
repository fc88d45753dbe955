"""Line-numbered JSONL reading shared by every loader: blank lines skipped, bad lines named.

Each loader decides what a bad line means (training records and QA datasets stop with an
error naming the file and line; corpus ingestion skips the line and counts it), so the
problem is handed to ``on_bad`` instead of raised here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def iter_json_lines(lines: Iterable[str], on_bad: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for each non-blank line (numbers count blank lines too).

    A line that is not valid JSON calls ``on_bad(line_number, problem)`` and is skipped when
    ``on_bad`` returns instead of raising.
    """
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            on_bad(lineno, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        yield lineno, value
