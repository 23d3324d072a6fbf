"""`sample.plan`: one row per image to draw (index, seed, class label or prompt, guidance
scale), written in small shards so a sampler pool works on them in parallel and resumes per
shard.

A class-conditional model is planned class-balanced. A text-conditional one is planned from
prompts: a `prompts` list, a `prompts_file` (text, one per line, or JSONL with `prompt` and
optionally `negative_prompt` and `label`), or the `caption` column of a second input (held-out
captions, with their labels where the dataset has them, so that evaluation can check the class
each prompt names)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import MAIN, Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    from difforge.platform.context import JobContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_images: int | None = Field(
        None,
        ge=1,
        description="images to draw at each guidance scale: split evenly over the "
        "classes, or over the prompts in turn (default with prompts: each prompt "
        "num_images_per_prompt times)",
    )
    classes: list[int] | None = Field(None, description="default: every class of the model")
    prompts: list[str] | None = Field(None, description="text prompts (a text-conditional model)")
    prompts_file: str | None = Field(
        None,
        description="prompts in a file (local or s3://): one per line, or JSONL with "
        "prompt, negative_prompt, label",
    )
    negative_prompt: str | None = Field(
        None, description="guides away from this text instead of from the null condition"
    )
    num_images_per_prompt: int = Field(1, ge=1)
    guidance_scales: list[float] = Field(
        [2.0], min_length=1, description="each image is drawn at each scale"
    )
    seed: int = 0
    rows_per_shard: int = Field(256, ge=1, description="the unit of parallel work and of resume")


def read_prompts(uri: str) -> list[dict[str, Any]]:
    from difforge.platform.datasets import url_to_fs

    fs, path = url_to_fs(uri)
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise DifforgeError(f"prompts_file {uri}: no such file") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if uri.endswith(".jsonl"):
            try:
                row = json.loads(line)
                rows.append(
                    {
                        "prompt": str(row["prompt"]),
                        "negative_prompt": row.get("negative_prompt"),
                        "label": int(row.get("label", -1)),
                    }
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise DifforgeError(
                    f"prompts_file {uri}:{n}: not a JSON object with a "
                    f"prompt ({type(exc).__name__}: {exc})"
                ) from None
        else:
            rows.append({"prompt": line.strip(), "negative_prompt": None, "label": -1})
    if not rows:
        raise DifforgeError(f"prompts_file {uri}: no prompts in it")
    return rows


class SamplePlan(JobOperator):
    """Plans N samples of a trained model (class-balanced, or from prompts): index, seed,
    label, prompt, guidance_scale."""

    name = "sample.plan"
    version = 2  # 2: prompts (a list, a file, or a caption dataset); prompt columns
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (1, 2)  # the model, and optionally captions to prompt
    resources = Resources(num_cpus=0.1)

    def columns(self) -> Columns:
        plan = {
            C.ID,
            "index",
            "seed",
            C.LABEL,
            "prompt",
            "negative_prompt",
            "guidance_scale",
            C.MODEL_URI,
        }
        return Columns(reads={C.MODEL_URI}, writes=plan, keeps_input=False)

    def external_state(self) -> str | None:
        """A prompts file is read at plan time: its content is part of the fingerprint."""
        if not self.params.prompts_file:
            return None
        import hashlib

        return hashlib.sha256(
            json.dumps(read_prompts(self.params.prompts_file)).encode()
        ).hexdigest()

    def prompts(self, ctx: JobContext) -> list[dict[str, Any]] | None:
        p = self.params
        given = [x for x in (p.prompts, p.prompts_file, len(ctx.inputs) > 1 or None) if x]
        if len(given) > 1:
            raise DifforgeError(
                "sample.plan: give prompts one way (prompts, prompts_file or a "
                "caption dataset as second input)"
            )
        if p.prompts:
            return [{"prompt": t, "negative_prompt": None, "label": -1} for t in p.prompts]
        if p.prompts_file:
            return read_prompts(p.prompts_file)
        if len(ctx.inputs) > 1:
            data = ctx.inputs[1]
            if C.CAPTION not in data.manifest.column_names:
                raise DifforgeError(f"sample.plan: its second input {data.uri} has no caption")
            columns = [C.CAPTION] + ([C.LABEL] if C.LABEL in data.manifest.column_names else [])
            table = data.to_arrow(columns=columns)
            labels = (
                table.column(C.LABEL).to_pylist() if C.LABEL in columns else [-1] * table.num_rows
            )
            return [
                {"prompt": t, "negative_prompt": None, "label": y}
                for t, y in zip(table.column(C.CAPTION).to_pylist(), labels, strict=True)
            ]
        return None

    def run(self, ctx: JobContext) -> JobResult:
        import pyarrow as pa

        p = self.params
        model = ctx.inputs[0].to_arrow().to_pylist()[0]
        info = ctx.inputs[0].metadata.get("model", {})
        prompts = self.prompts(ctx)
        text = info.get("conditioning") == "text"
        if text and prompts is None:
            raise DifforgeError(
                "sample.plan: a text-conditional model needs prompts (prompts, "
                "prompts_file, or a caption dataset as second input)"
            )
        if prompts is not None and not text:
            raise DifforgeError(
                f"sample.plan: prompts given, but the model is conditioned on "
                f"{info.get('conditioning', 'classes')}, not text"
            )
        if prompts is not None:
            n = p.num_images or len(prompts) * p.num_images_per_prompt
            per = [prompts[(i // p.num_images_per_prompt) % len(prompts)] for i in range(n)]
        else:
            if p.num_images is None:
                raise DifforgeError("sample.plan: num_images is needed for a class model")
            num_classes = info.get("num_classes") or 0
            classes = p.classes if p.classes is not None else list(range(num_classes)) or [-1]
            per = [
                {"prompt": None, "negative_prompt": None, "label": classes[i % len(classes)]}
                for i in range(p.num_images)
            ]
        rows = []
        for g in p.guidance_scales:
            for i, what in enumerate(per):
                index = len(rows)
                rows.append(
                    {
                        C.ID: f"sample-{index:07d}",
                        "index": index,
                        "seed": p.seed * 10**7 + i,
                        C.LABEL: what["label"],
                        "prompt": what["prompt"],
                        "negative_prompt": what["negative_prompt"] or p.negative_prompt,
                        "guidance_scale": g,
                        C.MODEL_URI: model[C.MODEL_URI],
                    }
                )
        schema = pa.schema(
            [
                (C.ID, pa.string()),
                ("index", pa.int64()),
                ("seed", pa.int64()),
                (C.LABEL, pa.int64()),
                ("prompt", pa.string()),
                ("negative_prompt", pa.string()),
                ("guidance_scale", pa.float64()),
                (C.MODEL_URI, pa.string()),
            ]
        )
        entries = []
        for s in range(0, len(rows), p.rows_per_shard):
            table = pa.Table.from_pylist(rows[s : s + p.rows_per_shard], schema=schema)
            entries.append(ctx.outputs[MAIN].write(table, f"{s // p.rows_per_shard:06d}"))
        return JobResult(entries={MAIN: entries}, metadata={"model": info})
