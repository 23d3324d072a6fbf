"""The conformance kit on the built-in map operators (what plugin authors run on theirs), and
on operators that break the contract, each caught with the rule it breaks."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import BaseModel, ConfigDict

from difforge.operators.corrupt.labels import Labels
from difforge.operators.curate.filter import Filter
from difforge.operators.curate.validate import Validate
from difforge.operators.image.resize import Resize
from difforge.platform.fusion import plain_map
from difforge.platform.imaging import encode_png
from difforge.platform.operator import MapOperator
from difforge.testing import ConformanceError, check_map_operator


@pytest.fixture(scope="module")
def sample() -> pa.Table:
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [encode_png((d.images[i] * 16).astype(np.uint8)) for i in range(10)]
    images[3] = b"not an image"
    return pa.table(
        {
            "id": [f"d{i}" for i in range(10)],
            "image": images,
            "format": ["png"] * 10,
            "width": pa.array([8] * 10, pa.int32()),
            "height": pa.array([8] * 10, pa.int32()),
            "mode": ["L"] * 10,
            "label": pa.array(d.target[:10], pa.int64()),
        }
    )


@pytest.mark.parametrize(
    "op, params",
    [
        (Validate, {}),
        (Filter, {"labels": [0, 1, 2, 3, 4]}),
        (Resize, {"size": 4, "method": "pad"}),
        (Labels, {"corruption_ratio": 0.5, "num_classes": 10}),
    ],
)
def test_built_in_map_operators_conform(tmp_path, sample, op, params):
    out = check_map_operator(op, params, sample, tmp_path)
    assert out["main"].num_rows > 0


class Loose(BaseModel):
    k: int = 1


class Sloppy(MapOperator):
    """Accepts any param."""

    name = "test.sloppy"
    Params = Loose


class P(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counter(MapOperator):
    """Numbers rows per batch: depends on how the input is sliced."""

    name = "test.counter"
    Params = P
    writes = ("n",)

    def process(self, batch):
        return batch.append_column("n", pa.array(range(batch.num_rows)))


class Liar(MapOperator):
    """Declares a column it never writes."""

    name = "test.liar"
    Params = P
    writes = ("score",)

    def process(self, batch):
        return batch


class Peeker(MapOperator):
    """Reads its whole input in setup, without saying so: breaks when fused."""

    name = "test.peeker"
    Params = P

    def setup(self, ctx):
        self.total = ctx.input(0).num_rows

    def process(self, batch):
        return batch


class DeclaredPeeker(Peeker):
    """The same, declared: runs in a pass of its own, and conforms."""

    name = "test.declared_peeker"
    reads_whole_input = True


def test_an_operator_that_reads_its_input_whole_says_so(tmp_path, sample):
    check_map_operator(DeclaredPeeker, {}, sample, tmp_path)
    assert plain_map(Peeker) and not plain_map(DeclaredPeeker)  # never fused with its input


@pytest.mark.parametrize(
    "op, rule",
    [
        (Sloppy, "Params accept unknown fields"),
        (Peeker, "cannot be set up in a fused pass.*reads_whole_input = True"),
        (Counter, "differs when the input comes in slices of 3 rows"),
        (Liar, "declares columns .*score.* but writes"),
    ],
)
def test_contract_breakers_are_named_with_their_rule(tmp_path, sample, op, rule):
    with pytest.raises(ConformanceError, match=rule):
        check_map_operator(op, {}, sample, tmp_path)
