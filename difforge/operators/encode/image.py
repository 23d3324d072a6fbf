"""`encode.image`: one embedding per image from a pretrained vision model, the vector that
embedding-based curation compares (semantic deduplication, decontamination, scoring heads).

The model is any `transformers` vision model with its image processor, named as every model
is (a local folder, s3://..., models:/NAME/VERSION, or a hub id such as
`openai/clip-vit-base-patch32`, `google/siglip-base-patch16-224` or `facebook/dinov2-small`).
A CLIP-like model gives its projected image embedding (the space its text side shares), a
backbone such as DINOv2 its pooled output (the normed class token). Vectors are L2-normalised by
default, so that a dot product is the cosine similarity. One model per actor of a pool, a GPU
each where the cluster has them; the images are preprocessed by the model's own processor
(resize, crop, normalise), recorded with the model's identity in the manifest. Which weights
embedded is part of the step's fingerprint: other weights, new embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.features import FeatureSpec
from difforge.platform import columns as C
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

EMBEDDING = "embedding"
#: where transformers keeps a processor's settings (an image processor's own file, or the
#: combined processor's)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="a transformers vision model and its image processor: a local folder, "
        "s3://..., models:/NAME/VERSION, or a hub id (openai/clip-vit-base-patch32, "
        "facebook/dinov2-small)"
    )
    normalize: bool = Field(True, description="L2-normalise each embedding (cosine = dot)")
    column: str = Field(EMBEDDING, description="the column the embeddings go to")
    keep_image: bool = Field(
        True,
        description="keep the image column (curation goes on with "
        "the images; false for an embeddings-only dataset)",
    )


class EncodeImage(MapOperator):
    """Image embeddings by a pretrained vision model (CLIP, SigLIP, DINOv2), L2-normalised."""

    name = "encode.image"
    version = 1
    Params = Params
    stateful = True
    resources = Resources(batch_size=64, num_gpus="auto")
    gpus_when_available = 1.0

    def columns(self) -> Columns:
        p = self.params  # its `column`: EMBEDDING by default
        drops = () if p.keep_image else (C.IMAGE,)
        return Columns(reads={C.ID, C.IMAGE}, writes={p.column}, drops=drops)

    def external_state(self) -> dict[str, str] | None:
        """The model, pinned (`resolve.pinned_identity`), and its preprocessing's settings:
        other weights, or another resize or normalisation, embed anew."""
        import hashlib
        import os

        from difforge.models.resolve import pinned_identity, resolve

        identity = pinned_identity(self.params.model, "image embedding model")
        if "weights_sha256" in identity:  # a folder: its processor's settings too
            h = hashlib.sha256()
            for name in PROCESSOR_FILES:
                path = os.path.join(resolve(identity["model"]), name)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        h.update(name.encode() + b"\0" + f.read())
            identity["preprocessor_sha256"] = h.hexdigest()
        return identity

    def spec(self) -> FeatureSpec:
        identity = self.external_state() or {}
        return FeatureSpec(
            "transformers",
            identity["model"],
            mode="RGB",
            digest=identity.get("weights_sha256"),
            normalize=self.params.normalize,
        )

    def setup(self, ctx) -> None:
        from difforge.models.features import Extractor
        from difforge.models.resolve import pin

        # the digest only names the weights; each actor would hash them again for nothing
        device, _ = ctx.torch_device()
        spec = FeatureSpec(
            "transformers", pin(self.params.model), mode="RGB", normalize=self.params.normalize
        )
        self.extractor = Extractor(spec, device)

    def process(self, batch: pa.Table) -> pa.Table:
        from difforge.models.features import with_features

        return with_features(batch, self.extractor, self.params.keep_image, self.params.column)

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        """The model's identity, the embedding's width and the preprocessing the images had."""
        from transformers import AutoConfig, AutoImageProcessor

        from difforge.models.resolve import resolve

        spec = self.spec()
        path = resolve(spec.model_uri, "image embedding model")
        processor = AutoImageProcessor.from_pretrained(path).to_dict()
        keep = ("size", "crop_size", "do_center_crop", "image_mean", "image_std", "resample")
        return {
            "embedding": {
                **spec.identity(),
                "column": self.params.column,
                "architecture": AutoConfig.from_pretrained(path).model_type,
                "preprocessing": {k: processor[k] for k in keep if k in processor},
            }
        }
