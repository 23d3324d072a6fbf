"""Planning as passes (platform/plan.py), each alone: resolve_ops, resolve_inputs, order,
select, fingerprint_steps, check_cache_hits; and build_plan, which chains them."""

from __future__ import annotations

import pyarrow as pa
import pytest

from difforge.platform.errors import SpecError
from difforge.platform.outputs import write_dataset
from difforge.platform.plan import (
    build_plan,
    check_cache_hits,
    fingerprint_steps,
    order,
    resolve_inputs,
    resolve_ops,
    select,
)
from difforge.platform.spec import load_spec


def spec(steps: str, storage="/tmp/unused"):
    return load_spec(f"name: p\nstorage: {storage}\nsteps:\n{steps}")


CHAIN = """
  - {id: raw, op: ingest.digits, params: {limit: 20}}
  - {id: clean, op: curate.validate, inputs: [raw], resources: {num_cpus: 2}}
  - {id: unique, op: curate.dedup_exact, inputs: [clean]}
  - {id: side, op: curate.validate, inputs: [clean.rejects]}
"""


def planned(text=CHAIN, storage="/tmp/unused"):
    loaded = spec(text, storage)
    steps, found = resolve_ops(loaded)
    assert not found and not resolve_inputs(loaded, steps)
    return loaded, steps


def test_resolve_ops_makes_each_step_and_names_each_problem_at_its_step():
    loaded = spec(
        """
  - {id: raw, op: ingest.digits}
  - {id: raw, op: curate.validate, inputs: [raw]}
  - {id: a, op: no.such_op}
  - {id: b, op: curate.validate, inputs: [raw], params: {colour: red}}
  - {id: c, op: curate.validate, inputs: []}
"""
    )
    steps, found = resolve_ops(loaded)
    said = [(rank, str(p)) for rank, p in found]
    assert said[0][0] == -1 and "duplicate step id" in said[0][1]  # before the steps
    assert [rank for rank, _ in said[1:]] == [2, 3, 4]
    assert "no.such_op" in said[1][1]
    assert "params.colour: unknown parameter of 'curate.validate'" in said[2][1]
    assert "'curate.validate' takes 1 input(s), got 0" in said[3][1]
    # what could be made is made; the first of a duplicated id is the step
    assert set(steps) == {"raw", "c"} and steps["raw"].op == "ingest.digits"


def test_resolve_ops_merges_a_steps_resources_over_its_operators():
    _, steps = planned()
    assert steps["clean"].resources.num_cpus == 2
    assert steps["unique"].resources == steps["unique"].op_cls.resources.merged(None)


def test_resolve_inputs_names_unknown_steps_self_reads_and_missing_outputs():
    loaded = spec(
        """
  - {id: raw, op: ingest.digits}
  - {id: a, op: curate.validate, inputs: [nowhere]}
  - {id: b, op: curate.validate, inputs: [b]}
  - {id: c, op: curate.validate, inputs: [raw.rejects]}
"""
    )
    steps, found = resolve_ops(loaded)
    assert not found
    said = [(rank, str(p)) for rank, p in resolve_inputs(loaded, steps)]
    assert [rank for rank, _ in said] == [1, 2, 3]
    assert "input 'nowhere' is not a step of this pipeline (steps: raw, a, b, c)" in said[0][1]
    assert "a step cannot read its own output" in said[1][1]
    assert "step 'raw' (ingest.digits) has no output 'rejects' (side outputs: none)" in said[2][1]


def test_build_plan_reports_the_problems_of_both_passes_in_reading_order():
    loaded = spec(
        """
  - {id: a, op: curate.validate, inputs: [nowhere]}
  - {id: b, op: no.such_op}
"""
    )
    with pytest.raises(SpecError) as err:
        build_plan(loaded, check_cache=False)
    assert [p.step for p in err.value.problems] == ["a", "b"]


def test_order_is_topological_stable_in_spec_order_and_knows_what_is_upstream():
    loaded, steps = planned(
        """
  - {id: late, op: curate.validate, inputs: [raw]}
  - {id: raw, op: ingest.digits}
  - {id: other, op: ingest.digits}
  - {id: last, op: curate.dedup_exact, inputs: [late]}
"""
    )
    # of the steps ready at once, the first in the spec goes first
    assert order(loaded, steps) == ["raw", "late", "other", "last"]
    assert steps["last"].upstream == {"late", "raw"} and steps["other"].upstream == set()


def test_order_names_a_cycle():
    loaded, steps = planned(
        """
  - {id: a, op: curate.validate, inputs: [b]}
  - {id: b, op: curate.validate, inputs: [a]}
"""
    )
    with pytest.raises(SpecError, match="the steps form a cycle: a -> b -> a"):
        order(loaded, steps)


def test_select_until_keeps_what_a_step_needs_and_force_what_follows():
    loaded, steps = planned()
    ordered = order(loaded, steps)
    selected, forced = select(steps, ordered, "unique", ["clean"])
    assert selected == ["raw", "clean", "unique"]
    assert forced == {"clean", "unique", "side"}
    assert select(steps, ordered, None, None) == (ordered, set())
    with pytest.raises(SpecError, match=r"--until: no step 'nope' \(steps: raw, clean"):
        select(steps, ordered, "nope", None)
    with pytest.raises(SpecError, match="--force: no step 'nope'"):
        select(steps, ordered, None, ["nope"])


def fingerprints(text: str, storage="/tmp/unused") -> dict[str, str]:
    loaded, steps = planned(text, storage)
    ordered = order(loaded, steps)
    fingerprint_steps(loaded, steps, ordered, ordered, "/tmp/unused/p")
    return {sid: s.fingerprint for sid, s in steps.items()}


def test_a_fingerprint_follows_params_and_inputs_not_resources():
    base = fingerprints(CHAIN)
    more_cpus = fingerprints(CHAIN.replace("num_cpus: 2", "num_cpus: 1"))
    assert more_cpus == base
    fewer_rows = fingerprints(CHAIN.replace("limit: 20", "limit: 10"))
    assert all(fewer_rows[s] != base[s] for s in base)  # the change flows downstream
    assert len(set(base.values())) == len(base)  # two validates of different inputs differ


def test_fingerprint_steps_places_each_step_and_resolves_its_inputs():
    loaded, steps = planned()
    ordered = order(loaded, steps)
    fingerprint_steps(loaded, steps, ordered, ordered, "/data/p")
    clean, side = steps["clean"], steps["side"]
    assert clean.uri == f"/data/p/clean/{clean.fingerprint}"
    assert side.inputs[0].uri == f"{clean.uri}/rejects"
    assert side.inputs[0].fingerprint == clean.fingerprint
    assert side.inputs[0].output == "rejects"


def test_an_external_input_must_be_committed_and_of_the_types_the_step_reads(tmp_path):
    text = f"  - {{id: clean, op: curate.validate, inputs: [{tmp_path}/ext]}}\n"
    loaded, steps = planned(text)
    with pytest.raises(SpecError, match="ext"):
        fingerprint_steps(loaded, steps, ["clean"], ["clean"], "/data/p")
    write_dataset(f"{tmp_path}/ext", pa.table({"id": ["a"], "image": [1]}), "fp-ext")
    loaded, steps = planned(text)
    with pytest.raises(SpecError, match="cannot read input"):
        fingerprint_steps(loaded, steps, ["clean"], ["clean"], "/data/p")
    write_dataset(f"{tmp_path}/ok", pa.table({"id": ["a"], "image": [b"x"]}), "fp-ok")
    loaded, steps = planned(text.replace("/ext", "/ok"))
    fingerprint_steps(loaded, steps, ["clean"], ["clean"], "/data/p")
    assert steps["clean"].inputs[0].fingerprint == "fp-ok"


def test_check_cache_hits_takes_a_whole_commit_and_recomputes_a_broken_one(tmp_path):
    plan = build_plan(spec(CHAIN, tmp_path), check_cache=False)
    raw = plan.step("raw")
    manifest = write_dataset(raw.uri, pa.table({"id": ["a", "b"]}), raw.fingerprint)
    check_cache_hits(plan)
    assert raw.cached and not raw.forced
    assert not plan.step("clean").cached  # nothing committed there
    (tmp_path / raw.uri.removeprefix(str(tmp_path) + "/") / manifest.files[0].path).unlink()
    check_cache_hits(plan)
    assert not raw.cached and raw.forced  # its commit is replaced, as with --force
