"""The evaluation's one error type, in its own module so every stage of a run can raise it.

Planning contexts, opening the result log and the top-level run all refuse a run that cannot
go ahead as configured; the CLI prints such an error without a traceback.
"""


class EvalError(ValueError):
    """The run cannot go ahead as configured (the message says what to change)."""
