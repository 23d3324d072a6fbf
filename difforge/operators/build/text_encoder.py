"""`build.text_encoder`: a small BERT-style text encoder and its WordPiece tokenizer, built
from a caption dataset's words with no download: the text encoder of a pipeline that must run
offline (tests, this project's CPU machine). Its weights are random (seeded) and stay frozen:
distinct words get distinct embeddings, and the diffusion model learns to read them (latent
diffusion trains its own text transformer from scratch, Rombach et al. sec. 4.3; this one is
not even trained). Given a real encoder, use `encode.text`'s `model` instead."""

from __future__ import annotations

import os
import re
import tempfile
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.operator import Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    from difforge.platform.context import JobContext

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(64, ge=8, description="the embedding width (cross-attention dim)")
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    max_words: int = Field(5000, ge=1, description="vocabulary: the most frequent words")
    seed: int = 0


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


class BuildTextEncoder(JobOperator):
    """Builds a small frozen BERT text encoder and tokenizer from the captions' words."""

    name = "build.text_encoder"
    version = 1
    Params = Params
    resources = Resources(num_cpus=1)

    def columns(self) -> Columns:
        written = {C.ID, C.MODEL_URI, "kind", "vocab_size", "hidden_size"}
        return Columns(reads={C.CAPTION}, writes=written, keeps_input=False)

    def run(self, ctx: JobContext) -> JobResult:
        from collections import Counter

        import pyarrow as pa
        import torch
        from transformers import BertConfig, BertModel, BertTokenizer

        p = self.params
        counts: Counter[str] = Counter()
        for table in ctx.inputs[0].iter_batches(columns=[C.CAPTION]):
            for caption in table.column(C.CAPTION).to_pylist():
                counts.update(words(caption or ""))
        vocab = SPECIAL + sorted(w for w, _ in counts.most_common(p.max_words))
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=p.hidden_size,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            intermediate_size=4 * p.hidden_size,
        )
        torch.manual_seed(p.seed)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "vocab.txt"), "w") as f:
                f.write("\n".join(vocab) + "\n")
            BertTokenizer.from_pretrained(d).save_pretrained(d)
            BertModel(config).eval().save_pretrained(d)
            ctx.publish(d, "model")
        ctx.log.log_metrics({"vocab_size": len(vocab)})
        table = pa.table(
            {
                C.ID: ["text_encoder"],
                C.MODEL_URI: [ctx.artifact("model")],
                "kind": ["text_encoder"],
                "vocab_size": pa.array([len(vocab)], pa.int64()),
                "hidden_size": pa.array([p.hidden_size], pa.int64()),
            }
        )
        info: dict[str, Any] = {
            "kind": "text_encoder",
            "vocab_size": len(vocab),
            "hidden_size": p.hidden_size,
        }
        return JobResult(table, metadata={"text_encoder_model": info})
