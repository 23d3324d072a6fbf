"""Looking at things: a committed dataset (its manifest, schema, first rows and a grid of its
images) and the plain-text tables the CLI prints."""

from __future__ import annotations

import json
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from difforge.platform.datasets import Dataset


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the head (what the CLI prints)."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def describe(ds: Dataset, rows: int = 5) -> str:
    m = ds.manifest
    lines = [
        f"dataset  {ds.uri}",
        f"rows     {m.num_rows} in {len(m.files)} file(s)",
        f"producer {json.dumps(m.producer)}",
        f"print    {m.fingerprint}",
        "schema:",
        *(f"  {c['name']}: {c['type']}" for c in m.columns),
    ]
    if m.metadata:
        lines.append(f"metadata {json.dumps(m.metadata)[:500]}")
    if rows and m.num_rows:
        head = next(ds.iter_batches(batch_size=rows)).to_pylist()[:rows]
        lines.append(f"first {len(head)} row(s):")
        for row in head:
            shown = {
                k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v) for k, v in row.items()
            }
            lines.append(f"  {json.dumps(shown, default=str)[:300]}")
    return "\n".join(lines)


def grid(images: list[Image.Image], columns: int = 8, pad: int = 2) -> Image.Image:
    """Tile images (any sizes and modes) on a white canvas, row by row."""
    from PIL import Image

    if not images:
        raise ValueError("no images to tile")
    cw = max(i.width for i in images)
    ch = max(i.height for i in images)
    cols = min(columns, len(images))
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + pad) + pad), "white")
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        canvas.paste(img.convert("RGB"), (pad + c * (cw + pad), pad + r * (ch + pad)))
    return canvas


def captioned(rows: list[tuple[str, Image.Image]], scale: int = 3) -> Image.Image:
    """Rows of images (already tiled, one row each), each with its caption above it, scaled
    up `scale` times (tiny samples stay readable)."""
    from PIL import Image, ImageDraw

    line = 14
    scaled = [(text, img.resize((img.width * scale, img.height * scale), 0)) for text, img in rows]
    width = max(max(img.width for _, img in scaled), 8 * max(len(t) for t, _ in scaled) // 1)
    height = sum(img.height + line for _, img in scaled)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for text, img in scaled:
        draw.text((2, y + 1), text, fill="black")
        canvas.paste(img.convert("RGB"), (0, y + line))
        y += img.height + line
    return canvas


def write_grid(ds: Dataset, path: str | None = None, n: int = 64, scale: int = 0) -> str:
    from difforge.platform.imaging import decode

    images = []
    for batch in ds.iter_batches(columns=["image"], batch_size=n):
        for data in batch.column("image").to_pylist():
            try:
                images.append(decode(data))
            except Exception:
                continue
            if len(images) >= n:
                break
        if len(images) >= n:
            break
    img = grid(images)
    if scale or img.width < 256:
        factor = scale or max(1, 512 // img.width)
        img = img.resize((img.width * factor, img.height * factor), 0)
    if path is None:
        path = tempfile.NamedTemporaryFile(
            prefix="difforge-grid-", suffix=".png", delete=False
        ).name
    img.save(path)
    return path


def captioned_grid(items: list[tuple[bytes | None, str]], tile: int = 96, columns: int = 8):
    """Tiles (image bytes, caption); bytes that do not decode show as a grey tile."""
    from PIL import Image, ImageDraw

    from difforge.platform.imaging import decode

    tiles = []
    for data, caption in items:
        canvas = Image.new("RGB", (tile, tile + 14), "white")
        try:
            img = decode(data).convert("RGB")
            img.thumbnail((tile, tile))
        except Exception:
            img = Image.new("RGB", (tile, tile), (190, 190, 190))
        canvas.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
        ImageDraw.Draw(canvas).text((2, tile + 1), str(caption)[:16], fill="black")
        tiles.append(canvas)
    return grid(tiles, columns=columns)


def figure(width: float, height: float):
    """A matplotlib (figure, axes) drawn off-screen, for `figure_image`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def figure_image(fig) -> Image.Image:
    """A matplotlib figure as a PIL image (to log to MLflow), the figure closed."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue()))


def log_histogram(ctx, values: np.ndarray, name: str, thresholds: dict[str, float] | None = None):
    """A histogram of `values` (with threshold lines) as `<name>_histogram.png`."""
    fig, ax = figure(5, 3)
    ax.hist(values, bins=50, color="#4c72b0")
    for label, t in (thresholds or {}).items():
        ax.axvline(t, color="#c44e52", linestyle="--", label=f"{label} {t:g}")
    if thresholds:
        ax.legend()
    ax.set_xlabel(name)
    ax.set_ylabel("rows")
    ctx.log.log_image(figure_image(fig), f"{name}_histogram.png")
