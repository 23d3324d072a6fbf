"""From a validated spec to an executable plan: operators resolved, params validated, the step
graph checked (duplicates, unknown references, cycles, columns), fingerprints computed and the
cache consulted. This is all `difforge validate` does, and it imports neither torch nor Ray.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from difforge.platform import registry
from difforge.platform.columns import type_problems
from difforge.platform.datasets import (
    WORK,
    DatasetNotCommitted,
    join,
    missing_files,
    normalize_uri,
    read_manifest,
)
from difforge.platform.devices import device_class, uses_auto_precision
from difforge.platform.errors import DifforgeError, Problem, SpecError
from difforge.platform.fingerprint import fingerprint
from difforge.platform.operator import (
    MAIN,
    Operator,
    SourceOperator,
    output_columns,
    required_columns,
    side_output_columns,
)
from difforge.platform.spec import LoadedSpec, Resources

log = logging.getLogger("difforge")


@dataclass
class InputRef:
    """An input of a step: another step's output, or an external committed dataset."""

    text: str
    step: str | None = None
    output: str = MAIN
    uri: str | None = None  # external datasets only
    fingerprint: str | None = None
    columns: set[str] | None = None


@dataclass
class PlannedStep:
    id: str
    op_cls: type[Operator]
    params: BaseModel
    resources: Resources
    inputs: list[InputRef]
    fingerprint: str = ""
    uri: str = ""  # the main dataset's folder
    cached: bool = False
    forced: bool = False
    columns: set[str] | None = None
    upstream: set[str] = field(default_factory=set)
    min_rows: int | None = None  # fewer rows in the main output fail the step
    device: str | None = None  # the device class its `auto` precisions resolve for, if any
    work: str | None = None  # the work folder this run holds the lease of (leases.py), once started

    @property
    def op(self) -> str:
        return self.op_cls.name

    @functools.cached_property
    def operator(self) -> Operator:
        """The step's operator, made once per plan: a source lists what it reads once, and
        that listing is both its fingerprint and what its read tasks read."""
        return self.op_cls(self.params)

    @property
    def work_root(self) -> str:
        """Where the step's work folders live (`_work/`: one per attempt, leases.py)."""
        return join(self.uri, WORK)

    @property
    def work_uri(self) -> str:
        """The work folder this run holds for the step: checkpoints, resume markers."""
        if self.work is None:
            raise RuntimeError(f"step {self.id}: no work folder before the step starts")
        return self.work

    def output_uri(self, name: str = MAIN) -> str:
        return self.uri if name == MAIN else join(self.uri, name)

    def resolved(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "op": self.op,
            "op_version": self.op_cls.version,
            "inputs": [i.text for i in self.inputs],
            "params": self.params.model_dump(mode="json"),
            "resources": self.resources.model_dump(exclude_none=True),
            "fingerprint": self.fingerprint,
            "uri": self.uri,
        }


def _commit_state(step: PlannedStep) -> str:
    """ "whole" (a cache hit: committed, every listed file there with its size), "absent", or
    "broken" (committed with files missing, said once on the console)."""
    try:
        manifest = read_manifest(step.uri)
    except DatasetNotCommitted:
        return "absent"
    missing = missing_files(step.uri, manifest)
    if missing:
        log.warning(
            "step %s: its committed dataset %s lacks %d of its %d file(s) (first: %s): "
            "recomputing it",
            step.id,
            step.uri,
            len(missing),
            len(manifest.files),
            missing[0],
        )
        return "broken"
    return "whole"


@dataclass
class Plan:
    loaded: LoadedSpec
    steps: list[PlannedStep]  # topological order
    storage: str

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    def step(self, step_id: str) -> PlannedStep:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def resolved(self) -> dict[str, Any]:
        spec = self.loaded.spec
        return {
            "name": spec.name,
            "storage": self.storage,
            "tracking": spec.tracking.model_dump(exclude_none=True),
            "overrides": self.loaded.overrides,
            "steps": [s.resolved() for s in self.steps],
        }


def _parse_input(text: str) -> InputRef:
    if "/" in text or "://" in text:
        return InputRef(text=text, uri=normalize_uri(text))
    step, _, output = text.partition(".")
    return InputRef(text=text, step=step, output=output or MAIN)


def planned_device(step: PlannedStep) -> str:
    """The device class a step will run on: CUDA when it asks for GPUs (or for them where
    present) and this machine's device class is CUDA."""
    gpus = step.resources.num_gpus
    wants = (gpus == "auto" and step.op_cls.gpus_when_available > 0) or (
        isinstance(gpus, float | int) and gpus > 0
    )
    return "cuda" if wants and device_class() == "cuda" else "cpu"


def _toposort(deps: dict[str, list[str]], order: list[str]) -> tuple[list[str], list[str] | None]:
    """Kahn's algorithm, stable in spec order. Returns (order, a cycle or None)."""
    indeg = {s: len(set(d)) for s, d in deps.items()}
    users: dict[str, list[str]] = {s: [] for s in deps}
    for s, d in deps.items():
        for x in set(d):
            users[x].append(s)
    ready = [s for s in order if indeg[s] == 0]
    out: list[str] = []
    while ready:
        s = ready.pop(0)
        out.append(s)
        for u in users[s]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
                ready.sort(key=order.index)
    if len(out) == len(order):
        return out, None
    # walk a cycle among the remaining steps, for the message
    left = [s for s in order if s not in out]
    node, path = left[0], []
    while node not in path:
        path.append(node)
        node = next(x for x in deps[node] if x in left)
    return out, [*path[path.index(node) :], node]


def build_plan(
    loaded: LoadedSpec,
    until: str | None = None,
    force: list[str] | None = None,
    check_cache: bool = True,
) -> Plan:
    """Resolve and check everything about a pipeline that can be known before running it: a
    sequence of small passes over the steps, each building on what the ones before it checked;
    a SpecError carries every problem a pass (or the first two together) found."""
    steps, found = resolve_ops(loaded)
    found += resolve_inputs(loaded, steps)
    if found:  # as the spec reads: duplicates first, then step by step
        raise SpecError([problem for _, problem in sorted(found, key=lambda f: f[0])])
    ordered = order(loaded, steps)
    selected, forced = select(steps, ordered, until, force)
    storage = normalize_uri(loaded.spec.storage)
    fingerprint_steps(loaded, steps, ordered, selected, join(storage, loaded.spec.name))
    for sid in ordered:
        steps[sid].forced = sid in forced
    plan = Plan(loaded=loaded, steps=[steps[s] for s in selected], storage=storage)
    if check_cache:
        check_cache_hits(plan)
    return plan


def _index(loaded: LoadedSpec) -> dict[str, int]:
    """Each step id's position in the spec (its first, for a duplicated id)."""
    positions: dict[str, int] = {}
    for i, s in enumerate(loaded.spec.steps):
        positions.setdefault(s.id, i)
    return positions


# Problems a pass found, each with its rank in the spec's reading order (-1: before the steps)
Found = list[tuple[int, Problem]]


def resolve_ops(loaded: LoadedSpec) -> tuple[dict[str, PlannedStep], Found]:
    """Step ids unique; each step's operator found, its params validated (pydantic's errors
    said in the spec's words), its number of inputs checked, its resources merged over the
    operator's. Inputs are parsed, not yet resolved. Returns the steps it could make."""
    found: Found = []
    positions = _index(loaded)
    for i, s in enumerate(loaded.spec.steps):
        if positions[s.id] != i:
            found.append((-1, loaded.problem("duplicate step id", ("steps", i, "id"), step=s.id)))
    steps: dict[str, PlannedStep] = {}
    for sid, i in positions.items():
        s, loc = loaded.spec.steps[i], ("steps", i)
        try:
            op_cls = registry.get(s.op)
        except DifforgeError as exc:
            found.append((i, loaded.problem(str(exc), (*loc, "op"), step=sid, fld="op")))
            continue
        try:
            params = op_cls.Params.model_validate(s.params)
        except ValidationError as exc:
            found += [(i, p) for p in _param_problems(loaded, op_cls, exc, loc, sid)]
            continue
        lo, hi = op_cls.inputs
        if not lo <= len(s.inputs) <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            got = f"'{op_cls.name}' takes {want} input(s), got {len(s.inputs)}"
            found.append((i, loaded.problem(got, (*loc, "inputs"), step=sid, fld="inputs")))
        refs = [_parse_input(text) for text in s.inputs]
        resources = op_cls.resources.merged(s.resources)
        steps[sid] = PlannedStep(sid, op_cls, params, resources, refs, min_rows=s.min_rows)
    return steps, found


def _param_problems(
    loaded: LoadedSpec, op_cls: type[Operator], exc: ValidationError, loc: tuple, sid: str
) -> list[Problem]:
    """pydantic's errors for a step's params, in the spec's words and at their lines."""
    allowed = ", ".join(op_cls.Params.model_fields) or "none"
    problems = []
    for err in exc.errors():
        ploc = tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown parameter of '{op_cls.name}' (allowed: {allowed})"
        elif err["type"] == "missing":
            msg = "required parameter is missing"
        got = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict | list):
            msg = f"{msg} (got {got!r})"
        fld = "params." + ".".join(str(p) for p in ploc)
        problems.append(loaded.problem(msg, (*loc, "params", *ploc), step=sid, fld=fld))
    return problems


def resolve_inputs(loaded: LoadedSpec, steps: dict[str, PlannedStep]) -> Found:
    """Each input that names a step names another step of this pipeline, and an output that
    step has (its main one, or a side output)."""
    found: Found = []
    ids = [s.id for s in loaded.spec.steps]
    positions = _index(loaded)
    for sid, step in steps.items():
        for j, ref in enumerate(step.inputs):
            if ref.step is None:
                continue
            i = positions[sid]
            loc = ("steps", i, "inputs", j)
            if ref.step not in positions:
                said = (
                    f"input '{ref.text}' is not a step of this pipeline (steps: {', '.join(ids)})"
                )
                found.append((i, loaded.problem(said, loc, step=sid, fld="inputs")))
            elif ref.step == sid:
                found.append((i, loaded.problem("a step cannot read its own output", loc, sid)))
            else:
                other = registry.find(loaded.spec.steps[positions[ref.step]].op)
                if (
                    other is not None
                    and ref.output != MAIN
                    and ref.output not in other.side_outputs
                ):
                    outs = ", ".join(other.side_outputs) or "none"
                    said = (
                        f"step '{ref.step}' ({other.name}) has no output '{ref.output}' "
                        f"(side outputs: {outs})"
                    )
                    found.append((i, loaded.problem(said, loc, step=sid, fld="inputs")))
    return found


def order(loaded: LoadedSpec, steps: dict[str, PlannedStep]) -> list[str]:
    """The steps in topological order (stable in spec order), each knowing every step
    upstream of it; a cycle is an error naming it."""
    deps = {sid: [r.step for r in p.inputs if r.step] for sid, p in steps.items()}
    ordered, cycle = _toposort(deps, list(steps))
    if cycle:
        i = _index(loaded)[cycle[0]]
        said = "the steps form a cycle: " + " -> ".join(cycle)
        raise SpecError([loaded.problem(said, ("steps", i), step=cycle[0])])
    for sid in ordered:
        steps[sid].upstream = set(deps[sid]).union(*(steps[d].upstream for d in deps[sid]))
    return ordered


def select(
    steps: dict[str, PlannedStep], ordered: list[str], until: str | None, force: list[str] | None
) -> tuple[list[str], set[str]]:
    """`--until STEP`: that step and what it needs; `--force STEP`: it and everything
    downstream of it. Returns (the selected steps in order, the forced ones)."""
    selected = ordered
    if until is not None:
        if until not in steps:
            raise SpecError([Problem(f"--until: no step '{until}' (steps: {', '.join(ordered)})")])
        keep = steps[until].upstream | {until}
        selected = [s for s in ordered if s in keep]
    forced: set[str] = set()
    for f in force or []:
        if f not in steps:
            raise SpecError([Problem(f"--force: no step '{f}' (steps: {', '.join(ordered)})")])
        forced |= {f} | {s for s in ordered if f in steps[s].upstream}
    return selected, forced


def fingerprint_steps(
    loaded: LoadedSpec,
    steps: dict[str, PlannedStep],
    ordered: list[str],
    selected: list[str],
    root: str,
) -> None:
    """In order, each step's inputs resolved (an upstream step's output, or an external
    committed dataset whose manifest is read and whose types are checked now), its input
    columns checked, its output columns known, and its fingerprint and folder under `root`:
    the operator, its version and params, its inputs' fingerprints, the device class its
    `auto` precisions resolve for, and, for a selected step, what it reads from outside."""
    problems: list[Problem] = []
    positions = _index(loaded)
    for sid in ordered:
        step, i = steps[sid], positions[sid]
        problems += _resolve_input_data(loaded, steps, step, i)
        input_cols = [ref.columns for ref in step.inputs]
        if step.inputs and input_cols[0] is not None:
            missing = required_columns(step.operator) - input_cols[0]
            if missing:
                have = ", ".join(sorted(input_cols[0])) or "none"
                said = (
                    f"'{step.op}' needs column(s) {', '.join(sorted(missing))} in its input "
                    f"'{step.inputs[0].text}', which has: {have}"
                )
                problems.append(loaded.problem(said, ("steps", i, "inputs"), sid, "inputs"))
        step.columns = output_columns(step.operator, input_cols)
        payload: dict[str, Any] = {
            "op": step.op,
            "version": step.op_cls.version,
            "params": step.params.model_dump(mode="json"),
            "inputs": [[r.output, r.fingerprint] for r in step.inputs],
        }
        if uses_auto_precision(payload["params"]):
            # `auto` is bf16 on GPUs and fp32 on CPUs: the device class decides what runs
            step.device = planned_device(step)
            payload["device"] = step.device
        if sid in selected:
            try:
                if issubclass(step.op_cls, SourceOperator):
                    payload["source"] = step.operator.source_fingerprint()
                elif (external := step.operator.external_state()) is not None:
                    payload["external"] = external
            except DifforgeError as exc:
                problems.append(loaded.problem(str(exc), ("steps", i), step=sid))
                continue
        step.fingerprint = fingerprint(payload)
        step.uri = join(root, sid, step.fingerprint)
    if problems:
        raise SpecError(problems)


def _resolve_input_data(
    loaded: LoadedSpec, steps: dict[str, PlannedStep], step: PlannedStep, i: int
) -> list[Problem]:
    """A step's inputs' fingerprints, folders and columns; the types of a committed external
    first input checked against what the operator reads. Returns the problems found."""
    problems = []
    for j, ref in enumerate(step.inputs):
        loc = ("steps", i, "inputs", j)
        if ref.step:
            up = steps[ref.step]
            ref.fingerprint = up.fingerprint
            ref.uri = up.output_uri(ref.output)
            ref.columns = (
                up.columns if ref.output == MAIN else side_output_columns(up.operator, ref.output)
            )
            continue
        try:
            m = read_manifest(ref.uri)
        except DatasetNotCommitted as exc:
            raise SpecError([loaded.problem(str(exc), loc, step.id, "inputs")]) from None
        ref.fingerprint = m.fingerprint
        ref.columns = set(m.column_names)
        if j == 0:  # a committed input's types are known now: check them now
            for text in type_problems(m.schema(), required_columns(step.operator)):
                said = f"'{step.op}' cannot read input '{ref.text}': its {text}"
                problems.append(loaded.problem(said, loc, step.id, "inputs"))
    return problems


def check_cache_hits(plan: Plan) -> None:
    """Each step not forced is cached when its dataset is committed whole; one committed with
    files missing is recomputed, its commit replaced (as with --force)."""
    for step in plan.steps:
        state = "absent" if step.forced else _commit_state(step)
        step.cached = state == "whole"
        step.forced = step.forced or state == "broken"
