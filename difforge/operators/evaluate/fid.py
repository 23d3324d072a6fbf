"""`evaluate.fid`: how good samples are against real images. Fréchet distance (Heusel et al.)
on the penultimate features of a `train.classifier` model (a sound fast extractor for small
data where Inception weights are absent), KID, precision and recall (k-NN manifolds,
Kynkäänniemi et al.), and the class accuracy of the samples under the classifier."""

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

    features: Literal["classifier"] = Field(
        "classifier", description="penultimate features of the third input, a train.classifier"
    )
    k: int = Field(3, ge=1, description="neighbours for precision and recall")
    max_images: int = Field(10000, ge=10, description="images used from each side")
    kid_subsets: int = Field(10, ge=1)
    kid_subset_size: int = Field(500, ge=10)
    seed: int = 0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    import numpy as np
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def kid(a: np.ndarray, b: np.ndarray, subsets: int, size: int, seed: int) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel, averaged."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d = a.shape[1]
    size = min(size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        m = size
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                    + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())  # fmt: skip
    return float(np.mean(vals))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.: a sample is 'in' a set's manifold if it lies within the k-th
    nearest-neighbour radius of some member. Precision: fakes in the real manifold; recall:
    reals in the fake manifold."""
    import numpy as np

    def dists(x, y):
        return np.sqrt(np.maximum(((x**2).sum(1)[:, None] + (y**2).sum(1)[None] - 2 * x @ y.T), 0))

    def radii(x):
        d = dists(x, x)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    r_real, r_fake = radii(real), radii(fake)
    precision = float((dists(fake, real) <= r_real[None]).any(1).mean())
    recall = float((dists(real, fake) <= r_fake[None]).any(1).mean())
    return precision, recall


def classifier_features(net, images: np.ndarray, batch: int = 512):
    import numpy as np
    import torch

    feats, preds = [], []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s : s + batch]).float().div(127.5).sub(1.0)
            f = net.features(x)
            feats.append(f.numpy())
            preds.append(net.head(f).argmax(1).numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(preds)


class FID(JobOperator):
    """Fréchet distance, KID, precision/recall and class accuracy of samples against real data."""

    name = "evaluate.fid"
    version = 1
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (3, 3)
    reads = (C.ID, C.IMAGE)
    resources = Resources(num_cpus=1)

    @classmethod
    def output_columns(cls, params, input_columns):
        return {C.ID, "fid", "kid", "precision", "recall", "class_accuracy", "num_samples"}

    def run(self, ctx: JobContext) -> JobResult:
        import numpy as np
        import pyarrow as pa

        from difforge.operators.train.classifier import load_classifier, load_images

        p = self.params
        samples, reference, clf = ctx.inputs
        model = clf.to_arrow().to_pylist()[0]
        if model.get("kind") != "classifier":
            raise DifforgeError("evaluate.fid: the third input must be a train.classifier step")
        net, config = load_classifier(model[C.MODEL_URI])
        mode = "L" if config["in_channels"] == 1 else "RGB"
        fake, labels, _ = load_images(
            samples.file_uris(), mode, with_labels=C.LABEL in samples.manifest.column_names
        )
        real, _, _ = load_images(reference.file_uris(), mode, with_labels=False)
        rng = np.random.default_rng(p.seed)
        if len(fake) > p.max_images:
            keep = rng.choice(len(fake), p.max_images, replace=False)
            fake, labels = fake[keep], (labels[keep] if labels is not None else None)
        if len(real) > p.max_images:
            real = real[rng.choice(len(real), p.max_images, replace=False)]
        if fake.shape[1:] != real.shape[1:]:
            raise DifforgeError(f"evaluate.fid: samples are {fake.shape[1:]}, references "
                                f"{real.shape[1:]}: resize one to the other first")  # fmt: skip
        f_fake, pred = classifier_features(net, fake)
        f_real, _ = classifier_features(net, real)
        metrics: dict[str, Any] = {
            "fid": frechet_distance(f_real, f_fake),
            "kid": kid(f_real, f_fake, p.kid_subsets, p.kid_subset_size, p.seed),
            "num_samples": len(fake),
        }
        n_pr = min(len(f_real), len(f_fake), 5000)
        metrics["precision"], metrics["recall"] = precision_recall(
            f_real[:n_pr], f_fake[:n_pr], p.k
        )
        per_class = {}
        if labels is not None and (labels >= 0).all():
            metrics["class_accuracy"] = float((pred == labels).mean())
            for c in np.unique(labels):
                per_class[f"class_accuracy_{int(c)}"] = float((pred[labels == c] == c).mean())
        else:
            metrics["class_accuracy"] = float("nan")
        ctx.tracker.log_metrics({**metrics, **per_class})
        table = pa.table({C.ID: ["metrics"], **{k: [float(v)] for k, v in metrics.items()}})
        return JobResult(table, metadata={"evaluation": {**metrics, **per_class}})
