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
