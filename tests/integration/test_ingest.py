"""Ingesting image folders and Parquet datasets; a bad image goes to rejects with its reason."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import difforge
from difforge.platform.imaging import encode_png


def make_folder(root):
    for cls, shade in (("cats", 40), ("dogs", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 10), (shade, i, 0)).save(root / cls / f"{i}.png")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("ignored: not an image extension")
    sidecar = root.parent / "captions.jsonl"
    sidecar.write_text(
        "\n".join(json.dumps({"file": f"cats/{i}.png", "caption": f"cat {i}"}) for i in range(3))
    )
    return sidecar


def test_image_folder_with_labels_captions_and_rejects(ray_session, tmp_path):
    sidecar = make_folder(tmp_path / "imgs")
    spec = {
        "name": "folder",
        "storage": str(tmp_path / "s"),
        "steps": [
            {
                "id": "raw",
                "op": "ingest.images",
                "params": {
                    "path": str(tmp_path / "imgs"),
                    "labels": "folders",
                    "sidecar": str(sidecar),
                },
            },
            {
                "id": "sized",
                "op": "image.resize",
                "inputs": ["raw"],
                "params": {"size": 16, "mode": "L"},
            },
        ],
    }
    summary = difforge.run(spec)
    raw = difforge.open_dataset(summary.step("raw").uri)
    assert raw.num_rows == 7 and raw.metadata["classes"] == ["cats", "dogs"]
    rows = {r["id"]: r for r in raw.to_arrow().to_pylist()}
    assert rows["cats/1.png"]["label"] == 0 and rows["dogs/0.png"]["label"] == 1
    assert rows["cats/1.png"]["caption"] == "cat 1" and rows["dogs/0.png"]["caption"] is None
    assert (rows["cats/1.png"]["width"], rows["cats/1.png"]["mode"]) == (21, "RGB")
    assert rows["dogs/broken.png"]["format"] is None  # kept, with its bytes, for curation
    sized = summary.step("sized")
    assert sized.rows_out == 6 and sized.side_rows == {"rejects": 1}
    rejects = difforge.open_dataset(f"{sized.uri}/rejects").to_arrow().to_pylist()
    assert rejects[0]["id"] == "dogs/broken.png"
    assert "cannot decode" in rejects[0]["reason"]
    assert rejects[0]["image"] == (tmp_path / "imgs/dogs/broken.png").read_bytes()  # nothing lost
    # a side output is an input like any other
    plan = difforge.plan(
        {
            **spec,
            "steps": [
                *spec["steps"],
                {
                    "id": "again",
                    "op": "image.resize",
                    "inputs": ["sized.rejects"],
                    "params": {"size": 8},
                },
            ],
        }
    )
    assert plan.step("again").inputs[0].uri == f"{sized.uri}/rejects"


def test_parquet_source_with_mapped_columns(ray_session, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for part in range(2):
        pq.write_table(
            pa.table(
                {
                    "key": [f"k{part}-{i}" for i in range(5)],
                    "png": [encode_png(Image.new("L", (9, 9), i * 20)) for i in range(5)],
                    "cls": [i % 2 for i in range(5)],
                }
            ),
            src / f"part-{part}.parquet",
        )
    spec = {
        "name": "pq",
        "storage": str(tmp_path / "s"),
        "steps": [
            {
                "id": "raw",
                "op": "ingest.parquet",
                "params": {
                    "path": str(src),
                    "columns": {"png": "image", "cls": "label"},
                    "id_column": "key",
                },
            },
            {"id": "clf_input", "op": "image.resize", "inputs": ["raw"], "params": {"size": 8}},
        ],
    }
    summary = difforge.run(spec)
    table = difforge.open_dataset(summary.step("raw").uri).to_arrow()
    assert sorted(table.column_names) == [
        "format",
        "height",
        "id",
        "image",
        "label",
        "mode",
        "width",
    ]
    assert sorted(table.column("id").to_pylist())[:2] == ["k0-0", "k0-1"]
    assert set(table.column("width").to_pylist()) == {9}
    assert summary.step("clf_input").rows_out == 10
