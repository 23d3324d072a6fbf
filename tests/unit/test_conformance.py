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
from difforge.platform.operator import (
    Columns,
    MapOperator,
    ModelMap,
    output_columns,
    output_metadata,
    required_columns,
)
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

    def columns(self):
        return Columns(writes={"n"})

    def process(self, batch):
        return batch.append_column("n", pa.array(range(batch.num_rows)))


class Liar(MapOperator):
    """Declares a column it never writes."""

    name = "test.liar"
    Params = P

    def columns(self):
        return Columns(writes={"score"})

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


class Brightest(ModelMap):
    """Marks each image's brightest pixel value, with a lookup table built once per actor."""

    name = "test.brightest"
    Params = P
    loads = 0

    def columns(self):
        return Columns(reads={"id", "image"}, writes={"brightest"})

    def load(self, ctx):
        type(self).loads += 1
        return {v: v / 255 for v in range(256)}  # the "model": a table

    def process(self, batch):
        from difforge.platform.imaging import decode

        values = []
        for data in batch.column("image").to_pylist():
            try:
                values.append(self.model[max(decode(data).convert("L").getdata())])
            except Exception:  # noqa: BLE001 - an undecodable sample image
                values.append(None)
        return batch.append_column("brightest", pa.array(values, pa.float64()))


def test_a_model_holding_map_needs_a_handful_of_names(tmp_path, sample):
    """ModelMap: name, Params, columns, load and process; `load` once per actor (the kit sets
    one up per run it checks), the model is `self.model`, and it runs as an actor pool."""
    out = check_map_operator(Brightest, {}, sample, tmp_path)
    assert out["main"].column("brightest")[0].as_py() == pytest.approx(240 / 255)  # 15 x 16
    assert Brightest.loads == 3 and Brightest.stateful  # a pool of actors, each loads once
    own = {n for n in vars(Brightest) if not n.startswith("_")} - {"loads"}
    assert own == {"name", "Params", "columns", "load", "process"}


def test_the_former_contract_still_works_and_says_what_replaces_it(tmp_path, sample):
    """Operators written for the earlier contract (`reads`/`writes`, `output_columns`,
    `metadata()` without inputs, `ctx.tracker`) keep working for one release, each spelling
    with a DeprecationWarning naming the new one."""
    with pytest.warns(DeprecationWarning, match=r"former contract \(reads: columns\(\).*"):

        class Old(MapOperator):
            """Tags rows, the former way."""

            name = "test.old"
            Params = P
            reads = ("id",)
            writes = ("tag",)

            def metadata(self):
                return {"tagged": True}

            def process(self, batch):
                return batch.append_column("tag", pa.array(["t"] * batch.num_rows))

    out = check_map_operator(Old, {}, sample, tmp_path)
    assert out["main"].column("tag")[0].as_py() == "t"
    op = Old(P())
    assert required_columns(op) == {"id"}
    assert output_columns(op, [{"id", "image"}]) == {"id", "image", "tag"}
    assert output_metadata(op, []) == {"tagged": True}
    from difforge.platform.context import FinalizeContext
    from difforge.platform.events import NullLog

    ctx = FinalizeContext(step="s", pipeline="p", log=NullLog())
    with pytest.warns(DeprecationWarning, match="ctx.tracker is the former spelling of ctx.log"):
        assert ctx.tracker is ctx.log
    with pytest.warns(DeprecationWarning, match="former spelling of ctx.log.log_metrics"):
        ctx.log_metrics({"x": 1.0})


def test_columns_declare_what_a_map_drops_renames_and_a_job_replaces():
    """One declaration, `columns()`, for what planning checks and passes on."""
    from difforge.operators.caption.vlm import CaptionVLM
    from difforge.operators.encode.vae import EncodeVAE
    from difforge.operators.train.classifier import Classifier

    vae = EncodeVAE(EncodeVAE.Params())
    assert output_columns(vae, [{"id", "image", "label"}]) == {"id", "label", "latent"}
    vlm = CaptionVLM(CaptionVLM.Params.model_construct(prompt="a {class}"))
    assert required_columns(vlm) == {"id", "image", "label"}
    assert output_columns(vlm, [{"id", "image", "caption"}]) == {
        "id",
        "image",
        "caption",
        "original_caption",
    }
    assert output_columns(vlm, [{"id", "image"}]) == {"id", "image", "caption"}
    trained = output_columns(Classifier(Classifier.Params()), [{"id", "image", "label"}])
    assert trained == {"id", "model_uri", "kind", "accuracy", "num_classes"}
    assert output_columns(vae, [None]) is None  # unknown input: unknown output
