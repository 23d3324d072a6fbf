"""`encode.diffusion_features`: a trained denoiser's hidden features of each image, as a member
of the feature-operator family (a fixed-shape `features` column, like `encode.features`).

The image is noised to one time of the model's path (a fixed noise per image, drawn from its
id and the seed), the network runs once, unconditionally where it is conditional (the null
class of classifier-free guidance, or a text model's null condition), and the output of one
block is kept, averaged over space (`pooling: mean`) or whole (`none`). Xiang et al. ("Denoising
Diffusion Autoencoders are Unified Self-supervised Learners", ICCV 2023) and Mukhopadhyay et al.
("Diffusion Models Beat GANs on Image Classification", 2023) read such features with a linear
probe and find the best block and noise level in the middle of the network and at a small t;
`evaluate.linear_probe` is that probe.

Blocks are named as the network's modules are: `down_blocks.1`, `mid_block`, `up_blocks.0` on
UNets, `transformer_blocks.3` on DiT (`difforge ops encode.diffusion_features` lists how)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.diffusion.backbones import BlockOutput, named_block
from difforge.diffusion.recognition import Denoiser
from difforge.models.features import FEATURES
from difforge.platform import columns as C
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block: str = Field(
        "mid_block",
        description="the module whose output is kept: mid_block, "
        "down_blocks.N, up_blocks.N (UNets), transformer_blocks.N (DiT)",
    )
    t: float = Field(
        0.1,
        ge=0,
        le=1,
        description="the noise level, as a fraction of the path (0: the clean image)",
    )
    pooling: Literal["mean", "none"] = Field(
        "mean", description="mean: one vector per image (channels); none: the whole feature map"
    )
    weights: Literal["ema", "model"] = "ema"
    seed: int = 0


class DiffusionFeatures(MapOperator):
    """A trained denoiser's features of each image at one block and noise level."""

    name = "encode.diffusion_features"
    version = 1
    Params = Params
    stateful = True
    inputs: ClassVar[tuple[int, int]] = (2, 2)
    resources = Resources(batch_size=128, num_gpus="auto")
    gpus_when_available = 1.0

    def columns(self) -> Columns:
        return Columns(reads={C.ID, C.IMAGE}, writes={FEATURES}, drops=C.ENCODED_IMAGE)

    def setup(self, ctx) -> None:
        self.net = net = Denoiser(ctx.input(1), self.params.weights, ctx, self.name)
        named_block(net.model, self.params.block, self.name)  # an unknown name fails here
        self.cond = None  # the unconditional input: a text model's null, or the null class
        if net.info.get("conditioning") == "text":
            from difforge.diffusion.model_folder import text_conditioning

            self.cond = text_conditioning(net.uri, net.device)[1]
        self.null = net.info.get("null_condition")

    def features(self, images: list[bytes], ids: list[str]):
        """[n, C] (pooling mean) or [n, C, h, w] float32 numpy."""
        import torch

        from difforge.platform.ids import id_noise

        net = self.net
        x0 = net.clean(images)
        eps = id_noise(ids, tuple(x0.shape[1:]), self.params.seed).to(net.device)
        xt, t, _ = net.path.at(x0, eps, self.params.t)
        n = len(x0)
        labels = None if self.null is None else torch.full((n,), self.null, device=net.device)
        cond = None if self.cond is None else self.cond.expand(n, *self.cond.shape)
        kept = BlockOutput(net.model, self.params.block, self.name)
        try:
            net(xt, t, labels, cond)
        finally:
            kept.remove()
        f = kept.value.float()
        if net.kind == "DiTTransformer2DModel" and f.ndim == 3:  # tokens: [n, tokens, dim]
            f = f.mean(1) if self.params.pooling == "mean" else f.transpose(1, 2)
        elif self.params.pooling == "mean":
            f = f.mean(dim=(2, 3))
        return f.cpu().numpy()

    def process(self, batch: pa.Table) -> pa.Table:
        from difforge.platform.imaging import without_image
        from difforge.platform.tensors import to_column

        f = self.features(batch.column(C.IMAGE).to_pylist(), batch.column(C.ID).to_pylist())
        return without_image(batch).append_column(FEATURES, to_column(f))

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        from difforge.models.resolve import model_of

        p = self.params
        return {
            "features": {
                "kind": "diffusion",
                "model": model_of(inputs[1])[C.MODEL_URI],
                "block": p.block,
                "t": p.t,
                "pooling": p.pooling,
                "weights": p.weights,
                "seed": p.seed,
            }
        }
