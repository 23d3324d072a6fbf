"""Naming what failed: the step of a pass whose operator raised, and the user's own exception
unwrapped from Ray's task and Ray Data errors."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difforge.platform.plan import PlannedStep

STEP_NOTE = "difforge step: "


def _chain(exc: BaseException) -> list[BaseException]:
    """An error and what caused it, outermost first (Ray's wrappers keep theirs in `cause`)."""
    chain, inner = [exc], exc
    for _ in range(8):
        context = None if inner.__suppress_context__ else inner.__context__  # `from None`
        nxt = getattr(inner, "cause", None) or inner.__cause__ or context
        if nxt is None or nxt is inner:
            break
        chain.append(nxt)
        inner = nxt
    return chain


def failed_step(exc: BaseException, group: list[PlannedStep]) -> PlannedStep:
    """The step of a pass whose operator raised (named in a note on the worker's error)."""
    text = "\n".join(str(e) + "\n" + "\n".join(getattr(e, "__notes__", [])) for e in _chain(exc))
    named = re.findall(re.escape(STEP_NOTE) + r"(\S+)", text)
    return next((s for s in group if named and s.id == named[-1]), group[0])


def cause(exc: BaseException) -> str:
    """The user-facing cause of a failure, unwrapped from Ray's task and Ray Data errors.

    A Ray task error carries the remote traceback in its text; the user's own exception is
    its last "SomeError: message" line that is not one of Ray's wrappers.
    """
    chain = _chain(exc)
    inner = chain[-1]
    found = []
    for e in chain:
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith("ray."):
                continue
            # an exception line: SomeError: ..., or one of difforge's own (DatasetNotCommitted)
            if re.match(r"^([\w.]+(Error|Exception)\b[^:]*|difforge\.[\w.]+):", line):
                found.append(line)
    if found:
        return found[-1]
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[-1]}" if lines else type(inner).__name__
