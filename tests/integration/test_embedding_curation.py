"""Curation with embeddings through Ray: semantic dedup and decontamination on planted
near-copies, and the shipped embedding curation pipeline on real images with tiny models."""

from __future__ import annotations

import numpy as np
from mlflow.tracking import MlflowClient

import difforge
from difforge.platform.tensors import to_numpy
from tests.tiny_models import tiny_clip


def test_semantic_dedup_finds_planted_copies_and_decontamination_the_reference(
    ray_session, tmp_path
):
    """2,000 embeddings with 400 planted near-copies through Ray (k-means on a sample, rows
    assigned in parallel, clusters compared): the copies go, with what they copy; then the
    training rows near a reference set go too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from difforge.platform.tensors import to_column
    from tests.unit.test_embeddings import planted

    ids, e, copy_of = planted()
    (tmp_path / "emb").mkdir()
    pq.write_table(pa.table({"id": ids, "embedding": to_column(e)}), tmp_path / "emb" / "a.parquet")
    (tmp_path / "ref").mkdir()  # an "evaluation set": 30 originals, slightly moved
    held = sorted(set(ids[:1600]))[:30]
    moved = e[:30] + np.random.default_rng(1).normal(scale=0.01, size=(30, e.shape[1]))
    pq.write_table(
        pa.table(
            {
                "id": [f"eval{i}" for i in range(30)],
                "embedding": to_column(moved.astype(np.float32)),
            }
        ),
        tmp_path / "ref" / "a.parquet",
    )
    spec = {
        "name": "semdedup",
        "storage": str(tmp_path / "storage"),
        "steps": [
            {
                "id": "raw",
                "op": "ingest.parquet",
                "params": {"path": str(tmp_path / "emb"), "id_column": "id"},
            },
            {
                "id": "eval",
                "op": "ingest.parquet",
                "params": {"path": str(tmp_path / "ref"), "id_column": "id"},
            },
            {
                "id": "unique",
                "op": "curate.semantic_dedup",
                "inputs": ["raw"],
                "params": {"threshold": 0.95, "sample_rows": 1000},
            },
            {"id": "clean", "op": "curate.decontaminate", "inputs": ["unique", "eval"]},
        ],
    }
    summary = difforge.run(spec)
    unique = summary.step("unique")
    found = difforge.open_dataset(f"{unique.uri}/duplicates").to_arrow()
    pairs = dict(zip(found["id"].to_pylist(), found["duplicate_of"].to_pylist(), strict=True))
    hits = sum(pairs.get(c) == o for c, o in copy_of.items())
    assert hits >= 0.98 * len(copy_of), hits  # recall: copies split from their original by a
    assert set(pairs) <= set(copy_of)  # cluster boundary are missed; precision: nothing else
    assert unique.rows_out == 2000 - len(pairs)
    clean = summary.step("clean")
    gone = difforge.open_dataset(f"{clean.uri}/duplicates").to_arrow()
    assert set(gone["id"].to_pylist()) == set(held)  # the originals evaluated on; their copies
    assert clean.rows_out == unique.rows_out - 30  # went in the step before


def test_the_embedding_curation_pipeline_accounts_for_every_image(ray_session, tmp_path):
    """pipelines/curate-embeddings.yaml as shipped, on a folder of real digits with planted
    exact copies and a broken file, offline with tiny models: each image ends in the output
    or in one side output, with its reason."""
    from pathlib import Path

    from PIL import Image
    from sklearn.datasets import load_digits

    from tests.tiny_models import tiny_captioner

    digits = load_digits()
    sidecar = ["file,caption"]
    for i in range(60):
        folder = tmp_path / "images" / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(folder / f"{i}.png")
        sidecar.append(f"{digits.target[i]}/{i}.png,handwritten {digits.target[i]}")
    for i in range(5):  # exact copies
        src = next((tmp_path / "images").rglob(f"{i}.png"))
        (src.parent / f"copy{i}.png").write_bytes(src.read_bytes())
    (tmp_path / "images" / "0" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "captions.csv").write_text("\n".join(sidecar) + "\n")
    # the watermark scores the pipeline should give, computed here without Ray: its threshold
    # goes at their median, so that the filter keeps some and rejects some
    from difforge.models.features import Extractor, FeatureSpec
    from difforge.operators.curate.score import TextSide

    clip = tiny_clip(tmp_path / "clip", image_size=16)
    files = sorted((tmp_path / "images").rglob("[0-9]*.png"))
    e, _ = Extractor(FeatureSpec("transformers", clip, mode="RGB", normalize=True))(
        [f.read_bytes() for f in files]
    )
    expected = TextSide(clip, ["a photo with a watermark", "a photo"])(e)
    median = float(np.median(expected))
    root = Path(__file__).resolve().parents[2]
    summary = difforge.run(
        str(root / "pipelines" / "curate-embeddings.yaml"),
        [
            f"storage={tmp_path / 'storage'}",
            f"raw.params.path={tmp_path / 'images'}",
            f"raw.params.sidecar={tmp_path / 'captions.csv'}",
            f"embedded.params.model={clip}",
            f"kept.params.max_score.watermark={median}",
            f"captioned.params.model={tiny_captioner(tmp_path / 'captioner')}",
            "captioned.params.max_new_tokens=4",
            "images.params.size=32",
        ],
    )
    rows = {s.step: s.rows_out for s in summary.steps}
    sides = {s.step: s.side_rows for s in summary.steps}
    assert rows["raw"] == 66 and sides["clean"]["rejects"] == 1
    assert sides["unique"]["duplicates"] == 5
    assert rows["semantic"] == 60 - sides["semantic"]["duplicates"]
    kept = summary.step("kept")
    assert 0 < sides["kept"]["rejects"] < rows["semantic"]
    assert rows["kept"] == rows["semantic"] - sides["kept"]["rejects"]
    assert rows["images"] == rows["captioned"] == rows["kept"]
    scored = difforge.open_dataset(summary.step("scored").uri).to_arrow()
    by_file = dict(zip([f.name for f in files], expected.tolist(), strict=True))
    for source, w in zip(
        scored.column("source").to_pylist(), scored.column("watermark").to_pylist(), strict=True
    ):
        assert abs(w - by_file[Path(source).name]) < 1e-4  # what CLIP's zero-shot gives
    rejects = difforge.open_dataset(f"{kept.uri}/rejects").to_arrow()
    assert set(rejects.column("reason").to_pylist()) == {"max_score.watermark"}
    client = MlflowClient(summary.tracking_uri)
    assert client.get_run(kept.run_id).data.metrics["removed_by_max_score.watermark"] == len(
        rejects
    )
    assert {"watermark_histogram.png", "watermark_threshold.png"} <= {
        a.path for a in client.list_artifacts(kept.run_id)
    }
    embedded = difforge.open_dataset(summary.step("embedded").uri)
    e = to_numpy(embedded.to_arrow().column("embedding"))
    assert e.shape == (60, 16) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    meta = embedded.metadata["embedding"]
    assert meta["kind"] == "transformers" and meta["architecture"] == "clip"
    assert meta["preprocessing"]["crop_size"] == {"height": 16, "width": 16}
    assert len(meta["weights_sha256"]) == 64 and meta["normalize"] is True
    out = difforge.open_dataset(summary.step("images").uri).to_arrow()
    assert {"caption", "original_caption", "embedding", "watermark"} <= set(out.column_names)
    assert all(c.startswith("handwritten ") for c in out.column("original_caption").to_pylist())
    assert all(c for c in out.column("caption").to_pylist())
    assert max(out.column("watermark").to_pylist()) <= median
