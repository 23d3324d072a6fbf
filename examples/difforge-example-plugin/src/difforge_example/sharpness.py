"""`example.sharpness`: scores each image's sharpness, the variance of its Laplacian (a blurred
or flat image scores low; a filter such as `curate.filter` with `min_score` can then drop them).

A model-holding map (`ModelMap`): `load` builds the model once per actor of the step's actor
pool (here a fixed 3x3 Laplacian convolution in torch, placed on the actor's GPU when it has
one), and `process` uses it, `self.model`, on each batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.imaging import decode
from difforge.platform.operator import Columns, ModelMap
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in YAML is an error

    column: str = Field("sharpness", description="the column the score goes to")


class Sharpness(ModelMap):
    """Scores sharpness: the variance of each image's Laplacian, on its grey levels (0-255)."""

    name = "example.sharpness"
    version = 1  # bump when what it writes changes: its steps then recompute
    Params = Params
    resources = Resources(batch_size=256)

    def columns(self) -> Columns:
        return Columns(reads={C.ID, C.IMAGE}, writes={self.params.column})

    def load(self, ctx) -> Any:
        import torch

        device, _ = ctx.torch_device()
        laplacian = torch.nn.Conv2d(1, 1, 3, bias=False)
        with torch.no_grad():
            laplacian.weight.copy_(torch.tensor([[[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]]))
        return laplacian.to(device).eval()

    def process(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import pyarrow as pa
        import torch

        device = next(self.model.parameters()).device
        scores: list[float | None] = []
        for data in batch.column(C.IMAGE).to_pylist():
            try:
                grey = np.asarray(decode(data).convert("L"), np.float32)
            except Exception:  # an undecodable image scores nothing, never fails the step
                scores.append(None)
                continue
            x = torch.from_numpy(grey)[None, None].to(device)
            with torch.no_grad():
                scores.append(float(self.model(x).var()) if min(grey.shape) >= 3 else 0.0)
        return batch.append_column(self.params.column, pa.array(scores, pa.float64()))
