"""`curate.score`: a score per image from its embedding, for filters to threshold.

Two kinds of scorer, both reading the embedding `encode.image` wrote (no image is decoded):

- `head`: a linear or MLP head, its weights given as a file (safetensors, or a torch state
  dict). The public aesthetic and NSFW predictors over CLIP embeddings have this form: the
  LAION-5B aesthetic predictor is one linear layer over L2-normalised CLIP ViT-L/14 embeddings
  (Schuhmann et al., "LAION-5B", NeurIPS 2022 Datasets and Benchmarks, sec. 3.3), the
  "improved aesthetic predictor" five linear layers without activations between them. The
  linear layers are read in the order of their names (`layers.0.weight`, `layers.2.weight`,
  ...; dropout layers hold no weights), with `activation` between them.
- `prompts`: a zero-shot score (Radford et al., "Learning Transferable Visual Models From
  Natural Language Supervision", 2021, sec. 3.1.4): the softmax over the prompts of the cosine
  similarities times CLIP's learnt logit scale, and the score is the probability of the first
  prompt ("a photo with a watermark" against "a photo without a watermark"). The text side is
  the CLIP model that embedded the images: the embedding's manifest names it, and another model
  is refused, since its text space is not the images' one.
- `caption_column`: how well each image matches its own caption, CLIPScore's scaling
  (Hessel et al. 2021, eq. 1, as torchmetrics computes it): max(100 cos(image, caption), 0),
  the caption embedded by the same model's text side: a low score flags a caption that does
  not describe its image.

`finalize` logs the scores' histogram and their quantiles to the step's MLflow run."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext
    from difforge.platform.operator import StepOutcome


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    column: str = Field(description="the score's column (aesthetic, watermark, nsfw, ...)")
    head: str | None = Field(
        None,
        description="a linear or MLP head's weights over the "
        "embedding: a safetensors or torch state-dict file (local or URI)",
    )
    activation: Literal["none", "relu", "gelu"] = Field(
        "none", description="between a head's linear layers (LAION's aesthetic MLP: none)"
    )
    prompts: list[str] | None = Field(
        None,
        min_length=2,
        description="zero-shot: the score is the probability of the first prompt among them",
    )
    caption_column: str | None = Field(
        None, description="image-caption similarity: max(100 cos(image, this column's text), 0)"
    )
    embedding_column: str = Field("embedding", description="the embedding column it reads")

    @model_validator(mode="after")
    def _one_scorer(self):
        given = [k for k in ("head", "prompts", "caption_column") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give one scorer: `head` (a weights file), `prompts`, or "
                f"`caption_column` (given: {', '.join(given) or 'none'})"
            )
        return self


class Score(MapOperator):
    """A score per image from its embedding: a linear/MLP head (aesthetic, NSFW) or zero-shot
    prompts against the embedding model's text side."""

    name = "curate.score"
    version = 1
    Params = Params
    stateful = True
    resources = Resources(batch_size=4096)

    def columns(self) -> Columns:
        p = self.params
        reads = {C.ID, p.embedding_column} | ({p.caption_column} if p.caption_column else set())
        return Columns(reads=reads, writes={p.column})

    def external_state(self) -> dict[str, Any] | None:
        """The head's weights by their digest: other weights score anew."""
        if self.params.head is None:
            return None
        import hashlib

        from difforge.platform.datasets import url_to_fs

        fs, path = url_to_fs(self.params.head)
        if not fs.isfile(path):
            raise DifforgeError(f"{self.name}: head {self.params.head}: no such file")
        return {"head_sha256": hashlib.sha256(fs.cat_file(path)).hexdigest()}

    def setup(self, ctx) -> None:
        if self.params.head is not None:
            self.scorer = load_head(self.params.head, self.params.activation)
        else:
            meta = ctx.metadata(0).get("embedding") or {}
            if not meta.get("model"):
                raise DifforgeError(
                    f"{self.name}: prompts need the CLIP model that embedded "
                    "the images; the input has no encode.image embedding"
                )
            self.scorer = TextSide(meta["model"], self.params.prompts)

    def process(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        from difforge.models.features import unit_embeddings

        col = self.params.embedding_column
        if self.params.head is not None:  # the head sees the embedding as it was written
            from difforge.platform.tensors import to_numpy

            if col not in batch.column_names:
                unit_embeddings(batch, col, self.name)  # its clear error
            e = to_numpy(batch.column(col)).astype(np.float32).reshape(batch.num_rows, -1)
            scores = self.scorer(e)
        elif self.params.prompts is not None:
            scores = self.scorer(unit_embeddings(batch, col, self.name))
        else:
            texts = [
                "" if t is None else str(t)
                for t in batch.column(self.params.caption_column).to_pylist()
            ]
            scores = self.scorer.caption_scores(unit_embeddings(batch, col, self.name), texts)
        return batch.append_column(self.params.column, pa.array(scores, pa.float32()))

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        """The scores' histogram (logged as `<column>_histogram.png`), exact mean and
        quantiles (of every score up to `summaries.SAMPLE_LIMIT` rows, of evenly spaced ones
        beyond), read a shard at a time."""
        from difforge.platform.show import log_histogram
        from difforge.platform.summaries import numeric_summary

        c = self.params.column
        scores = numeric_summary(outcome.iter_main([c]), c, outcome.rows_out)
        if not scores.count:
            return {}
        log_histogram(ctx, scores.sample, c)
        q = scores.quantiles([0.1, 0.5, 0.9])
        return {
            f"{c}_mean": scores.mean,
            f"{c}_p10": float(q[0]),
            f"{c}_p50": float(q[1]),
            f"{c}_p90": float(q[2]),
        }


def load_head(uri: str, activation: str):
    """A callable [N, D] -> [N] from a head's weights file: its linear layers in name order."""
    import torch

    from difforge.platform.datasets import url_to_fs

    fs, path = url_to_fs(uri)
    data = fs.cat_file(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load

            state = load(data)
        else:
            import io

            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise DifforgeError(
            f"curate.score: head {uri} is not a safetensors or torch "
            f"state-dict file ({type(exc).__name__}: {exc})"
        ) from None
    weights = sorted(
        (k for k, v in state.items() if k.endswith("weight") and v.ndim == 2), key=_natural
    )
    if not weights:
        raise DifforgeError(f"curate.score: head {uri} has no linear layers")
    layers = []
    for k in weights:
        w = state[k].float()
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=f"{k[:-6]}bias" in state)
        layer.weight.data.copy_(w)
        if layer.bias is not None:
            layer.bias.data.copy_(state[f"{k[:-6]}bias"].float())
        layers.append(layer)
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        if a.out_features != b.in_features:
            raise DifforgeError(
                f"curate.score: head {uri}: a layer of {a.out_features} outputs "
                f"feeds one of {b.in_features} inputs"
            )
    if layers[-1].out_features != 1:
        raise DifforgeError(
            f"curate.score: head {uri} gives {layers[-1].out_features} outputs, not one score"
        )
    act = {"none": torch.nn.Identity, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU}[activation]
    modules: list[torch.nn.Module] = []
    for layer in layers:
        modules += [layer, act()]
    net = torch.nn.Sequential(*modules[:-1]).eval()
    width = layers[0].in_features

    def score(e: np.ndarray) -> np.ndarray:
        if e.shape[1] != width:
            raise DifforgeError(
                f"curate.score: head {uri} takes {width}-d embeddings, the "
                f"column has {e.shape[1]}: embed with the model it was made for"
            )
        with torch.no_grad():
            return net(torch.from_numpy(e)).squeeze(1).numpy()

    return score


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


class TextSide:
    """The text side of the CLIP-like model that embedded the images: zero-shot prompt
    scores (`__call__`) and image-caption similarity (`caption_scores`)."""

    def __init__(self, model_ref: str, prompts: list[str] | None = None):
        from transformers import AutoModel, AutoTokenizer

        from difforge.models.resolve import resolve

        path = resolve(model_ref, "CLIP model")
        self.model = AutoModel.from_pretrained(path).eval()
        if not (hasattr(self.model, "get_text_features") and hasattr(self.model, "logit_scale")):
            raise DifforgeError(
                f"curate.score: prompts and captions need a CLIP-like model with "
                f"a text side; the embeddings are {type(self.model).__name__}'s"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.scale = float(self.model.logit_scale.exp())
        if prompts is not None:
            self.text = self.embed(prompts)

    def embed(self, texts: list[str]):
        """Unit text embeddings [N, D] (truncated to the model's context)."""
        import torch

        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            t = self.model.get_text_features(**tokens)
            t = t if hasattr(t, "norm") else t.pooler_output
        return torch.nn.functional.normalize(t.float(), dim=-1)

    def __call__(self, e: np.ndarray):
        """softmax over the prompts of logit_scale * cos(image, prompt): the first's share."""
        import torch

        logits = self.scale * torch.from_numpy(e) @ self.text.T
        return logits.softmax(dim=-1)[:, 0].numpy()

    def caption_scores(self, e: np.ndarray, texts: list[str]):
        """max(100 cos(image, its caption), 0) per row."""
        import torch

        cos = (torch.from_numpy(e) * self.embed(texts)).sum(-1)
        return (100 * cos).clamp(min=0).numpy()
