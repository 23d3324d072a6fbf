"""`caption.vlm`: captions written by an image-to-text model, the recaptioning step of
text-to-image data (DALL-E 3 trained on synthetic captions: Betker et al., "Improving Image
Generation with Better Captions", 2023).

The model is any `transformers` image-to-text model with its processor, named as every model
is (a local folder, s3://..., models:/..., or a hub id such as
`Salesforce/blip-image-captioning-base`, `microsoft/git-base` or
`HuggingFaceTB/SmolVLM-256M-Instruct`): a captioner (BLIP, GIT, a vision encoder-decoder) or
an instruction-following VLM. `prompt` is the text the model continues, filled per row from
its columns (`{caption}`, `{label}`, `{class}`): "a photograph of" for a captioner, or an
instruction ("Describe the image in one sentence. Its old caption: {caption}"). Generation is
greedy by default (the same image, the same caption); with `temperature` > 0 it samples, seeded
by `seed` and each batch's first id, so a rerun with the same batches writes the same
captions. The new caption goes to `caption`, the one it replaces to `original_caption`."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

ORIGINAL = "original_caption"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="an image-to-text model and its processor: a local folder, "
        "s3://..., models:/NAME/VERSION, or a hub id "
        "(Salesforce/blip-image-captioning-base)"
    )
    prompt: str | None = Field(
        None,
        description="text the model continues, with {column} "
        "fields filled from each row ({caption}, {label}, {class})",
    )
    max_new_tokens: int = Field(40, ge=1, le=1024)
    num_beams: int = Field(1, ge=1, description="beam search width (1: greedy)")
    temperature: float = Field(0.0, ge=0, description="> 0: sample at this temperature")
    seed: int = 0

    @field_validator("prompt")
    @classmethod
    def _plain_fields(cls, prompt: str | None) -> str | None:
        for _, name, spec, conversion in string.Formatter().parse(prompt or ""):
            if name is not None and (not name.isidentifier() or spec or conversion):
                raise ValueError(
                    f"field {{{name}}}: fields are plain column names, as {{caption}} or {{label}}"
                )
        return prompt


class CaptionVLM(MapOperator):
    """Captions from an image-to-text model (BLIP, GIT, a VLM) with a prompt template; the
    original caption kept as `original_caption`."""

    name = "caption.vlm"
    version = 1
    Params = Params
    stateful = True
    resources = Resources(batch_size=16, num_gpus="auto")
    gpus_when_available = 1.0

    def columns(self) -> Columns:
        fields = {n for _, n, _, _ in string.Formatter().parse(self.params.prompt or "") if n}
        reads = {C.ID, C.IMAGE} | {C.LABEL if f == "class" else f for f in fields}
        return Columns(reads=reads, writes={C.CAPTION}, renames={C.CAPTION: ORIGINAL})

    def external_state(self) -> dict[str, str] | None:
        """The model, pinned (`resolve.pinned_identity`): other weights caption anew."""
        from difforge.models.resolve import pinned_identity

        return pinned_identity(self.params.model, "captioning model")

    def setup(self, ctx) -> None:
        from difforge.models.resolve import resolve

        self.device, _ = ctx.torch_device()
        self.model, self.processor = load_captioner(
            resolve(self.params.model, "captioning model"), self.device
        )
        self.classes = ctx.metadata(0).get("classes")

    def prompts(self, batch: pa.Table) -> list[str] | None:
        if not self.params.prompt:
            return None
        fields = {n for _, n, _, _ in string.Formatter().parse(self.params.prompt) if n}
        wanted = fields | ({C.LABEL} if "class" in fields else set())
        rows = batch.select([f for f in wanted if f in batch.column_names]).to_pylist()
        out = []
        for row in rows:
            if "class" in fields:
                label = row.get(C.LABEL)
                row["class"] = self.classes[label] if self.classes and label is not None else label
            out.append(
                self.params.prompt.format_map({k: "" if v is None else v for k, v in row.items()})
            )
        return out

    def process(self, batch: pa.Table) -> pa.Table:
        import hashlib

        import pyarrow as pa
        import torch

        from difforge.platform.imaging import decode

        p = self.params
        images = [decode(b).convert("RGB") for b in batch.column(C.IMAGE).to_pylist()]
        prompts = self.prompts(batch)
        kwargs = {"images": images, "return_tensors": "pt"}
        if prompts is not None:
            kwargs.update(text=prompts, padding=True)
        inputs = self.processor(**kwargs).to(self.device)
        sample = p.temperature > 0
        if sample:
            first = str(batch.column(C.ID)[0].as_py()).encode()
            torch.manual_seed(p.seed * 1_000_003 + int(hashlib.sha256(first).hexdigest()[:8], 16))
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=p.max_new_tokens,
                num_beams=p.num_beams,
                do_sample=sample,
                **({"temperature": p.temperature} if sample else {}),
            )
        captions = self.decode(out, inputs, prompts)
        table = batch
        if C.CAPTION in batch.column_names:
            i = batch.column_names.index(C.CAPTION)
            table = batch.set_column(i, ORIGINAL, batch.column(C.CAPTION))
        return table.append_column(C.CAPTION, pa.array(captions, pa.string()))

    def decode(self, out, inputs, prompts: list[str] | None) -> list[str]:
        """The generated text alone: where the output starts with the prompt's tokens (a
        decoder-only model's does), they are cut; else a leading copy of the prompt's text."""
        import torch

        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if (
            ids is not None
            and out.shape[1] >= ids.shape[1]
            and torch.equal(out[:, : ids.shape[1]], ids)
        ):
            out = out[:, ids.shape[1] :]
            prompts = None
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        texts = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        if prompts is not None:
            texts = [
                t[len(q.strip()) :].strip() if t.startswith(q.strip()) else t
                for t, q in zip(texts, prompts, strict=True)
            ]
        return texts

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        p = self.params
        return {
            "captions": {
                **(self.external_state() or {}),
                "prompt": p.prompt,
                "max_new_tokens": p.max_new_tokens,
                "num_beams": p.num_beams,
                "temperature": p.temperature,
                "seed": p.seed,
            }
        }


class _Processor:
    """An image processor and a tokenizer as one processor (a vision encoder-decoder folder
    has the two without a processor of its own)."""

    def __init__(self, images, tokenizer):
        self.image_processor, self.tokenizer = images, tokenizer

    def __call__(self, images, text=None, return_tensors="pt", padding=False):
        out = self.image_processor(images=images, return_tensors=return_tensors)
        if text is not None:
            out.update(self.tokenizer(text, return_tensors=return_tensors, padding=padding))
        return out


def load_captioner(path: str, device: str = "cpu"):
    """(model, processor) of an image-to-text model folder, or a clear error."""
    import transformers

    model = None
    for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(path)
            break
        except (OSError, ValueError):
            continue
    if model is None:
        try:
            model = transformers.VisionEncoderDecoderModel.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise DifforgeError(
                f"caption.vlm: {path} is not an image-to-text model ({type(exc).__name__}: {exc})"
            ) from None
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        processor = None
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        try:  # a folder with the two parts and no processor of its own
            processor = _Processor(
                transformers.AutoImageProcessor.from_pretrained(path),
                transformers.AutoTokenizer.from_pretrained(path),
            )
        except (OSError, ValueError) as exc:
            raise DifforgeError(
                f"caption.vlm: {path} has no image processor and tokenizer "
                f"({type(exc).__name__}: {exc})"
            ) from None
    return model.to(device).eval(), processor
