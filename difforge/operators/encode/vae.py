"""`encode.vae`: images to latents with a diffusers `AutoencoderKL` (latent diffusion, Rombach
et al.): encoded once here, so training and sampling work in the smaller latent space."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.resolve import model_of, resolve
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pretrained: str | None = Field(
        None,
        description="a local folder, an s3:// URI or a hub id; default: the model of the "
        "second input (a train.vae step)",
    )
    subfolder: str | None = Field(None, description="e.g. 'vae' inside a pipeline repository")
    sample: Literal["mean", "posterior"] = Field(
        "mean", description="the posterior mean, or a draw from it (seeded by row id)"
    )
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on GPUs, float32 on CPUs"
    )


def resolve_model(params: Params, inputs: list[Any]) -> str:
    if params.pretrained:
        return params.pretrained
    if len(inputs) < 2:
        raise DifforgeError(
            "encode.vae needs a VAE: a second input (a train.vae step) or params.pretrained"
        )
    return model_of(inputs[1])[C.MODEL_URI]


class EncodeVAE(MapOperator):
    """Encodes images to VAE latents (`latent`, a fixed-shape tensor column) in an actor pool."""

    name = "encode.vae"
    version = 1
    Params = Params
    stateful = True
    inputs: ClassVar[tuple[int, int]] = (1, 2)
    resources = Resources(batch_size=256, num_gpus="auto")
    gpus_when_available = 0.5

    def columns(self) -> Columns:
        return Columns(reads={C.ID, C.IMAGE}, writes={C.LATENT}, drops={C.IMAGE})

    def setup(self, ctx) -> None:
        from diffusers import AutoencoderKL

        inputs = [ctx.input(i) for i in range(len(ctx.inputs))]
        uri = resolve_model(self.params, inputs)
        path = resolve(uri, "VAE")
        kwargs = {"subfolder": self.params.subfolder} if self.params.subfolder else {}
        self.device, self.dtype = ctx.torch_device(self.params.dtype)
        self.vae = AutoencoderKL.from_pretrained(path, torch_dtype=self.dtype, **kwargs)
        self.vae.to(self.device).eval()
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        self.channels = self.vae.config.in_channels

    def encode(self, images: list[bytes], ids: list[str]):
        """Latents (scaled) as a float32 numpy array [N, C, h, w]."""
        import torch

        from difforge.platform.ids import id_noise
        from difforge.platform.imaging import channels_first

        arr = channels_first(images, self.channels)
        x = torch.from_numpy(arr).to(self.device, self.dtype).div_(127.5).sub_(1.0)
        with torch.no_grad():
            dist = self.vae.encode(x).latent_dist
            if self.params.sample == "mean":
                z = dist.mean
            else:
                noise = id_noise(ids, tuple(dist.mean.shape[1:]), self.params.seed)
                noise = noise.to(dist.mean.device, dist.mean.dtype)
                z = dist.mean + dist.std * noise
        return (z.float() * self.scaling).cpu().numpy()

    def process(self, batch: pa.Table) -> pa.Table:
        from difforge.platform.tensors import to_column

        z = self.encode(batch.column(C.IMAGE).to_pylist(), batch.column(C.ID).to_pylist())
        tensor = to_column(z.astype("float32"))
        out = batch.drop_columns([C.IMAGE])
        return out.append_column(C.LATENT, tensor)

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        uri = resolve_model(self.params, inputs)
        return {
            "vae": {"uri": uri, "subfolder": self.params.subfolder, "sample": self.params.sample}
        }
