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


def test_scores_from_a_head_filter_with_reasons_and_a_threshold_preview(ray_session, tmp_path):
    """A linear head over the embeddings scores each digit; the filter keeps the scores at or
    above a threshold, rejects the others with their reason, and shows where it decided."""
    import torch
    from mlflow.tracking import MlflowClient

    torch.save({"linear.weight": torch.eye(16)[:1] * 10, "linear.bias": torch.zeros(1)},
               tmp_path / "aesthetic.pt")  # score: 10 x the first embedding coordinate  # fmt: skip
    spec = embedding_pipeline(tmp_path / "storage", tiny_clip(tmp_path / "clip", image_size=16))
    spec["steps"].append(
        {"id": "scored", "op": "curate.score", "inputs": ["embedded"],
         "params": {"column": "aesthetic", "head": str(tmp_path / "aesthetic.pt")}})  # fmt: skip
    first = difforge.run(spec)
    scored = difforge.open_dataset(first.step("scored").uri).to_arrow()
    e = to_numpy(scored.column("embedding"))
    assert np.allclose(scored.column("aesthetic").to_numpy(), 10 * e[:, 0], atol=1e-5)
    median = float(np.median(scored.column("aesthetic").to_numpy()))
    spec["steps"].append({"id": "good", "op": "curate.filter", "inputs": ["scored"],
                          "params": {"min_score": {"aesthetic": median}}})  # fmt: skip
    summary = difforge.run(spec)
    assert summary.step("scored").cached
    good = summary.step("good")
    below = int((scored.column("aesthetic").to_numpy() < median).sum())
    assert 100 < below < 200 and good.rows_out == 300 - below
    rejects = difforge.open_dataset(f"{good.uri}/rejects").to_arrow()
    assert set(rejects.column("reason").to_pylist()) == {"min_score.aesthetic"}
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(good.run_id)
    assert run.data.metrics["removed_by_min_score.aesthetic"] == below
    shown = {a.path for a in client.list_artifacts(good.run_id)}
    assert {"aesthetic_histogram.png", "aesthetic_threshold.png"} <= shown
    assert "aesthetic_histogram.png" in {a.path for a in client.list_artifacts(
        first.step("scored").run_id)}  # fmt: skip
