"""The example plugin's own tests: difforge's conformance kit, then a real pipeline."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from difforge_example.brightness import MinBrightness
from difforge_example.sharpness import Sharpness

from difforge.platform.imaging import encode_png
from difforge.testing import check_map_operator


def images() -> pa.Table:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 10 if i % 3 == 0 else 255, (8, 8), np.uint8) for i in range(12)]
    return pa.table(
        {"id": [f"img{i}" for i in range(12)], "image": [encode_png(a) for a in arrays]}
    )


def test_it_conforms_to_the_operator_contract(tmp_path):
    out = check_map_operator(MinBrightness, {"threshold": 20}, images(), tmp_path)
    assert out["main"].num_rows == 8
    assert set(out["rejects"].column("reason").to_pylist()) == {"too_dark"}


def test_sharpness_conforms_and_scores_a_blurred_image_lower(tmp_path):
    from PIL import Image, ImageFilter

    out = check_map_operator(Sharpness, {}, images(), tmp_path)
    assert out["main"].column("sharpness").null_count == 0
    sharp = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32), np.uint8))
    blurred = sharp.filter(ImageFilter.GaussianBlur(2))
    table = pa.table(
        {"id": ["s", "b"], "image": [encode_png(np.asarray(im)) for im in (sharp, blurred)]}
    )
    scored = check_map_operator(Sharpness, {"column": "score"}, table, tmp_path / "two")
    s, b = scored["main"].column("score").to_pylist()
    assert s > 10 * b
