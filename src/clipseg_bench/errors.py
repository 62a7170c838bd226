"""The one error type for bad input from a person, and the gradient audit's.

The CLI turns an :class:`InputError` into a single line ``error: <path>: <problem>`` on stderr and
exit code 2, a :class:`GradientAuditError` into one line and exit code 1. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: a file, folder, option or value a user gave us that we cannot use.

    Args:
        path: the file, folder or option at fault (``None`` when there is none to name).
        problem: what is wrong with it, in one line.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class GradientAuditError(RuntimeError):
    """A run trained something other than it says: a trainable tensor autograd never reached, or a
    frozen tensor that changed (:mod:`clipseg_bench.train.audit`).

    Not the user's input: the run is marked ``failed`` and the CLI prints the message on one line
    and exits with 1 (a failed run), not 2 (a bad input).
    """

    def __init__(self, problem: str):
        super().__init__("gradient audit: " + " ".join(str(problem).split()))
