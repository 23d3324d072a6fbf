"""Curation and slight corruption on real, deliberately broken, data."""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import difforge
from difforge.platform.errors import DifforgeError


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def huge_header_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A real PNG whose header claims an enormous size (a decompression bomb's signature)."""
    data = bytearray(png_bytes(Image.new("L", (4, 4))))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def make_bad_folder(root):
    """Good images plus every kind of bad file curation must account for."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(root / f"good{i}.png")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(jpeg, format="JPEG")
    (root / "good.jpg").write_bytes(jpeg.getvalue())
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    full = png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8)))
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    (root / "bomb.png").write_bytes(huge_header_png())
    Image.new("CMYK", (8, 8), (0, 50, 100, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "deep16.png")
    frames = [Image.new("P", (8, 8), c) for c in (1, 2, 3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("L", (40, 4)).save(root / "wide.png")
    return {
        "truncated.jpg": "truncated",
        "truncated.png": "truncated",
        "empty.png": "zero_bytes",
        "text.png": "not_an_image",
        "bomb.png": "too_large",
        "cmyk.jpg": "unsupported_mode",
        "deep16.png": "unsupported_mode",
        "wide.png": "bad_aspect",
    }


def curate_spec(tmp_path, folder, **validate):
    return {
        "name": "curate",
        "storage": str(tmp_path / "s"),
        "tracking": {"experiment": "curate-tests"},
        "steps": [
            {"id": "raw", "op": "ingest.images", "params": {"path": str(folder)}},
            {
                "id": "clean",
                "op": "curate.validate",
                "inputs": ["raw"],
                "params": {"max_pixels": 1_000_000, "max_aspect_ratio": 4, **validate},
            },
        ],
    }


def test_validate_accounts_for_every_bad_file(ray_session, tmp_path):
    expected = make_bad_folder(tmp_path / "bad")
    summary = difforge.run(curate_spec(tmp_path, tmp_path / "bad"))
    clean = summary.step("clean")
    kept = difforge.open_dataset(clean.uri).to_arrow()
    rejects = difforge.open_dataset(f"{clean.uri}/rejects").to_arrow()
    reasons = dict(
        zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist(), strict=True)
    )
    assert reasons == expected
    assert sorted(kept.column("id").to_pylist()) == sorted(
        ["animated.gif", "good.jpg", *(f"good{i}.png" for i in range(6))]
    )
    assert kept.num_rows + rejects.num_rows == 16  # all accounted for
    originals = {r["id"]: r["image"] for r in rejects.to_pylist()}
    assert originals["truncated.jpg"] == (tmp_path / "bad" / "truncated.jpg").read_bytes()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.tracking_uri)
    metrics = client.get_run(clean.run_id).data.metrics
    assert metrics["rejected_truncated"] == 2 and metrics["rejected_unsupported_mode"] == 2
    assert metrics["rejected_too_large"] == 1 and metrics["rows_rejects"] == 8
    assert "rejects.png" in {a.path for a in client.list_artifacts(clean.run_id)}


def test_validate_converts_modes_when_asked(ray_session, tmp_path):
    make_bad_folder(tmp_path / "bad")
    summary = difforge.run(curate_spec(tmp_path, tmp_path / "bad", convert_to="RGB"))
    kept = difforge.open_dataset(summary.step("clean").uri).to_arrow().to_pylist()
    by_id = {r["id"]: r for r in kept}
    assert by_id["cmyk.jpg"]["mode"] == "RGB" and by_id["cmyk.jpg"]["format"] == "png"
    assert by_id["deep16.png"]["mode"] == "RGB"


def test_validate_fails_the_step_above_the_reject_threshold(ray_session, tmp_path):
    make_bad_folder(tmp_path / "bad")
    spec = curate_spec(tmp_path, tmp_path / "bad", max_reject_fraction=0.25)
    with pytest.raises(DifforgeError, match=r"rejected 8 of 16 images \(50%"):
        difforge.run(spec)
    plan = difforge.plan(spec)
    assert not plan.step("clean").cached  # nothing committed
    assert difforge.open_dataset(f"{plan.step('clean').uri}/rejects").num_rows == 8


def test_filter_reports_what_each_filter_removed(ray_session, tmp_path):
    spec = {
        "name": "filt",
        "storage": str(tmp_path / "s"),
        "steps": [
            {"id": "raw", "op": "ingest.digits"},
            {"id": "f", "op": "curate.filter", "inputs": ["raw"], "params": {"labels": [0, 1]}},
        ],
    }
    summary = difforge.run(spec)
    kept = difforge.open_dataset(summary.step("f").uri).to_arrow()
    assert set(kept.column("label").to_pylist()) == {0, 1}
    assert summary.step("f").side_rows["rejects"] == 1797 - kept.num_rows
    with pytest.raises(DifforgeError, match="needs column"):
        difforge.plan(
            {
                **spec,
                "steps": [
                    spec["steps"][0],
                    {
                        "id": "f",
                        "op": "curate.filter",
                        "inputs": ["raw"],
                        "params": {"min_caption_words": 2},
                    },
                ],
            }
        )


def corruption_spec(tmp_path, batch_size: int, eta: float = 0.1, seed: int = 0):
    return {
        "name": "corrupt",
        "storage": str(tmp_path / f"s{batch_size}"),
        "steps": [
            {
                "id": "raw",
                "op": "ingest.fashion_mnist",
                "params": {"limit": 10000},
                "resources": {"batch_size": batch_size},
            },
            {
                "id": "noisy",
                "op": "corrupt.labels",
                "inputs": ["raw"],
                "params": {"corruption_ratio": eta, "seed": seed},
                "resources": {"batch_size": batch_size // 3},
            },
        ],
    }


def test_label_corruption_is_deterministic_and_achieves_its_ratio(ray_session, tmp_path):
    a = difforge.run(corruption_spec(tmp_path, 1000))
    b = difforge.run(corruption_spec(tmp_path, 4000))  # other shards, other batches
    ta = difforge.open_dataset(a.step("noisy").uri)
    tb = difforge.open_dataset(b.step("noisy").uri)
    assert len(ta.manifest.files) != len(tb.manifest.files)
    rows_a = {r["id"]: r for r in ta.to_arrow(columns=["id", "label", "label_clean"]).to_pylist()}
    rows_b = {r["id"]: r for r in tb.to_arrow(columns=["id", "label", "label_clean"]).to_pylist()}
    assert rows_a == rows_b
    flipped = [r for r in rows_a.values() if r["label"] != r["label_clean"]]
    # eta = 0.1 of 10,000 rows: 1,000 expected, sd 30; allow 4 sd
    assert abs(len(flipped) - 1000) < 120
    # flips go uniformly to the *other* classes
    assert all(0 <= r["label"] < 10 for r in flipped)
    targets = Counter((r["label"] - r["label_clean"]) % 10 for r in flipped)
    assert set(targets) == set(range(1, 10))
    assert ta.metadata["corruption"]["corruption_ratio"] == 0.1
    assert ta.metadata["classes"][0] == "T-shirt/top"  # upstream metadata flows through
    from mlflow.tracking import MlflowClient

    m = MlflowClient(a.tracking_uri).get_run(a.step("noisy").run_id).data.metrics
    assert m["achieved_corruption_ratio"] == pytest.approx(len(flipped) / 10000)


def test_asymmetric_corruption_by_class_map(ray_session, tmp_path):
    spec = corruption_spec(tmp_path, 2000, eta=0.5)
    spec["steps"][1]["params"]["class_map"] = {0: 6, 6: 0}
    summary = difforge.run(spec)
    rows = difforge.open_dataset(summary.step("noisy").uri).to_arrow().to_pylist()
    flipped = [(r["label_clean"], r["label"]) for r in rows if r["corrupted"]]
    assert flipped and set(flipped) == {(0, 6), (6, 0)}
