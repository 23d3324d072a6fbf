"""Text encoders: one loader and one `embed` for every place a caption or prompt becomes a
condition (`encode.text` when training data is encoded, the samplers when prompts are), so
that a model is always sampled with the encoder it was trained on, settings included.

`TextEncoderSettings` is what a dataset's manifest and a model's `difforge.json` record as
`text_encoder`: the encoder's (resolved) reference, the token length and the pooling."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.resolve import resolve


class TextEncoderSettings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="a local folder, an s3:// URI, models:/..., or a hub id")
    max_length: int = Field(77, ge=1, description="tokens per caption (padded / truncated)")
    pooling: Literal["sequence", "pooled", "mean"] = Field(
        "sequence",
        description="sequence: [max_length, dim] for cross-attention; pooled or "
        "mean: one [dim] vector",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class TextEncoder:
    """A transformers text encoder (CLIP, T5, BERT-like) and its tokenizer, loaded once."""

    def __init__(self, settings: TextEncoderSettings | dict[str, Any], device="cpu", dtype=None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.settings = TextEncoderSettings.model_validate(
            settings if isinstance(settings, dict) else settings.model_dump()
        )
        path = resolve(self.settings.model, "text encoder")
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype or torch.float32)
        if getattr(model.config, "is_encoder_decoder", False):  # T5: the encoder alone
            model = model.get_encoder()
        self.model = model.to(device).eval()

    def embed(self, texts: list[str | None]):
        """[n, max_length, dim] (pooling `sequence`) or [n, dim] float32 numpy."""
        import torch

        s = self.settings
        tok = self.tokenizer(
            [t or "" for t in texts],
            padding="max_length",
            truncation=True,
            max_length=s.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.no_grad():
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        hidden = out.last_hidden_state
        if s.pooling == "sequence":
            return hidden.float().cpu().numpy()
        if s.pooling == "pooled" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output.float().cpu().numpy()
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()
