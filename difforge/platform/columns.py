"""The shared column vocabulary. Operators declare what they read and write in these names."""

from __future__ import annotations

ID = "id"  # stable row identity, a string; nothing depends on Ray's block layout
IMAGE = "image"  # encoded image bytes (PNG, JPEG, ...), originals kept as they are
FORMAT = "format"  # the encoding of `image`: png, jpeg, ...
WIDTH = "width"
HEIGHT = "height"
MODE = "mode"  # PIL mode: L, RGB, RGBA, ...
LABEL = "label"  # class index, int64
CAPTION = "caption"
SOURCE = "source"  # where a row came from (a file path or URI)
LATENT = "latent"  # VAE latent, a fixed-shape tensor
COND_EMBEDDING = "cond_embedding"
MODEL_URI = "model_uri"  # a job operator's artifact folder
REASON = "reason"  # why a row was rejected

IMAGE_COLUMNS = (ID, IMAGE, FORMAT, WIDTH, HEIGHT, MODE)

DESCRIPTIONS = {
    ID: "stable row id (string)",
    IMAGE: "encoded image bytes",
    FORMAT: "image encoding (png, jpeg, ...)",
    WIDTH: "image width in pixels",
    HEIGHT: "image height in pixels",
    MODE: "PIL image mode",
    LABEL: "class index",
    CAPTION: "text caption",
    SOURCE: "origin of the row",
    LATENT: "VAE latent tensor",
    COND_EMBEDDING: "condition embedding",
    MODEL_URI: "folder of a trained model",
    REASON: "why a row was rejected",
}
