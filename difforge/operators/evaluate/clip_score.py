"""`evaluate.clip_score`: how well each image matches its text, by a CLIP model (Hessel et al.,
"CLIPScore: A Reference-free Evaluation Metric for Image Captioning", 2021, eq. 1, in
torchmetrics' scaling: max(100 * cos(E_image, E_text), 0)). The score itself is torchmetrics'
(the per-pair update of `torchmetrics.multimodal.CLIPScore`), on the CLIP model and processor the user
names (a local folder, s3://, models:/..., or a hub id such as `openai/clip-vit-base-patch16`),
loaded once per actor of a pool (GPUs where present).

Writes a `clip_score` column beside each sample's ids and text (the images are left out), and
logs the mean, and the mean per guidance scale where the samples have several: CLIP score against
guidance is the curve text-to-image papers draw."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext
    from difforge.platform.operator import StepOutcome

SCORE = "clip_score"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="a CLIP model and its processor (transformers format): a local folder, "
        "s3://..., models:/NAME/VERSION, or a hub id (openai/clip-vit-base-patch16)"
    )
    text_column: str = Field("prompt", description="the text each image is scored against")


class CLIPScore(MapOperator):
    """CLIP score of each image against its prompt (or caption), by a user-given CLIP model."""

    name = "evaluate.clip_score"
    version = 1
    Params = Params
    stateful = True
    resources = Resources(batch_size=64, num_gpus="auto")
    gpus_when_available = 1.0

    def columns(self) -> Columns:
        reads = {C.ID, C.IMAGE, self.params.text_column}
        return Columns(reads=reads, writes={SCORE}, drops=C.ENCODED_IMAGE)

    def external_state(self) -> dict[str, str] | None:
        """What scores, fixed at plan time (`resolve.pinned_identity`)."""
        from difforge.models.resolve import pinned_identity

        return pinned_identity(self.params.model, "CLIP model")

    def setup(self, ctx) -> None:
        from transformers import CLIPModel, CLIPProcessor

        from difforge.models.resolve import resolve

        path = resolve(self.params.model, "CLIP model")
        self.device, _ = ctx.torch_device()
        try:
            self.model = CLIPModel.from_pretrained(path).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise DifforgeError(
                f"evaluate.clip_score: {self.params.model} is not a CLIP model "
                f"with its processor ({type(exc).__name__}: {exc})"
            ) from None

    def process(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        from difforge.platform.imaging import without_image

        texts = batch.column(self.params.text_column).to_pylist()
        scores = scores_of(
            self.model, self.processor, batch.column(C.IMAGE).to_pylist(), texts, self.device
        )
        return without_image(batch).append_column(SCORE, pa.array(scores.astype(np.float32)))

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        """The mean score, and the mean at each guidance scale where there are several (sums
        and counts added up a shard at a time)."""
        from collections import Counter

        cols = [c for c in (SCORE, "guidance_scale") if c in outcome.column_names()]
        if SCORE not in cols:
            return {}
        sums, counts = Counter(), Counter()  # by guidance scale (None without the column)
        for t in outcome.iter_main(cols):
            for g in t.group_by(cols[1:]).aggregate([(SCORE, "sum"), (SCORE, "count")]).to_pylist():
                w = g.get("guidance_scale")
                sums[w] += g[f"{SCORE}_sum"] or 0.0
                counts[w] += g[f"{SCORE}_count"]
        if not counts.total():
            return {}
        metrics = {SCORE: sums.total() / counts.total()}
        if len(counts) > 1:
            for w in sorted(counts):
                metrics[f"{SCORE}_w{w:g}"] = sums[w] / counts[w]
        return metrics


class _Features:
    """A CLIP model whose `get_image_features` / `get_text_features` return the projected
    embeddings as tensors: transformers 5 returns them in an output object, which torchmetrics
    1.9.0's update does not unwrap (torchmetrics issue #3407, fixed after that release)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def to(self, device):
        self.model.to(device)
        return self

    @staticmethod
    def _tensor(out):
        return out if hasattr(out, "norm") else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def scores_of(model, processor, images: list[bytes], texts: list[Any], device="cpu"):
    """CLIP scores of encoded images against texts, by torchmetrics' own update, clipped at 0
    as its CLIPScore computes them: a numpy array, one per pair."""
    import numpy as np
    import torch
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    from difforge.platform.imaging import decode

    if any(t is None for t in texts):
        raise DifforgeError("evaluate.clip_score: a sample has no text to be scored against")
    tensors = [
        torch.from_numpy(np.asarray(decode(b).convert("RGB"))).permute(2, 0, 1).to(device)
        for b in images
    ]
    with torch.no_grad():
        score, _ = _clip_score_update(tensors, [str(t) for t in texts], _Features(model), processor)
    return score.clamp(min=0).float().cpu().numpy()
