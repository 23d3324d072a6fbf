"""The pipeline's JSON Schema (platform/schema.py) as an editor uses it: every operator's params
checked by `op`, the committed copy in step with the code, and every shipped pipeline naming it
and valid against it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from difforge.platform import registry
from difforge.platform.operator import MapOperator
from difforge.platform.schema import builtin_names, pipeline_schema

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "schema" / "pipeline.schema.json"
PIPELINES = sorted((ROOT / "pipelines").rglob("*.yaml"))


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft202012Validator(json.loads(COMMITTED.read_text()))


def test_the_committed_schema_is_what_the_code_makes():
    made = pipeline_schema(builtin_names())
    assert json.loads(COMMITTED.read_text()) == made, (
        "schema/pipeline.schema.json is stale: difforge schema --builtin > schema/pipeline.schema.json"
    )


def test_every_shipped_pipeline_names_the_schema_and_is_valid_against_it(validator):
    assert len(PIPELINES) > 10
    for path in PIPELINES:
        text = path.read_text()
        line = next(x for x in text.splitlines() if x.startswith("# yaml-language-server:"))
        named = (path.parent / line.split("$schema=", 1)[1].strip()).resolve()
        assert named == COMMITTED, path
        errors = [
            f"{list(e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(yaml.safe_load(text))
        ]
        assert not errors, (path.name, errors)


def errors(validator, steps: str) -> list[tuple[list, str]]:
    spec = yaml.safe_load(f"name: p\nsteps:\n{steps}")
    return [(list(e.absolute_path), e.message) for e in validator.iter_errors(spec)]


def test_params_are_checked_by_operator_with_their_choices_and_nested_models(validator):
    said = errors(
        validator,
        """
  - {id: raw, op: ingest.digits, params: {limt: 3}}
  - {id: m, op: train.diffusion, inputs: [raw], params: {finetune: {method: half}}}
  - {id: t, op: train.diffusion, inputs: [raw], params: {timesteps: {density: uniform}}}
""",
    )
    assert said[0][0] == ["steps", 0, "params"] and "'limt' was unexpected" in said[0][1]
    assert said[1][0] == ["steps", 1, "params", "finetune", "method"]
    assert "'half' is not one of ['full', 'lora', 'difffit', 'bias']" in said[1][1]
    assert len(said) == 2  # a valid nested choice passes


def test_an_unknown_operator_is_refused_naming_the_known_ones(validator):
    ((where, message),) = errors(validator, "  - {id: x, op: image.resise}\n")
    assert where == ["steps", 0, "op"] and "'image.resize'" in message


def test_a_schema_made_where_a_plugin_is_installed_knows_its_operator():
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        strength: float = 0.5

    class Blur(MapOperator):
        """Blurs images (a plugin's operator)."""

        name = "plugin.blur"

    Blur.Params = Params
    registry.register(Blur)
    try:
        schema = pipeline_schema()
        assert "plugin.blur" in schema["$defs"]["StepSpec"]["properties"]["op"]["enum"]
        check = jsonschema.Draft202012Validator(schema)
        bad = yaml.safe_load("name: p\nsteps:\n  - {id: b, op: plugin.blur, params: {strength: x}}")
        assert [list(e.absolute_path) for e in check.iter_errors(bad)] == [
            ["steps", 0, "params", "strength"]
        ]
        assert (
            "plugin.blur"
            not in pipeline_schema(builtin_names())["$defs"]["StepSpec"]["properties"]["op"]["enum"]
        )
    finally:
        registry.unregister("plugin.blur")
