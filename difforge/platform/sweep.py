"""Sweeps: a pipeline's `matrix:` expanded into variants, run one after another.

```yaml
matrix:
  noisy.params.corruption_ratio: [0.0, 0.025]   # the same dotted paths as --set
  model.params.seed: [0, 1]
  include: [{model.params.cep.kind: gaussian, noisy.params.corruption_ratio: 0.0, model.params.seed: 0}]
  exclude: [{noisy.params.corruption_ratio: 0.025, model.params.seed: 1}]
```

The axes' cross product, minus the combinations that match every value of an `exclude`
entry, plus each `include` entry as one more combination. A variant is the pipeline with its
values applied as overrides. Nothing else is special: a step's fingerprint depends only on what
the step depends on, so steps that no swept value reaches have the same fingerprint in every
variant and are computed once (by the first variant that needs them) and cached for the rest.
Each variant is an MLflow run nested under the sweep's run, its values as params.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difforge.platform.errors import Problem, SpecError
from difforge.platform.spec import LoadedSpec, load_spec

RESERVED = ("include", "exclude")


@dataclass
class Variant:
    name: str
    values: dict[str, Any]

    @property
    def overrides(self) -> list[str]:
        return [
            f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in self.values.items()
        ]


@dataclass
class Sweep:
    base: LoadedSpec  # the pipeline with --set applied, its matrix removed
    variants: list[Variant]
    source: str | Path | dict  # the YAML file or text (kept for MLflow), or the base as a dict
    overrides: list[str] = field(default_factory=list)

    def variant_spec(self, v: Variant) -> LoadedSpec:
        """The variant as a pipeline of its own: the sweep's overrides, then its values."""
        try:
            loaded = load_spec(self.source, [*self.overrides, *v.overrides])
        except SpecError as exc:
            problems = [
                Problem(f"variant {v.name}: {p.message}", p.file, p.line, p.step, p.field)
                for p in exc.problems
            ]
            raise SpecError(problems) from None
        loaded.spec = loaded.spec.model_copy(update={"matrix": None})
        return loaded


def _short_names(paths: list[str]) -> dict[str, str]:
    """The shortest unambiguous suffix of each dotted path, for variant names."""
    out = {}
    for p in paths:
        parts = p.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(1 for q in paths if q == cand or q.endswith("." + cand)) == 1:
                out[p] = cand
                break
        else:
            out[p] = p
    return out


def expand(matrix: dict[str, Any]) -> list[Variant]:
    axes = {k: v for k, v in matrix.items() if k not in RESERVED}
    include = list(matrix.get("include") or [])
    exclude = list(matrix.get("exclude") or [])
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    combos = [
        c for c in combos if not any(all(c.get(k) == v for k, v in ex.items()) for ex in exclude)
    ]
    for extra in include:
        if extra not in combos:
            combos.append(dict(extra))
    names = _short_names(sorted({k for c in combos for k in c}))
    variants, seen = [], set()
    for c in combos:
        name = (
            ",".join(
                f"{names[k]}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in c.items()
            )
            or "base"
        )
        if name not in seen:
            seen.add(name)
            variants.append(Variant(name, c))
    return variants


def load_sweep(source: str | Path | dict, overrides: list[str] | None = None) -> Sweep | None:
    """The sweep a pipeline declares, validated variant by variant; None without a matrix."""
    return sweep_of(load_spec(source, list(overrides or [])), source)


def sweep_of(loaded: LoadedSpec, source: str | Path | dict) -> Sweep | None:
    """The sweep of a loaded pipeline (`source`: what it was loaded from), validated variant by
    variant; None without a matrix."""
    overrides = list(loaded.overrides)
    if not loaded.spec.matrix:
        return None
    base = LoadedSpec(
        spec=loaded.spec.model_copy(update={"matrix": None}),
        file=loaded.file,
        text=loaded.text,
        lines=loaded.lines,
        overrides=overrides,
        overridden=loaded.overridden,
    )
    keep = source if isinstance(source, (str, Path)) else loaded.spec.model_dump(mode="json")
    sweep = Sweep(base, expand(loaded.spec.matrix), keep, overrides)
    for v in sweep.variants:
        sweep.variant_spec(v)  # every variant is a valid pipeline, or say which is not
    return sweep


def shared_steps(plans: dict[str, Any]) -> dict[str, int]:
    """Step id -> how many distinct fingerprints it has across the variants' plans (1: shared)."""
    ids: dict[str, set[str]] = {}
    for plan in plans.values():
        for s in plan.steps:
            ids.setdefault(s.id, set()).add(s.fingerprint)
    return {k: len(v) for k, v in ids.items()}


@dataclass
class SweepSummary:
    name: str
    run_id: str
    tracking_uri: str
    experiment: str
    variants: dict[str, Any]  # variant name -> RunSummary
    seconds: float

    def table(self) -> str:
        from difforge.platform.show import text_table

        rows = []
        for name, s in self.variants.items():
            run = sum(not x.cached for x in s.steps)
            rows.append(
                [name, str(run), str(len(s.steps) - run), f"{s.seconds:.1f}", s.run_id or "-"]
            )
        return text_table(["variant", "steps run", "cached", "seconds", "MLflow run"], rows)


def run_sweep(
    sweep: Sweep,
    until: str | None = None,
    force: list[str] | None = None,
    address: str | None = None,
) -> SweepSummary:
    """Run every variant in turn on one Ray, each a pipeline run nested under the sweep's run."""
    from difforge.platform.executor import run
    from difforge.platform.runtime import RayRuntime
    from difforge.platform.tracking import Tracker

    spec = sweep.base.spec
    t0 = time.time()
    tracker = Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name)
    parent = tracker.start_pipeline(
        f"{spec.name} sweep", {"difforge.pipeline": spec.name, "difforge.sweep": "true"}
    )
    parent.log_params({"variants": len(sweep.variants), "overrides": sweep.overrides})
    parent.log_dict({v.name: v.values for v in sweep.variants}, "matrix.json")
    runtime = RayRuntime(address)
    results: dict[str, Any] = {}
    status = "FAILED"
    try:
        for v in sweep.variants:
            results[v.name] = run(
                sweep.variant_spec(v),
                until=until,
                force=force,
                runtime=runtime,
                tags={"mlflow.parentRunId": parent.run_id, "difforge.variant": v.name},
                params={f"matrix.{k}": val for k, val in v.values.items()},
            )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.log_metrics({"seconds": time.time() - t0, "variants_done": len(results)})
        parent.end(status)
        runtime.shutdown()
    return SweepSummary(
        spec.name, parent.run_id, tracker.uri, tracker.experiment, results, time.time() - t0
    )
