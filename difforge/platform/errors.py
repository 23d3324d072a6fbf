"""Errors a user can act on. The CLI prints these without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class DifforgeError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pipeline spec, located as precisely as we can."""

    message: str
    file: str | None = None
    line: int | None = None
    step: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        step = f"step '{self.step}': " if self.step else ""
        field = f"{self.field}: " if self.field else ""
        return f"{where}{step}{field}{self.message}"


class SpecError(DifforgeError):
    """A pipeline spec that cannot run; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the pipeline spec:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in problems)]))


class DatasetNotCommitted(DifforgeError):
    """A dataset folder without its manifest: it does not exist, whatever files are there."""


class ResourceError(DifforgeError):
    """A resource request that the cluster can never meet."""


class StepFailed(DifforgeError):
    """A step raised; the message names the step and the cause."""
