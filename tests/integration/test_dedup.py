"""Deduplication finds planted exact and near duplicates and keeps distinct images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

import difforge
from difforge.platform.dedup import DedupOperator


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A distinct natural-looking image: random low-frequency colour fields, upsampled."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def plant(root):
    """12 originals under orig/, and under zcopy/ their duplicates of five kinds."""
    (root / "orig").mkdir(parents=True)
    (root / "zcopy").mkdir()
    originals = [smooth_image(s) for s in range(12)]
    for i, img in enumerate(originals):
        img.save(root / "orig" / f"{i:02d}.png")
    (root / "zcopy" / "bytes.png").write_bytes((root / "orig" / "00.png").read_bytes())
    originals[1].save(root / "zcopy" / "pixels.png", compress_level=9)  # same pixels, new bytes
    originals[2].resize((80, 80), Image.Resampling.BILINEAR).save(root / "zcopy" / "resized.png")
    buf = io.BytesIO()
    originals[3].save(buf, format="JPEG", quality=85)
    (root / "zcopy" / "jpeg.jpg").write_bytes(buf.getvalue())
    ImageEnhance.Brightness(originals[4]).enhance(1.06).save(root / "zcopy" / "bright.png")
    return {
        "zcopy/bytes.png": "orig/00.png",
        "zcopy/pixels.png": "orig/01.png",
        "zcopy/resized.png": "orig/02.png",
        "zcopy/jpeg.jpg": "orig/03.png",
        "zcopy/bright.png": "orig/04.png",
    }


def run(tmp_path, op, params=None, ref=None):
    steps = [{"id": "raw", "op": "ingest.images", "params": {"path": str(tmp_path / "imgs")}}]
    inputs = ["raw"]
    if ref:
        steps.append({"id": "ref", "op": "ingest.images", "params": {"path": str(ref)}})
        inputs.append("ref")
    steps.append({"id": "dedup", "op": op, "inputs": inputs, "params": params or {}})
    spec = {"name": "dedup", "storage": str(tmp_path / "s"), "steps": steps}
    summary = difforge.run(spec)
    uri = summary.step("dedup").uri
    kept = difforge.open_dataset(uri).to_arrow()
    dups = difforge.open_dataset(f"{uri}/duplicates").to_arrow().to_pylist()
    return kept, {d["id"]: d for d in dups}, summary


@pytest.fixture(params=["one task", "shuffle"])
def strategy(request, monkeypatch):
    """Small inputs group in one task; large ones through Ray Data's shuffle: same results."""
    if request.param == "shuffle":
        from difforge.operators.curate.dedup_exact import DedupExact

        for cls in (DedupOperator, DedupExact):  # the exact dedup's own bound too
            monkeypatch.setattr(cls, "single_task_rows", 0)
    return request.param


def test_exact_dedup_drops_byte_and_pixel_copies(ray_session, tmp_path, strategy):
    plant(tmp_path / "imgs")
    kept, dups, _ = run(tmp_path, "curate.dedup_exact")
    assert set(dups) == {"zcopy/bytes.png", "zcopy/pixels.png"}
    assert dups["zcopy/bytes.png"]["duplicate_of"] == "orig/00.png"
    assert dups["zcopy/bytes.png"]["kind"] == "bytes"
    assert (dups["zcopy/pixels.png"]["duplicate_of"], dups["zcopy/pixels.png"]["kind"]) == (
        "orig/01.png",
        "pixels",
    )
    assert kept.num_rows == 15


def test_near_dedup_finds_resized_reencoded_brightened_copies(ray_session, tmp_path, strategy):
    planted = plant(tmp_path / "imgs")
    kept, dups, summary = run(tmp_path, "curate.dedup_near")
    assert {k: v["duplicate_of"] for k, v in dups.items()} == planted
    ids = set(kept.column("id").to_pylist())
    assert ids == {f"orig/{i:02d}.png" for i in range(12)}  # every distinct image kept
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.tracking_uri)
    assert "near_duplicates.png" in {
        a.path for a in client.list_artifacts(summary.step("dedup").run_id)
    }


def test_near_dedup_against_a_reference_flags_overlaps(ray_session, tmp_path):
    plant(tmp_path / "imgs")
    ref = tmp_path / "eval"
    ref.mkdir()
    smooth_image(3).save(ref / "held-out-3.png")
    smooth_image(99).save(ref / "unrelated.png")
    kept, dups, _ = run(tmp_path, "curate.dedup_near", {"action": "flag"}, ref)
    assert kept.num_rows == 17  # flag mode keeps every row
    flagged = {r["id"]: r["near_duplicate_id"] for r in kept.to_pylist() if r["near_duplicate"]}
    assert flagged == {"orig/03.png": "held-out-3.png", "zcopy/jpeg.jpg": "held-out-3.png"}
    assert set(dups) == set(flagged)
