"""`encode.text`: captions to `cond_embedding` with a transformers text encoder (CLIP, T5,
BERT-like): one named by `model` (a folder, an s3:// URI, models:/... or a hub id), or the one
an earlier step built (a second input, such as `build.text_encoder`). The manifest records the
encoder and its settings; a model trained on this data samples prompts with the same."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.resolve import model_of
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="text encoder: a local folder, an s3:// URI or a hub id; or a "
        "second input (a step that wrote one)",
    )
    max_length: int = Field(77, ge=1, description="tokens per caption (padded / truncated)")
    pooling: Literal["sequence", "pooled", "mean"] = Field(
        "sequence",
        description="sequence: [max_length, dim] for cross-attention; pooled or "
        "mean: one [dim] vector",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


def settings(params: Params, inputs: list[Any]) -> dict[str, Any]:
    """What the manifest records, and what encodes: the encoder's reference and settings."""
    if params.model and len(inputs) > 1:
        raise DifforgeError("encode.text: `model` and a second input both name an encoder")
    if params.model:
        model = params.model
    elif len(inputs) > 1:
        model = model_of(inputs[1])[C.MODEL_URI]
    else:
        raise DifforgeError("encode.text needs a text encoder: params.model or a second input")
    return {**params.model_dump(), "model": model}


class EncodeText(MapOperator):
    """Encodes captions with a transformers text encoder into `cond_embedding`."""

    name = "encode.text"
    version = 2  # 2: the encoder may come from a second input; settings recorded whole
    Params = Params
    stateful = True
    inputs: ClassVar[tuple[int, int]] = (1, 2)

    def columns(self) -> Columns:
        return Columns(reads={C.ID, C.CAPTION}, writes={C.COND_EMBEDDING})

    resources = Resources(batch_size=256, num_gpus="auto")
    gpus_when_available = 0.25

    def setup(self, ctx) -> None:
        from difforge.models.text import TextEncoder

        inputs = [ctx.input(i) for i in range(len(ctx.inputs))]
        self.device, dtype = ctx.torch_device(self.params.dtype)
        self.encoder = TextEncoder(settings(self.params, inputs), self.device, dtype)

    def embed(self, captions: list[str]):
        return self.encoder.embed(captions)

    def process(self, batch: pa.Table) -> pa.Table:
        from difforge.platform.tensors import to_column

        z = self.embed(batch.column(C.CAPTION).to_pylist())
        return batch.append_column(C.COND_EMBEDDING, to_column(z.astype("float32")))

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        return {"text_encoder": settings(self.params, inputs)}
