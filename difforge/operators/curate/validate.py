"""`curate.validate`: decode every image; what fails goes to `rejects` with a reason."""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, FilterOperator, StepOutcome, Verdicts
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext
    from difforge.platform.events import StepLog

# Reasons, in the order they are checked. Cheap header checks come before any decoding, so a
# decompression bomb is refused from its header alone.
REASONS = (
    "zero_bytes",
    "not_an_image",
    "too_large",
    "too_small",
    "bad_aspect",
    "unsupported_mode",
    "truncated",
    "corrupt",
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(
        89_478_485, ge=1, description="width x height above which an image is refused unread"
    )
    min_size: int = Field(1, ge=1, description="smallest width and height accepted")
    max_aspect_ratio: float | None = Field(
        None, ge=1, description="largest long side / short side accepted"
    )
    modes: list[str] = Field(
        ["1", "L", "LA", "P", "RGB", "RGBA"], description="PIL modes accepted as they are"
    )
    convert_to: Literal["L", "RGB"] | None = Field(
        None, description="convert images in other modes to this one (re-encoded as PNG)"
    )
    max_reject_fraction: float = Field(
        0.5, ge=0, le=1, description="fail the step if more than this fraction is rejected"
    )


def check(data: bytes | None, p: Params) -> tuple[str | None, str, Any]:
    """(reason or None, detail, decoded image or None) for one image's bytes."""
    from PIL import Image, UnidentifiedImageError

    from difforge.platform.imaging import remember_decoded

    if not data:
        return "zero_bytes", "empty file", None
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, ValueError) as exc:
        # PIL names the in-memory file by its address: not part of a reproducible dataset
        return "not_an_image", re.sub(r" <_io\.BytesIO object at \w+>", "", str(exc))[:200], None
    except Image.DecompressionBombError as exc:
        return "too_large", str(exc)[:200], None
    except OSError as exc:  # PIL reads some headers past the cut of a truncated file
        reason = "truncated" if "truncat" in str(exc).lower() else "not_an_image"
        return reason, str(exc)[:200], None
    w, h = img.size
    if w * h > p.max_pixels:
        return "too_large", f"{w}x{h} is more than {p.max_pixels} pixels", None
    if min(w, h) < p.min_size:
        return "too_small", f"{w}x{h} is smaller than {p.min_size}", None
    if p.max_aspect_ratio and max(w, h) / min(w, h) > p.max_aspect_ratio:
        return "bad_aspect", f"{w}x{h} exceeds aspect ratio {p.max_aspect_ratio}", None
    if img.mode not in p.modes and p.convert_to is None:
        return "unsupported_mode", f"mode {img.mode} (accepted: {', '.join(p.modes)})", None
    try:
        img.load()
    except OSError as exc:
        reason = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        return reason, str(exc)[:200], None
    except Exception as exc:  # any other decoder failure is a property of the file
        return "corrupt", f"{type(exc).__name__}: {exc}"[:200], None
    remember_decoded(data, img)
    return None, "", img


class Validate(FilterOperator):
    """Decodes every image; bad ones go to `rejects` with a reason and their original bytes."""

    name = "curate.validate"
    version = 2
    Params = Params
    resources = Resources(batch_size=1024)

    def columns(self) -> Columns:
        return Columns(reads={C.ID, C.IMAGE}, writes=C.IMAGE_COLUMNS)

    def __init__(self, params):
        super().__init__(params)
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # our own max_pixels check runs first, from the header

    def judge(self, batch: pa.Table) -> Verdicts:
        import pyarrow as pa

        from difforge.platform.imaging import encode_png

        p = self.params
        reasons, details = [], []
        images, fmts, widths, heights, modes = [], [], [], [], []
        for data in batch.column(C.IMAGE).to_pylist():
            reason, detail, img = check(data, p)
            reasons.append(reason)
            details.append(detail if reason is not None else None)
            if reason is not None:
                continue
            fmt = (img.format or "").lower() or None
            if p.convert_to and img.mode != p.convert_to:
                img = img.convert(p.convert_to)
                data, fmt = encode_png(img), "png"
            images.append(data)
            fmts.append(fmt)
            widths.append(img.width)
            heights.append(img.height)
            modes.append(img.mode)
        replace = {
            C.IMAGE: pa.array(images, pa.binary()),
            C.FORMAT: pa.array(fmts, pa.string()),
            C.WIDTH: pa.array(widths, pa.int32()),
            C.HEIGHT: pa.array(heights, pa.int32()),
            C.MODE: pa.array(modes, pa.string()),
        }
        return Verdicts(reasons, details, replace)

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        from difforge.platform.summaries import value_counts

        rejects = outcome.sides["rejects"]
        counts = value_counts(rejects.iter_batches(columns=[C.REASON]), C.REASON)
        if rejects.num_rows:
            log_reject_grid(rejects, ctx.log)
        total = outcome.rows_in or 0
        fraction = rejects.num_rows / total if total else 0.0
        metrics = {f"rejected_{r}": float(counts.get(r, 0)) for r in REASONS}
        metrics["rejected_fraction"] = fraction
        if fraction > self.params.max_reject_fraction:
            top = ", ".join(f"{r}: {n}" for r, n in counts.most_common(3))
            raise DifforgeError(
                f"curate.validate rejected {rejects.num_rows} of {total} images "
                f"({fraction:.0%}, more than max_reject_fraction={self.params.max_reject_fraction}"
                f"; {top}). The rejects, with reasons and original bytes, are at {rejects.uri}"
            )
        return metrics


def log_reject_grid(rejects, step_log: StepLog, n: int = 32) -> None:
    """A grid of rejected images, each captioned with its reason, as an MLflow artifact."""
    from difforge.platform.show import captioned_grid

    table = next(rejects.iter_batches(columns=[C.IMAGE, C.REASON], batch_size=n), None)
    if table is None:
        return
    items = list(
        zip(table.column(C.IMAGE).to_pylist(), table.column(C.REASON).to_pylist(), strict=True)
    )
    step_log.log_image(captioned_grid(items), "rejects.png")
