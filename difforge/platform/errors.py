"""Errors a user can act on. The CLI prints these without a traceback."""

from __future__ import annotations

from dataclasses import dataclass

#: a problem's message longer than this is cut (a 10 MB param must not be echoed back whole)
MAX_MESSAGE = 500
#: at most this many problems are listed one by one
MAX_PROBLEMS = 50


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text`, cut in the middle to at most about `limit` characters."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} [... {len(text) - 2 * half:,} characters ...] {text[-half:]}"


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
        return shorten(f"{where}{step}{field}{self.message}")


class SpecError(DifforgeError):
    """A pipeline spec that cannot run; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the pipeline spec:"
        lines = [head, *(f"  - {p}" for p in problems[:MAX_PROBLEMS])]
        if n > MAX_PROBLEMS:
            lines.append(f"  ... and {n - MAX_PROBLEMS} more")
        super().__init__("\n".join(lines))


class DatasetNotCommitted(DifforgeError):
    """A dataset folder without its manifest: it does not exist, whatever files are there."""


class ResourceError(DifforgeError):
    """A resource request that the cluster can never meet."""


class StepFailed(DifforgeError):
    """A step raised; the message names the step and the cause."""
