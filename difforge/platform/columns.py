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
#: an encoded image and what describes it: what a step that reads images down to numbers drops
ENCODED_IMAGE = IMAGE_COLUMNS[1:]

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

#: the Arrow type family each column of the vocabulary must have, where it has one
TYPES = {
    ID: "string",
    IMAGE: "binary",
    FORMAT: "string",
    WIDTH: "integer",
    HEIGHT: "integer",
    MODE: "string",
    LABEL: "integer",
    CAPTION: "string",
    SOURCE: "string",
    MODEL_URI: "string",
    REASON: "string",
}


def type_problems(schema, names) -> list[str]:
    """What is wrong with the types of `names` in an Arrow schema, against the vocabulary."""
    import pyarrow as pa

    check = {
        "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
        "integer": pa.types.is_integer,
    }
    problems = []
    for name in sorted(names):
        kind = TYPES.get(name)
        if kind is None or name not in schema.names:
            continue
        typ = schema.field(name).type
        if not (pa.types.is_null(typ) or check[kind](typ)):
            what = DESCRIPTIONS.get(name, name)
            problems.append(
                f"column '{name}' holds {typ} values, where a{'n' if kind[0] in 'aeiou' else ''} {kind} ({what}) is expected"
            )
    return problems
