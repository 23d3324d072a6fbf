"""Bad Parquet inputs: each gets an error naming the file or the column, or a warning and a
`min_rows` for the user who wants an empty input to fail; a plan with columns that are known
only at run time is not refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import difforge
from difforge.platform.errors import DifforgeError


def parquet_spec(storage: Path, folder: Path, *more: dict, **raw) -> dict:
    return {
        "name": "bad-inputs",
        "storage": str(storage),
        "tracking": {"experiment": "bad-input-tests"},
        "steps": [
            {"id": "raw", "op": "ingest.parquet", "params": {"path": str(folder)}, **raw},
            *more,
        ],
    }


def good_table(n: int = 6, label=None) -> pa.Table:
    from PIL import Image

    from tests.integration.test_curate import png_bytes

    img = png_bytes(Image.new("L", (4, 4), 7))
    labels = label if label is not None else [i % 3 for i in range(n)]
    return pa.table({"id": [f"r{i}" for i in range(n)], "image": [img] * n, "label": labels})


def test_an_unreadable_parquet_file_is_named(ray_session, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(good_table(), folder / "good.parquet")
    data = (folder / "good.parquet").read_bytes()
    (folder / "half.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DifforgeError, match=r"half\.parquet: not a readable Parquet file"):
        difforge.run(parquet_spec(tmp_path / "s", folder))
    (folder / "half.parquet").write_bytes(b"")
    with pytest.raises(DifforgeError, match=r"half\.parquet: not a readable Parquet file \(0 "):
        difforge.run(parquet_spec(tmp_path / "s", folder))


def test_columns_known_only_at_run_time_are_checked_then(ray_session, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(good_table(), folder / "a.parquet")
    steps = [
        {"id": "clean", "op": "curate.validate", "inputs": ["raw"]},
        {
            "id": "noisy",
            "op": "corrupt.labels",
            "inputs": ["clean"],
            "params": {"corruption_ratio": 0.5, "num_classes": 3},
        },
    ]
    plan = difforge.plan(parquet_spec(tmp_path / "s", folder, *steps))  # not refused
    assert plan.step("noisy").columns is None  # unknown until the files are read
    summary = difforge.run(parquet_spec(tmp_path / "s", folder, *steps))
    assert summary.step("noisy").rows_out == 6

    strings = tmp_path / "strings"
    strings.mkdir()
    pq.write_table(good_table(label=["cat", "dog", "emu"] * 2), strings / "a.parquet")
    with pytest.raises(DifforgeError) as err:
        difforge.run(parquet_spec(tmp_path / "s", strings, *steps))
    message = str(err.value)
    assert "step 'noisy' (corrupt.labels)" in message
    assert "column 'label' holds string values, where an integer (class index)" in message


def test_an_empty_input_warns_and_min_rows_fails_it(ray_session, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(good_table().slice(0, 0), folder / "empty.parquet")
    with caplog.at_level(logging.WARNING, logger="difforge"):
        summary = difforge.run(parquet_spec(tmp_path / "s", folder))
    assert summary.step("raw").rows_out == 0
    assert "step raw (ingest.parquet): its output has 0 rows" in caplog.text
    with pytest.raises(DifforgeError, match="wrote 0 rows, fewer than its min_rows: 1"):
        difforge.run(parquet_spec(tmp_path / "t", folder, min_rows=1))
    assert not list((tmp_path / "t").glob("**/_manifest.json"))
