"""`sample.plan`: one row per image to draw (index, seed, class label, guidance scale),
written in small shards so a sampler pool works on them in parallel and resumes per shard."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.operator import MAIN, JobOperator, JobResult
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    from difforge.platform.context import JobContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(ge=1, description="images to draw (split evenly over the classes)")
    classes: list[int] | None = Field(None, description="default: every class of the model")
    guidance_scales: list[float] = Field([2.0], min_length=1,
                                         description="each image is drawn at each scale")  # fmt: skip
    seed: int = 0
    rows_per_shard: int = Field(256, ge=1, description="the unit of parallel work and of resume")


class SamplePlan(JobOperator):
    """Plans N class-balanced samples of a trained model: index, seed, label, guidance_scale."""

    name = "sample.plan"
    version = 1
    Params = Params
    reads = (C.MODEL_URI,)
    resources = Resources(num_cpus=0.1)

    @classmethod
    def output_columns(cls, params, input_columns):
        return {C.ID, "index", "seed", C.LABEL, "guidance_scale", C.MODEL_URI}

    def run(self, ctx: JobContext) -> JobResult:
        import pyarrow as pa

        p = self.params
        model = ctx.inputs[0].to_arrow().to_pylist()[0]
        info = ctx.inputs[0].metadata.get("model", {})
        num_classes = info.get("num_classes") or 0
        classes = p.classes if p.classes is not None else list(range(num_classes)) or [-1]
        rows = []
        for g in p.guidance_scales:
            for i in range(p.num_images):
                index = len(rows)
                rows.append({C.ID: f"sample-{index:07d}", "index": index, "seed": p.seed * 10**7 + i,
                             C.LABEL: classes[i % len(classes)], "guidance_scale": g,
                             C.MODEL_URI: model[C.MODEL_URI]})  # fmt: skip
        schema = pa.schema([(C.ID, pa.string()), ("index", pa.int64()), ("seed", pa.int64()),
                            (C.LABEL, pa.int64()), ("guidance_scale", pa.float64()),
                            (C.MODEL_URI, pa.string())])  # fmt: skip
        entries = []
        for s in range(0, len(rows), p.rows_per_shard):
            table = pa.Table.from_pylist(rows[s : s + p.rows_per_shard], schema=schema)
            entries.append(ctx.outputs[MAIN].write(table, f"{s // p.rows_per_shard:06d}"))
        return JobResult(entries={MAIN: entries}, metadata={"model": info})
