"""The JSON Schema of a whole pipeline, each operator's params included, for editors.

`difforge schema` prints it; `schema/pipeline.schema.json` is the copy for the built-in
operators (a test fails when it drifts from the code), which the shipped pipelines name on
their `# yaml-language-server: $schema=...` line, so that VS Code's YAML extension completes
and checks a pipeline as it is written. A step's `op` is one of the registered operators
(plugins included where they are installed), and its `params` are checked against that
operator's params: nested models with their choices, defaults and descriptions. A `matrix`
sweep's values are lists of what they replace, so they are left to `difforge validate`.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from difforge.platform import registry
from difforge.platform.spec import PipelineSpec

SCHEMA_ID = "https://difforge.dev/schema/pipeline.schema.json"


def builtin_names() -> list[str]:
    """The operators difforge itself ships (the committed schema's), not plugins'."""
    return sorted(n for n, ep in registry.declared().items() if ep.value.startswith("difforge."))


def pipeline_schema(names: list[str] | None = None) -> dict[str, Any]:
    """The pipeline envelope's schema with a step's `op` one of `names` (default: every
    registered operator) and its `params` those of that operator."""
    names = sorted(names if names is not None else registry.names())
    ops = [registry.get(name) for name in names]
    refs, params_defs = models_json_schema(
        [(op.Params, "validation") for op in ops], ref_template="#/$defs/{model}"
    )
    schema = PipelineSpec.model_json_schema()
    defs = schema["$defs"]
    defs.update(params_defs.get("$defs", {}))
    step = defs["StepSpec"]
    step["properties"]["op"] = {
        "description": step["properties"]["op"]["description"],
        "enum": names,
    }
    rules, renames = [], {}
    for op in ops:
        ref = refs[(op.Params, "validation")]
        named = ref["$ref"].removeprefix("#/$defs/")
        if named.startswith("difforge__"):  # params classes of one name, told apart by module
            renames.setdefault(named, f"{op.name}.params")
        rules.append(
            {
                "if": {"properties": {"op": {"const": op.name}}, "required": ["op"]},
                "then": {
                    "properties": {
                        "params": {**ref, "description": f"{op.name}: {op.description()}"}
                    }
                },
            }
        )
    step["allOf"] = rules
    return _renamed(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema},
        renames,
    )


def _renamed(schema: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """Defs that pydantic named by module path (`difforge__operators__ingest__digits__Params`)
    renamed by the operator whose params they are (`ingest.digits.params`)."""
    prefix = "#/$defs/"

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith(prefix):
            out["$ref"] = prefix + renames.get(ref[len(prefix) :], ref[len(prefix) :])
        return out

    out = walk(schema)
    out["$defs"] = {renames.get(k, k): v for k, v in out["$defs"].items()}
    return out
