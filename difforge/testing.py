"""The conformance kit: what every map operator must honour, checked on a sample batch without
Ray. A plugin's own tests call it on their operator:

    from difforge.testing import check_map_operator

    def test_blur_conforms(tmp_path):
        check_map_operator(Blur, {"radius": 2}, sample_table, tmp_path)

It checks that
- its `Params` forbid unknown fields (a typo in YAML is an error, not a silent default);
- the columns it declares (`columns()`, or the former `reads`, `writes`, `output_columns` ...)
  are those it writes, and the sample has those it reads;
- every batch's output has one schema, and undeclared outputs are never returned;
- its output is deterministic: the same batch twice gives the same rows;
- it does not depend on how rows are batched: the whole sample at once and the sample in
  slices give the same rows (a fused pass hands a step slices of its neighbour's batches);
- it leaves its input untouched (fused steps share decoded images and batches);
- it sets up as it would in a fused pass (a stateless operator that may share a pass with the
  step before it cannot read that step's output in `setup`, only its metadata).
Each failure says which rule and what differed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from difforge.platform.context import MapContext
from difforge.platform.errors import DifforgeError
from difforge.platform.fusion import plain_map
from difforge.platform.operator import (
    MAIN,
    MapOperator,
    output_columns,
    required_columns,
    side_output_columns,
)
from difforge.platform.outputs import write_dataset


class ConformanceError(AssertionError):
    """An operator breaks a rule of the operator contract."""


def _outputs(op: MapOperator, batch: pa.Table) -> dict[str, pa.Table]:
    result = op.process(batch)
    tables = result if isinstance(result, dict) else {MAIN: result}
    allowed = {MAIN, *type(op).side_outputs}
    extra = set(tables) - allowed
    if extra:
        raise ConformanceError(f"{type(op).name}: returned undeclared outputs {sorted(extra)}")
    return {k: v for k, v in tables.items() if v is not None}


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    return sorted(rows, key=lambda r: str(r.get("id", "")) + repr(sorted(r.items(), key=str)))


def check_map_operator(
    op_cls: type[MapOperator],
    params: dict[str, Any],
    sample: pa.Table,
    tmp_path: str | Path,
    metadata: dict[str, Any] | None = None,
    slice_rows: int = 3,
) -> dict[str, pa.Table]:
    """Check `op_cls` with `params` on `sample` (a batch of its input); return its outputs.
    `metadata` is the input dataset's (class names, ...), for operators that read it."""
    name = getattr(op_cls, "name", op_cls.__name__)
    try:
        op_cls.Params.model_validate({**params, "__not_a_param__": 1})
    except ValidationError:
        pass
    else:
        raise ConformanceError(f"{name}: Params accept unknown fields (set extra='forbid')")
    validated = op_cls.Params.model_validate(params)
    uri = str(Path(tmp_path) / "conformance-input")
    write_dataset(uri, sample, "conformance", metadata=metadata or {})
    # set up as a fused pass would, where this operator can share one with the step before it
    pending = dict(metadata or {}) if plain_map(op_cls) else None
    ctx = MapContext(
        step="conformance",
        inputs=[uri],
        work_uri=str(Path(tmp_path) / "work"),
        pending_metadata=pending,
    )

    def fresh() -> MapOperator:
        op = op_cls(validated)
        try:
            op.setup(ctx)
        except DifforgeError as exc:
            raise ConformanceError(f"{name}: cannot be set up in a fused pass: {exc}") from exc
        return op

    before = sample.to_pylist()
    whole = _outputs(fresh(), sample)
    if sample.to_pylist() != before:
        raise ConformanceError(f"{name}: changed its input batch in place")
    again = _outputs(fresh(), sample)
    for out in whole:
        if _rows(whole[out]) != _rows(again[out]):
            raise ConformanceError(f"{name}: output '{out}' differs between two runs")

    parts: dict[str, list[pa.Table]] = {}
    op = fresh()
    for start in range(0, sample.num_rows, slice_rows):
        for out, table in _outputs(op, sample.slice(start, slice_rows)).items():
            parts.setdefault(out, []).append(table)
    for out, tables in parts.items():
        schemas = {t.schema for t in tables if t.num_rows} | {whole[out].schema}
        if len(schemas) > 1:
            raise ConformanceError(f"{name}: output '{out}' has several schemas: {schemas}")
        sliced = pa.concat_tables(tables)
        if _rows(sliced) != _rows(whole.get(out, sliced.schema.empty_table())):
            raise ConformanceError(
                f"{name}: output '{out}' differs when the input comes in slices of "
                f"{slice_rows} rows (a fused pass batches it so)"
            )

    declaring = op_cls(validated)  # its columns() (or the former spellings)
    missing = required_columns(declaring) - set(sample.column_names)
    if missing:
        raise ConformanceError(f"{name}: reads {sorted(missing)}, which the sample lacks")
    declared = output_columns(declaring, [set(sample.column_names)])
    written = set(whole[MAIN].column_names)
    if declared is not None and declared != written:
        raise ConformanceError(
            f"{name}: declares columns {sorted(declared)} but writes {sorted(written)}"
        )
    for side in op_cls.side_outputs:
        side_declared = side_output_columns(declaring, side)
        if side in whole and side_declared is not None:
            if side_declared != set(whole[side].column_names):
                raise ConformanceError(
                    f"{name}: side output '{side}' declares {sorted(side_declared)} but writes "
                    f"{sorted(whole[side].column_names)}"
                )
    return whole
