"""`caption.template`: a caption per image from a template over what the pipeline knows of it:
its class name and attributes computed from its pixels. A text-to-image pipeline on a labelled
dataset gets captions with no captioning model and no download ("a dark pullover, centered").

Fields: `{class}` (the class name from the dataset's metadata, else the label), `{brightness}`
(dark, mid-grey, bright: the mean of the object's pixels), `{size}` (small, medium, large: the
share of the canvas it covers), `{position}` (centered or off-center: where its mass lies). The
object is the pixels brighter than the border's median, so dark-on-light images work too."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from difforge.platform import columns as C
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

FIELDS = ("class", "brightness", "size", "position")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: str = Field(
        "a {brightness} {class}, {size} and {position}", description=f"fields: {', '.join(FIELDS)}"
    )

    @field_validator("template")
    @classmethod
    def _fields(cls, template: str) -> str:
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            if name not in FIELDS or spec or conversion:
                raise ValueError(
                    f"unknown field {{{name}}}: the fields are "
                    f"{', '.join('{' + f + '}' for f in FIELDS)}"
                )
        return template


def attributes(pixels: np.ndarray) -> dict[str, str]:
    """Brightness, size and position of the object in one image (H x W or H x W x C)."""
    import numpy as np

    gray = pixels.mean(axis=2) if pixels.ndim == 3 else pixels.astype(np.float64)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    diff = np.abs(gray - background)
    mask = diff > 32
    if not mask.any():
        return {"brightness": "faint", "size": "tiny", "position": "centered"}
    value = float(gray[mask].mean())
    brightness = "dark" if value < 96 else "bright" if value > 176 else "mid-grey"
    share = float(mask.mean())
    size = "small" if share < 0.3 else "large" if share > 0.55 else "medium"
    ys, xs = np.nonzero(mask)
    w = diff[mask]
    cy, cx = float((ys * w).sum() / w.sum()), float((xs * w).sum() / w.sum())
    h, wd = gray.shape
    off = max(abs(cy - (h - 1) / 2) / h, abs(cx - (wd - 1) / 2) / wd)
    return {
        "brightness": brightness,
        "size": size,
        "position": "centered" if off < 0.08 else "off-center",
    }


class Template(MapOperator):
    """Writes `caption` from a template over each image's class name and pixel attributes."""

    name = "caption.template"
    version = 1
    Params = Params
    stateful = True
    resources = Resources(batch_size=1024)

    def columns(self) -> Columns:
        return Columns(reads={C.ID, C.IMAGE, C.LABEL}, writes={C.CAPTION})

    def setup(self, ctx) -> None:
        self.classes = ctx.input(0).metadata.get("classes") or []

    def caption(self, image: bytes, label: int) -> str:
        from difforge.platform.imaging import to_array

        name = self.classes[label] if 0 <= label < len(self.classes) else str(label)
        return self.params.template.format_map(
            {"class": name.lower(), **attributes(to_array(image))}
        )

    def process(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        captions = [
            self.caption(im, y)
            for im, y in zip(
                batch.column(C.IMAGE).to_pylist(), batch.column(C.LABEL).to_pylist(), strict=True
            )
        ]
        if C.CAPTION in batch.column_names:
            batch = batch.drop_columns([C.CAPTION])
        return batch.append_column(C.CAPTION, pa.array(captions, pa.string()))

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        return {"captions": {"template": self.params.template}}
