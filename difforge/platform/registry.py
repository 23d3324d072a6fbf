"""The operator registry: the `difforge.operators` entry-point group, built-ins included.

Built-in operators are declared in difforge's own `pyproject.toml` exactly as plugins declare
theirs; each is imported only when a spec names it (`get`), so validating a spec imports just
the operators it uses. An entry point's key is the operator's name: a class whose `name`
differs, or two distributions declaring one name, are errors that say who declared what.
`register` adds an operator in-process (tests, notebooks); a name already taken is an error,
never a silent overwrite.
"""

from __future__ import annotations

import difflib
from importlib.metadata import EntryPoint, entry_points

from difforge.platform.errors import DifforgeError
from difforge.platform.operator import JobOperator, MapOperator, Operator, SourceOperator

ENTRY_POINT_GROUP = "difforge.operators"

_loaded: dict[str, type[Operator]] = {}
_declared: dict[str, EntryPoint] | None = None


def _check(op: object, origin: str) -> type[Operator]:
    if not (isinstance(op, type) and issubclass(op, (SourceOperator, MapOperator, JobOperator))):
        raise DifforgeError(
            f"{origin}: {op!r} is not a SourceOperator, MapOperator or JobOperator subclass"
        )
    name = getattr(op, "name", None)
    if not isinstance(name, str) or not name or " " in name:
        raise DifforgeError(f"{origin}: operator {op.__name__} has no valid `name`")
    if op.Params.model_config.get("extra") != "forbid":
        raise DifforgeError(
            f"{origin}: operator '{name}' Params must set model_config extra='forbid', "
            "so that a typo in YAML is an error"
        )
    return op


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    who = f"{dist.name} " if dist is not None else ""
    return f"{who}entry point '{ep.name} = {ep.value}' ({ENTRY_POINT_GROUP})"


def declared() -> dict[str, EntryPoint]:
    """Every operator name the installed distributions declare, read from their metadata
    (nothing is imported)."""
    global _declared
    if _declared is None:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in found and found[ep.name].value != ep.value:
                first, second = sorted([_origin(found[ep.name]), _origin(ep)])
                raise DifforgeError(
                    f"operator name '{ep.name}' is declared twice: by {first} and by {second}"
                )
            found[ep.name] = ep
        if not any(ep.value.startswith("difforge.operators.") for ep in found.values()):
            raise DifforgeError(
                "difforge's built-in operators are not declared: difforge is not installed "
                "(pip install -e . in its checkout)"
            )
        _declared = found
    return _declared


def _load(name: str, ep: EntryPoint) -> type[Operator]:
    origin = _origin(ep)
    try:
        loaded = ep.load()
    except Exception as exc:  # a broken plugin is the plugin's problem; say which
        raise DifforgeError(f"{origin} failed to load: {exc}") from exc
    op = _check(loaded, origin)
    if op.name != name:
        raise DifforgeError(
            f"{origin}: loads operator '{op.name}', not '{name}'; the entry point's name must "
            "be the operator's name"
        )
    return op


def find(name: str) -> type[Operator] | None:
    """The operator called `name`, imported on first use; None if nobody declares it."""
    if name in _loaded:
        return _loaded[name]
    ep = declared().get(name)
    if ep is None:
        return None
    _loaded[name] = _load(name, ep)
    return _loaded[name]


def get(name: str) -> type[Operator]:
    op = find(name)
    if op is None:
        raise DifforgeError(unknown_message(name))
    return op


def names() -> list[str]:
    """Every known operator name, sorted (nothing is imported)."""
    return sorted(set(declared()) | set(_loaded))


def registry() -> dict[str, type[Operator]]:
    """Every operator, imported (for `difforge ops`)."""
    return {name: get(name) for name in names()}


def register(op: type[Operator], origin: str = "register()") -> type[Operator]:
    """Add an operator in-process (usable as a class decorator). A taken name is an error."""
    op = _check(op, origin)
    taken = _loaded.get(op.name)
    if taken is None and op.name in declared():
        taken = find(op.name)
    if taken is not None and taken is not op:
        raise DifforgeError(
            f"{origin}: operator name '{op.name}' is already registered by "
            f"{taken.__module__}.{taken.__qualname__}"
        )
    _loaded[op.name] = op
    return op


def unregister(name: str) -> None:
    if name not in declared():
        _loaded.pop(name, None)


def unknown_message(name: str) -> str:
    known = names()
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown operator '{name}'.{hint} Known operators: {', '.join(known)}"
