"""Curation with embeddings on real images through Ray: `encode.image` embeds every digit
with a vision model the user names, and which weights embedded is part of the step's identity."""

from __future__ import annotations

import numpy as np

import difforge
from difforge.platform.tensors import to_numpy
from tests.tiny_models import tiny_clip


def embedding_pipeline(storage, model: str) -> dict:
    return {
        "name": "embed",
        "storage": str(storage),
        "tracking": {"experiment": "embedding-tests"},
        "steps": [
            {"id": "raw", "op": "ingest.digits", "params": {"limit": 300}},
            {"id": "embedded", "op": "encode.image", "inputs": ["raw"],
             "params": {"model": model}, "resources": {"batch_size": 100}},
        ],
    }  # fmt: skip


def test_every_image_gets_a_unit_embedding_and_new_weights_embed_anew(ray_session, tmp_path):
    clip = tiny_clip(tmp_path / "clip", image_size=16)
    first = difforge.run(embedding_pipeline(tmp_path / "storage", clip))
    ds = difforge.open_dataset(first.step("embedded").uri)
    table = ds.to_arrow()
    e = to_numpy(table.column("embedding"))
    assert e.shape == (300, 16) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert "image" in table.column_names and table.column("label").to_pylist()[:3] == [0, 1, 2]
    meta = ds.metadata["embedding"]
    assert meta["kind"] == "transformers" and meta["architecture"] == "clip"
    assert meta["preprocessing"]["crop_size"] == {"height": 16, "width": 16}
    assert len(meta["weights_sha256"]) == 64 and meta["normalize"] is True

    again = difforge.run(embedding_pipeline(tmp_path / "storage", clip))
    assert again.step("embedded").cached
    tiny_clip(tmp_path / "clip", image_size=16, seed=1)  # the same folder, other weights
    retrained = difforge.run(embedding_pipeline(tmp_path / "storage", clip))
    assert retrained.step("raw").cached and not retrained.step("embedded").cached
    e2 = to_numpy(difforge.open_dataset(retrained.step("embedded").uri).to_arrow()["embedding"])
    assert not np.allclose(e, e2)


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
    pq.write_table(pa.table({"id": [f"eval{i}" for i in range(30)],
                             "embedding": to_column(moved.astype(np.float32))}),
                   tmp_path / "ref" / "a.parquet")  # fmt: skip
    spec = {"name": "semdedup", "storage": str(tmp_path / "storage"), "steps": [
        {"id": "raw", "op": "ingest.parquet",
         "params": {"path": str(tmp_path / "emb"), "id_column": "id"}},
        {"id": "eval", "op": "ingest.parquet",
         "params": {"path": str(tmp_path / "ref"), "id_column": "id"}},
        {"id": "unique", "op": "curate.semantic_dedup", "inputs": ["raw"],
         "params": {"threshold": 0.95, "sample_rows": 1000}},
        {"id": "clean", "op": "curate.decontaminate", "inputs": ["unique", "eval"]},
    ]}  # fmt: skip
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
