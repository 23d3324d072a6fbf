"""The operator registry: the built-in list plus the `difforge.operators` entry-point group.

Registration is explicit; a duplicate name is an error, never a silent overwrite.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from difforge.platform.errors import DifforgeError
from difforge.platform.operator import JobOperator, MapOperator, Operator, SourceOperator

ENTRY_POINT_GROUP = "difforge.operators"

_registry: dict[str, type[Operator]] | None = None


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


def register(op: type[Operator], origin: str = "register()") -> type[Operator]:
    """Add an operator (usable as a class decorator). A name already taken is an error."""
    reg = registry()
    op = _check(op, origin)
    if op.name in reg and reg[op.name] is not op:
        raise DifforgeError(
            f"{origin}: operator name '{op.name}' is already registered by "
            f"{reg[op.name].__module__}.{reg[op.name].__qualname__}"
        )
    reg[op.name] = op
    return op


def unregister(name: str) -> None:
    registry().pop(name, None)


def registry() -> dict[str, type[Operator]]:
    global _registry
    if _registry is None:
        from difforge.operators import BUILTIN

        _registry = {}
        for op in BUILTIN:
            _check(op, "difforge.operators.BUILTIN")
            if op.name in _registry:
                raise DifforgeError(f"duplicate built-in operator name '{op.name}'")
            _registry[op.name] = op
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            origin = f"entry point '{ep.name} = {ep.value}' ({ENTRY_POINT_GROUP})"
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken plugin is the plugin's problem; say which
                raise DifforgeError(f"{origin} failed to load: {exc}") from exc
            register(loaded, origin)
    return _registry


def get(name: str) -> type[Operator]:
    reg = registry()
    if name in reg:
        return reg[name]
    raise DifforgeError(unknown_message(name))


def unknown_message(name: str) -> str:
    known = sorted(registry())
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown operator '{name}'.{hint} Known operators: {', '.join(known)}"
