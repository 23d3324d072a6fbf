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
from difforge.platform.operator import MAIN, Operator, SourceOperator
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


def _parse_input(text: str, step_ids: set[str]) -> InputRef:
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
    """Resolve and check everything about a pipeline that can be known before running it."""
    spec = loaded.spec
    problems: list[Problem] = []
    ids = [s.id for s in spec.steps]
    by_id = {}
    for i, s in enumerate(spec.steps):
        if s.id in by_id:
            problems.append(loaded.problem("duplicate step id", ("steps", i, "id"), step=s.id))
        by_id.setdefault(s.id, (i, s))

    planned: dict[str, PlannedStep] = {}
    for sid, (i, s) in by_id.items():
        loc = ("steps", i)
        try:
            op_cls = registry.get(s.op)
        except DifforgeError as exc:
            problems.append(loaded.problem(str(exc), (*loc, "op"), step=sid, fld="op"))
            continue
        try:
            params = op_cls.Params.model_validate(s.params)
        except ValidationError as exc:
            allowed = ", ".join(op_cls.Params.model_fields) or "none"
            for err in exc.errors():
                ploc = tuple(err["loc"])
                msg = err["msg"]
                if err["type"] == "extra_forbidden":
                    msg = f"unknown parameter of '{op_cls.name}' (allowed: {allowed})"
                elif err["type"] == "missing":
                    msg = "required parameter is missing"
                got = err.get("input")
                if err["type"] not in ("missing", "extra_forbidden") and not isinstance(
                    got, dict | list
                ):
                    msg = f"{msg} (got {got!r})"
                problems.append(
                    loaded.problem(
                        msg,
                        (*loc, "params", *ploc),
                        step=sid,
                        fld="params." + ".".join(str(p) for p in ploc),
                    )
                )
            continue
        lo, hi = op_cls.inputs
        if not lo <= len(s.inputs) <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            problems.append(
                loaded.problem(
                    f"'{op_cls.name}' takes {want} input(s), got {len(s.inputs)}",
                    (*loc, "inputs"),
                    step=sid,
                    fld="inputs",
                )
            )
        refs = []
        for j, text in enumerate(s.inputs):
            ref = _parse_input(text, set(ids))
            iloc = (*loc, "inputs", j)
            if ref.step is not None:
                if ref.step not in by_id:
                    problems.append(
                        loaded.problem(
                            f"input '{text}' is not a step of this pipeline "
                            f"(steps: {', '.join(ids)})",
                            iloc,
                            step=sid,
                            fld="inputs",
                        )
                    )
                elif ref.step == sid:
                    problems.append(loaded.problem("a step cannot read its own output", iloc, sid))
                else:
                    other = registry.find(by_id[ref.step][1].op)
                    if (
                        other is not None
                        and ref.output != MAIN
                        and ref.output not in other.side_outputs
                    ):
                        outs = ", ".join(other.side_outputs) or "none"
                        problems.append(
                            loaded.problem(
                                f"step '{ref.step}' ({other.name}) has no output "
                                f"'{ref.output}' (side outputs: {outs})",
                                iloc,
                                step=sid,
                                fld="inputs",
                            )
                        )
            refs.append(ref)
        resources = op_cls.resources.merged(s.resources)
        planned[sid] = PlannedStep(sid, op_cls, params, resources, refs, min_rows=s.min_rows)

    if problems:
        raise SpecError(problems)

    deps = {sid: [r.step for r in p.inputs if r.step] for sid, p in planned.items()}
    order, cycle = _toposort(deps, list(planned))
    if cycle:
        i = by_id[cycle[0]][0]
        raise SpecError(
            [
                loaded.problem(
                    "the steps form a cycle: " + " -> ".join(cycle), ("steps", i), step=cycle[0]
                )
            ]
        )
    for sid in order:
        planned[sid].upstream = set(deps[sid]).union(*(planned[d].upstream for d in deps[sid]))

    selected = order
    if until is not None:
        if until not in planned:
            raise SpecError([Problem(f"--until: no step '{until}' (steps: {', '.join(order)})")])
        keep = planned[until].upstream | {until}
        selected = [s for s in order if s in keep]
    forced: set[str] = set()
    for f in force or []:
        if f not in planned:
            raise SpecError([Problem(f"--force: no step '{f}' (steps: {', '.join(order)})")])
        forced |= {f} | {s for s in order if f in planned[s].upstream}

    storage = normalize_uri(spec.storage)
    root = join(storage, spec.name)
    for sid in order:
        step = planned[sid]
        i = by_id[sid][0]
        input_fps, input_cols = [], []
        for j, ref in enumerate(step.inputs):
            if ref.step:
                up = planned[ref.step]
                ref.fingerprint = up.fingerprint
                ref.uri = up.output_uri(ref.output)
                ref.columns = (
                    up.columns
                    if ref.output == MAIN
                    else up.op_cls.side_output_columns(up.params, ref.output)
                )
            else:
                try:
                    m = read_manifest(ref.uri)
                except DatasetNotCommitted as exc:
                    raise SpecError(
                        [loaded.problem(str(exc), ("steps", i, "inputs", j), sid, "inputs")]
                    ) from None
                ref.fingerprint = m.fingerprint
                ref.columns = set(m.column_names)
                if j == 0:  # a committed input's types are known now: check them now
                    for text in type_problems(
                        m.schema(), step.op_cls.required_columns(step.params)
                    ):
                        problems.append(
                            loaded.problem(
                                f"'{step.op}' cannot read input '{ref.text}': its {text}",
                                ("steps", i, "inputs", j),
                                sid,
                                "inputs",
                            )
                        )
            input_fps.append(ref.fingerprint)
            input_cols.append(ref.columns)
        if step.inputs and input_cols[0] is not None:
            missing = step.op_cls.required_columns(step.params) - input_cols[0]
            if missing:
                have = ", ".join(sorted(input_cols[0])) or "none"
                problems.append(
                    loaded.problem(
                        f"'{step.op}' needs column(s) {', '.join(sorted(missing))} in its input "
                        f"'{step.inputs[0].text}', which has: {have}",
                        ("steps", i, "inputs"),
                        step=sid,
                        fld="inputs",
                    )
                )
        step.columns = step.op_cls.output_columns(step.params, input_cols)
        payload: dict[str, Any] = {
            "op": step.op,
            "version": step.op_cls.version,
            "params": step.params.model_dump(mode="json"),
            "inputs": [[r.output, fp] for r, fp in zip(step.inputs, input_fps, strict=True)],
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
        step.forced = sid in forced

    if problems:
        raise SpecError(problems)

    steps = [planned[s] for s in selected]
    if check_cache:
        for step in steps:
            state = "absent" if step.forced else _commit_state(step)
            step.cached = state == "whole"
            step.forced = step.forced or state == "broken"  # its commit replaced, as --force
    return Plan(loaded=loaded, steps=steps, storage=storage)
