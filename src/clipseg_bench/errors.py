"""The one error type for bad input from a person.

The CLI turns an :class:`InputError` into a single line ``error: <path>: <problem>`` on stderr and
exit code 2. Everything else is a bug and keeps its traceback.
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
