"""The example plugin's own tests: difforge's conformance kit, then a real pipeline."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from difforge_example.brightness import MinBrightness

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
