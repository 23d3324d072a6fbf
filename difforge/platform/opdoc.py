"""Operators described for people: `difforge ops` and the docs' operator reference."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from difforge.platform.operator import columns_by_default


def type_name(annotation: Any) -> str:
    """A parameter's type as a user writes it: `one of: a, b` for a Literal."""
    if typing.get_origin(annotation) is typing.Literal:
        return "one of: " + ", ".join(str(v) for v in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if type(None) in args and len(args) == 2:  # X | None
        return type_name(next(a for a in args if a is not type(None))) + " | None"
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def default_value(info) -> Any:
    """A field's default as a user writes it: a default factory's value, models' settings."""

    def plain(v):
        if hasattr(v, "model_dump"):
            return v.model_dump(mode="json")
        return [plain(x) for x in v] if isinstance(v, list) else v

    return plain(info.get_default(call_default_factory=True))


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model class of a field that holds one model (or None), not a list of them."""
    if typing.get_origin(annotation) in (list, tuple, set, dict):
        return None
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def columns_line(op, quote: str = "{}") -> str:
    """ "Reads: a, b; writes: c" at the operator's default params (its `columns()`)."""
    found = columns_by_default(op)
    if found is None:
        return "Reads and writes: depend on its params"
    reads, writes = found
    shown = ", ".join(quote.format(c) for c in writes) if writes else "-"
    if writes is None:
        shown = "known once it runs"
    return f"Reads: {', '.join(quote.format(c) for c in reads) or '-'}; writes: {shown}"


def param_rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every field, nested models' fields
    under their parent's name, so that choices deep in the params are visible."""
    for field, info in model.model_fields.items():
        name = prefix + field
        nested = _nested_model(info.annotation)
        if nested is not None:
            yield name, nested.__name__, "", info.description or ""
            yield from param_rows(nested, name + ".")
            continue
        default = "required" if info.is_required() else repr(default_value(info))
        yield name, type_name(info.annotation), default, info.description or ""


def reference_markdown() -> str:
    """The operator reference page: every registered operator, its params, columns, resources."""
    from difforge.platform import registry

    out = [
        "# Operator reference",
        "",
        "Generated from the operator registry by `python docs/gen_reference.py` (a test fails",
        "when this page and the code disagree). `difforge ops NAME` prints the same on a console.",
        "",
    ]
    for name in registry.names():
        op = registry.get(name)
        out += [f"## `{name}`", "", f"{op.description()}", ""]
        out += [f"Version {op.version}, a {op.kind} operator.", ""]
        rows = list(param_rows(op.Params))
        if rows:
            out += ["| param | type | default | what it does |", "| --- | --- | --- | --- |"]
            for field, kind, default, desc in rows:
                cells = [f"`{field}`", kind, f"`{default}`" if default else "", desc]
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            out.append("")
        out.append(columns_line(op, "`{}`") + ".")
        if op.side_outputs:
            out[-1] += f" Side outputs: {', '.join(f'`{s}`' for s in op.side_outputs)}."
        resources = op.resources.model_dump(exclude_none=True)
        out += ["", f"Default resources: `{resources}`.", ""]
    return "\n".join(out).rstrip() + "\n"
