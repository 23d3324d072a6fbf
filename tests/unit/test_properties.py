"""Properties of the spec parser, `--set`, matrix expansion, toposort and fingerprints, over
generated inputs: a user's mistake is a SpecError naming where it is, never a traceback.

Profile `ci` (the default here) keeps each property to a bounded number of examples with a
deadline; `HYPOTHESIS_PROFILE=thorough` runs many more."""

from __future__ import annotations

import itertools
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import difforge
from difforge.platform.errors import SpecError
from difforge.platform.fingerprint import fingerprint
from difforge.platform.plan import _toposort
from difforge.platform.spec import load_spec, parse_override
from difforge.platform.sweep import expand

settings.register_profile(
    "ci", max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
step = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["raw", "a", "b", "1bad", "x" * 120]),
        "op": st.sampled_from(["ingest.digits", "image.resize", "nope.op", ""]),
    },
    optional={
        "inputs": st.lists(st.sampled_from(["raw", "a", "b", "zz", "raw.rejects"]), max_size=3),
        "params": st.dictionaries(
            st.sampled_from(["size", "limit", "mode", "x"]), values, max_size=3
        ),
        "resources": st.dictionaries(
            st.sampled_from(["num_cpus", "batch_size", "zz"]), values, max_size=2
        ),
    },
)
specs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["p", "bad name", "", "n" * 150]),
        "steps": st.one_of(st.lists(step, max_size=4), values),
    },
    optional={"storage": st.sampled_from(["s", "memory://x", "", "s3://b/p"]), "extra": values},
)


def plan_or_spec_error(source, overrides=None) -> None:
    try:
        difforge.plan(source, overrides)
    except SpecError as exc:
        assert exc.problems and all(str(p) for p in exc.problems)


@given(st.text(max_size=300))
def test_any_text_is_a_spec_or_a_spec_error(text):
    try:
        load_spec(text + "\n")  # (a string with a newline is YAML text, not a path)
    except SpecError as exc:
        assert exc.problems


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs)
def test_any_structure_plans_or_names_its_problems(tmp_path, spec):
    if spec.get("storage") == "s":
        spec["storage"] = str(tmp_path / "s")
    plan_or_spec_error(spec)


GOOD = {
    "name": "p",
    "storage": "s",
    "steps": [
        {"id": "raw", "op": "ingest.digits", "params": {"limit": 10}},
        {"id": "a", "op": "image.resize", "inputs": ["raw"], "params": {"size": 8}},
    ],
}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.text(max_size=30), max_size=3))
def test_any_set_argument_applies_or_is_named(tmp_path, overrides):
    spec = {**GOOD, "storage": str(tmp_path / "s")}
    try:
        difforge.plan(spec, overrides)
    except SpecError as exc:
        named = [p for p in exc.problems if p.file and p.file.startswith("--set ")]
        spec_level = [p for p in exc.problems if p.file is None]
        assert named or spec_level, exc.problems
        for p in named:
            assert p.file.removeprefix("--set ") in overrides


@given(st.text(max_size=40))
def test_parse_override_takes_key_equals_yaml_or_says_what_it_expected(item):
    try:
        path, _ = parse_override(item)
    except SpecError as exc:
        assert exc.problems[0].file == f"--set {item}"
    else:
        assert path and all(path)


axis = st.lists(st.one_of(st.integers(0, 3), st.sampled_from(["x", "y"])), min_size=1, max_size=3)


@given(
    st.dictionaries(
        st.sampled_from(["s.params.a", "s.params.b", "t.params.c"]), axis, min_size=1, max_size=3
    )
)
def test_matrix_expansion_is_the_product_of_its_axes_without_duplicates(matrix):
    variants = expand(matrix)
    distinct = [dict(zip(matrix, c, strict=True)) for c in itertools.product(*matrix.values())]
    unique = {tuple(sorted((k, repr(v)) for k, v in c.items())) for c in distinct}
    assert len(variants) == len(unique)
    assert len({v.name for v in variants}) == len(variants)


@given(st.integers(1, 12), st.randoms(use_true_random=False), st.booleans())
def test_toposort_respects_every_edge_or_names_a_cycle(n, rnd: random.Random, cyclic):
    names = [f"s{i}" for i in range(n)]
    deps = {s: [names[j] for j in range(i) if rnd.random() < 0.4] for i, s in enumerate(names)}
    if cyclic and n > 1:
        deps[names[0]].append(names[-1])
        if names[0] not in deps[names[-1]]:
            deps[names[-1]].append(names[0])
    order = names[:]
    rnd.shuffle(order)
    out, cycle = _toposort(deps, order)
    if cycle is None:
        assert sorted(out) == sorted(names)
        pos = {s: i for i, s in enumerate(out)}
        assert all(pos[d] < pos[s] for s, ds in deps.items() for d in ds)
    else:
        assert cycle[0] == cycle[-1] and len(cycle) >= 2
        assert all(b in deps[a] for a, b in itertools.pairwise(cycle))


@given(st.dictionaries(st.text(max_size=5), values, max_size=6))
def test_fingerprints_ignore_key_order_and_see_any_change(payload):
    shuffled = dict(reversed(list(payload.items())))
    assert fingerprint(payload) == fingerprint(shuffled)
    changed = {**payload, "__added__": 1}
    assert fingerprint(changed) != fingerprint(payload)


@pytest.mark.parametrize("depth", [3, 12])
def test_deep_nesting_is_a_spec_error_not_a_recursion_error(tmp_path, depth):
    nested = "x"
    for _ in range(depth * 100):
        nested = f"[{nested}]"
    text = f"name: p\nstorage: {tmp_path}\nsteps:\n  - {{id: raw, op: ingest.digits, params: {{limit: {nested}}}}}\n"
    plan_or_spec_error(text)
