"""The error types a person sees as one line: bad input, a command whose own work failed, and the
gradient audit's.

The CLI turns any :class:`ReportedError` into a single line ``error: <path>: <problem>`` on stderr and
its exit code: 2 for an :class:`InputError` (bad input), 1 for a :class:`RunFailed` (e.g. a benchmark
run that crashed, or a :class:`GradientAuditError`). A :class:`FieldError` names a field below the
CLI; the CLI replaces it with the flag the value came from.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class ReportedError(Exception):
    """An error the CLI reports as one line naming a file, folder or flag, with :attr:`exit_code`.

    Args:
        path: the file, folder or option at fault (``None`` when there is none to name).
        problem: what is wrong with it, in one line.
    """

    exit_code = 1

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class InputError(ReportedError):
    """Bad input: a file, folder, option or value a user gave us that we cannot use (exit code 2)."""

    exit_code = 2


class FieldError(InputError):
    """Bad input in a named field: a config field or a command's argument (``threshold``, ``organs``,
    ``strategy_options``). The code below the CLI names the field; the CLI names the flag the value
    came from (its one field -> flag table), e.g. ``error: --threshold: must be between 0 and 1``.

    Args:
        field: the field's name (a :class:`~clipseg_bench.config.TrainConfig` field or a function
            argument; a nested field as ``field.sub``).
        problem: what is wrong with its value, in one line.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field = field

    def naming(self, name: str) -> FieldError:
        """The same error naming ``name`` (a flag) instead of the field."""
        renamed = FieldError(self.field, self.problem)
        renamed.path = name
        return renamed


class RunFailed(ReportedError):
    """The input was fine but some of the work failed, e.g. a benchmark run crashed (exit code 1)."""

    exit_code = 1


class GradientAuditError(RunFailed):
    """A run trained something other than it says: a trainable tensor autograd never reached, or a
    frozen tensor that changed (:mod:`clipseg_bench.train.audit`).

    Not the user's input: the run is marked ``failed`` and the CLI prints the message on one line
    and exits with 1 (a failed run), not 2 (a bad input).
    """

    def __init__(self, problem: str):
        super().__init__(None, "gradient audit: " + str(problem))
