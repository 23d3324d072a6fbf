"""The pipeline spec: YAML loaded safely, overrides applied, validated into pydantic models.

Where a pipeline runs is not part of the spec: the same file runs on a laptop and on a cluster.
Every problem is reported with the file, the line, the step and the field it concerns.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from difforge.platform.errors import Problem, SpecError
from difforge.platform.resources import Resources as Resources  # the `resources:` of a step

STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
#: names become MLflow param keys (at most 250 characters, with a prefix) and folder names
MAX_NAME = 100
#: a spec is a small document: bigger files, or aliases that expand past this many YAML nodes,
#: are refused before anything builds them in memory
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000
MAX_STEPS = 2_000
#: fsspec protocols whose data does not outlive the process (a commit there would be a lie)
NOT_PERSISTENT = ("memory",)


def _name(value: str, what: str) -> str:
    if len(value) > MAX_NAME:
        raise ValueError(
            f"{what} of {len(value)} characters ({value[:20]}...): at most {MAX_NAME}, as it "
            "names MLflow params and folders"
        )
    return value


class Tracking(BaseModel):
    """MLflow: a tracking URI (default: SQLite in DIFFORGE_HOME) and an experiment name."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite in DIFFORGE_HOME"
    )
    experiment: str | None = Field(None, description="MLflow experiment; default the pipeline name")


class StepSpec(BaseModel):
    """One step: an operator applied to earlier steps' outputs or to committed datasets."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=STEP_ID_PATTERN, description="unique within the pipeline")
    op: str = Field(description="a registered operator name; `difforge ops` lists them")

    @field_validator("id")
    @classmethod
    def _id_length(cls, v: str) -> str:
        return _name(v, "step id")

    inputs: list[str] = Field(
        default_factory=list,
        description="earlier step ids, `step.side_output`, or URIs of committed datasets",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the operator")
    resources: Resources | None = None
    min_rows: int | None = Field(
        None,
        ge=0,
        description="fail the step (nothing committed) if its main output has fewer rows; "
        "without it, an empty output is committed with a warning",
    )


class PipelineSpec(BaseModel):
    """A pipeline: a name, a storage root (local path or any fsspec URI), tracking, and steps."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STEP_ID_PATTERN)
    storage: str = Field("./difforge-data", description="local folder or fsspec URI (s3://...)")
    tracking: Tracking = Field(default_factory=Tracking)
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)
    matrix: dict[str, Any] | None = Field(
        None,
        description="a sweep: dotted paths (as for --set) to lists of values, plus optional "
        "`include` and `exclude` lists of {path: value} combinations",
    )

    @field_validator("name")
    @classmethod
    def _name_length(cls, v: str) -> str:
        return _name(v, "pipeline name")

    @field_validator("storage")
    @classmethod
    def _persistent(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("storage is empty: give a local folder or a URI (s3://bucket/prefix)")
        protocol = v.split("://", 1)[0] if "://" in v else "file"
        if protocol in NOT_PERSISTENT:
            raise ValueError(
                f"storage {v!r}: {protocol}:// does not outlive this process, so a commit there "
                "would be lost; use a local folder or a URI such as s3://bucket/prefix"
            )
        return v

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, m: dict[str, Any] | None) -> dict[str, Any] | None:
        if m is None:
            return m
        for key, values in m.items():
            if key in ("include", "exclude"):
                if not isinstance(values, list) or not all(
                    isinstance(x, dict) and x for x in values
                ):
                    raise ValueError(f"matrix.{key}: a list of {{path: value}} mappings")
            elif not isinstance(values, list) or not values:
                raise ValueError(f"matrix.{key}: a non-empty list of values")
            elif "." not in key:
                raise ValueError(f"matrix.{key}: a dotted path such as STEP.params.FIELD")
        if not any(k not in ("include", "exclude") for k in m) and not m.get("include"):
            raise ValueError("matrix: no axis and no include: nothing to sweep")
        return m


@dataclass
class LoadedSpec:
    """A validated spec plus what is needed to point back into the source text."""

    spec: PipelineSpec
    file: str | None = None
    text: str | None = None
    lines: dict[tuple, int] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    overridden: dict[tuple, str] = field(default_factory=dict)

    def problem(
        self, message: str, loc: tuple = (), step: str | None = None, fld: str | None = None
    ):
        """A Problem located at `loc` (a path into the raw YAML), or at the --set that made it."""
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.overridden:
                return Problem(
                    message, file=f"--set {self.overridden[loc[:n]]}", step=step, field=fld
                )
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                line = self.lines[loc[:n]]
                break
        return Problem(message, file=self.file, line=line, step=step, field=fld)


def _node_lines(node: yaml.Node, path: tuple, out: dict[tuple, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            out[(*path, k)] = key.start_mark.line + 1
            _node_lines(value, (*path, k), out)
            out[(*path, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*path, i), out)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' on line {line} repeats the one on line {seen[key]} of the same "
                    "mapping; the second would silently replace the first",
                    key_node.start_mark,
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes `node` stands for once its aliases are expanded (each shared node
    counted once per use), without expanding them."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1  # a recursive alias counts once; the loader refuses it later anyway
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_SPEC_NODES:
            break
    sizes[id(node)] = total
    return total


def _parse_yaml(text: str, file: str | None) -> tuple[Any, dict[tuple, int]]:
    if len(text) > MAX_SPEC_BYTES:
        msg = f"{len(text):,} characters: a pipeline spec is at most {MAX_SPEC_BYTES:,}"
        raise SpecError([Problem(msg, file=file)])
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is not None and _expanded_size(node, {}) > MAX_SPEC_NODES:
            raise SpecError(
                [
                    Problem(
                        f"its YAML aliases expand to more than {MAX_SPEC_NODES:,} values: refused "
                        "(an alias bomb?); write the steps out, or use fewer nested aliases",
                        file=file,
                    )
                ]
            )
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except RecursionError:
        raise SpecError([Problem("nested too deeply to read", file=file)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        msg = getattr(exc, "problem", None) or str(exc)
        raise SpecError([Problem(f"not valid YAML: {msg}", file=file, line=line)]) from None
    lines: dict[tuple, int] = {}
    if node is not None:
        try:
            _node_lines(node, (), lines)
        except RecursionError:
            raise SpecError([Problem("nested too deeply to read", file=file)]) from None
    return data, lines


def parse_override(item: str) -> tuple[list[str], Any]:
    """`STEP.params.FIELD=VALUE` -> (['STEP', 'params', 'FIELD'], VALUE parsed as YAML)."""
    if "=" not in item:
        raise SpecError([Problem(f"expected KEY=VALUE, got '{item}'", file=f"--set {item}")])
    key, _, raw = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise SpecError([Problem("empty key", file=f"--set {item}")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict[tuple, str]:
    """Apply --set overrides in place. A first segment naming a step addresses that step."""
    touched: dict[tuple, str] = {}
    steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    index = {s.get("id"): i for i, s in enumerate(steps) if isinstance(s, dict)}
    for item in overrides:
        path, value = parse_override(item)
        if path[0] in index:
            target: Any = steps[index[path[0]]]
            loc: tuple = ("steps", index[path[0]])
            rest = path[1:]
        elif path[0] in PipelineSpec.model_fields:
            target, loc, rest = data, (), path
        else:
            known = ", ".join(sorted(k for k in index if k)) or "none"
            raise SpecError(
                [Problem(f"'{path[0]}' is not a step id (steps: {known})", file=f"--set {item}")]
            )
        if not rest:
            raise SpecError([Problem("name a field after the step id", file=f"--set {item}")])
        for part in rest[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
            loc = (*loc, part)
        target[rest[-1]] = value
        touched[(*loc, rest[-1])] = item
    return touched


def _pydantic_problems(exc: ValidationError, loaded: LoadedSpec, raw: dict) -> list[Problem]:
    problems = []
    steps = raw.get("steps") if isinstance(raw.get("steps"), list) else []
    for err in exc.errors():
        loc = tuple(err["loc"])
        step = None
        fld = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            item = steps[loc[1]] if loc[1] < len(steps) else None
            step = item.get("id") if isinstance(item, dict) else None
            step = step or f"#{loc[1] + 1}"
            fld = ".".join(str(p) for p in loc[2:]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = PipelineSpec
            if loc[0] == "steps":
                parent = Resources if "resources" in loc else StepSpec
            elif loc[0] == "tracking":
                parent = Tracking
            msg = f"unknown field (allowed: {', '.join(parent.model_fields)})"
        problems.append(loaded.problem(msg, loc, step=step, fld=fld))
    return problems


def load_spec(
    source: str | Path | dict | PipelineSpec, overrides: list[str] | None = None
) -> LoadedSpec:
    """Load a spec from a YAML file, YAML text, a dict or a model, apply overrides, validate.

    Only the structure is validated here; operator params are validated by the planner,
    which knows the operators.
    """
    overrides = list(overrides or [])
    file = text = None
    lines: dict[tuple, int] = {}
    if isinstance(source, PipelineSpec):
        data = source.model_dump(mode="json", exclude_none=True)
    elif isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        path = Path(source)
        if isinstance(source, str) and "\n" in source:
            text = source
        else:
            file = str(source)
            try:
                text = path.read_text()
            except FileNotFoundError:
                raise SpecError([Problem("file not found", file=file)]) from None
            except OSError as exc:
                raise SpecError([Problem(f"cannot read: {exc.strerror}", file=file)]) from None
        data, lines = _parse_yaml(text, file)
    if not isinstance(data, dict):
        raise SpecError(
            [Problem("a pipeline is a YAML mapping with name, storage and steps", file)]
        )
    loaded = LoadedSpec(spec=None, file=file, text=text, lines=lines, overrides=overrides)  # type: ignore[arg-type]
    loaded.overridden = apply_overrides(data, overrides)
    try:
        loaded.spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_pydantic_problems(exc, loaded, data)) from None
    return loaded
