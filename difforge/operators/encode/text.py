"""`encode.text`: captions to `cond_embedding` with a configured transformers text encoder
(CLIP, T5, BERT-like) loaded from a folder, an s3:// URI or a hub id."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.resolve import resolve
from difforge.platform import columns as C
from difforge.platform.operator import MapOperator
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="text encoder: a local folder, an s3:// URI or a hub id")
    max_length: int = Field(77, ge=1, description="tokens per caption (padded / truncated)")
    pooling: Literal["sequence", "pooled", "mean"] = Field(
        "sequence",
        description="sequence: [max_length, dim] for cross-attention; pooled or "
        "mean: one [dim] vector",  # fmt: skip
    )
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class EncodeText(MapOperator):
    """Encodes captions with a transformers text encoder into `cond_embedding`."""

    name = "encode.text"
    version = 1
    Params = Params
    stateful = True
    reads = (C.ID, C.CAPTION)
    writes = (C.COND_EMBEDDING,)
    resources = Resources(batch_size=256, num_gpus="auto")
    gpus_when_available = 0.25

    def setup(self, ctx) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve(self.params.model, "text encoder")
        self.device, dtype = ctx.torch_device(self.params.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
        # encoder-decoder models (T5): the encoder alone
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model
        self.model.to(self.device).eval()

    def embed(self, captions: list[str]):
        import torch

        tok = self.tokenizer(
            [c or "" for c in captions], padding="max_length", truncation=True,
            max_length=self.params.max_length, return_tensors="pt",
        ).to(self.device)  # fmt: skip
        with torch.no_grad():
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        hidden = out.last_hidden_state
        if self.params.pooling == "sequence":
            return hidden.float().cpu().numpy()
        if self.params.pooling == "pooled" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output.float().cpu().numpy()
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()

    def process(self, batch: pa.Table) -> pa.Table:
        from difforge.platform.tensors import to_column

        z = self.embed(batch.column(C.CAPTION).to_pylist())
        return batch.append_column(C.COND_EMBEDDING, to_column(z.astype("float32")))

    def metadata(self) -> dict[str, Any]:
        return {"text_encoder": self.params.model_dump()}
