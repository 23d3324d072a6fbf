"""`evaluate.memorization`: did the model copy its training data?

For each generated image, the distance to its nearest training image and the ratio of that
distance to the distance to the second nearest. A sample much closer to one training image than
to any other (a small ratio) is a likely copy, the relative-distance test of Carlini et al.
("Extracting Training Data from Diffusion Models", 2023), which is robust where absolute
distances are not (plain backgrounds are close to everything). Distances are Euclidean, in
pixel space (images scaled to [-1, 1]) or on a classifier's penultimate features. Reports the
fraction of samples under `ratio_threshold`, writes one row per sample (nearest training id,
distance, ratio, flag), and logs the closest pairs side by side so a user sees what was copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

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

    features: Literal["pixels", "classifier"] = Field(
        "pixels",
        description="pixels, or the penultimate features of a third input (train.classifier)",
    )
    ratio_threshold: float = Field(
        1 / 3,
        gt=0,
        le=1,
        description="nearest / second-nearest distance under which a sample is a copy",
    )
    pairs: int = Field(16, ge=0, description="closest pairs logged as an image")
    chunk: int = Field(512, ge=1, description="samples compared at once (memory: chunk x train)")


def two_nearest(queries: np.ndarray, train: np.ndarray, chunk: int = 512):
    """Indices and Euclidean distances of each query's nearest and second-nearest rows of
    `train`, computed in chunks so memory is chunk x len(train)."""
    import numpy as np

    q = queries.astype(np.float32)
    t = train.astype(np.float32)
    t_sq = (t**2).sum(1)
    idx = np.zeros((len(q), 2), np.int64)
    dist = np.zeros((len(q), 2), np.float64)
    for s in range(0, len(q), chunk):
        block = q[s : s + chunk]
        d2 = (block**2).sum(1)[:, None] + t_sq[None] - 2.0 * block @ t.T
        two = np.argpartition(d2, 1, axis=1)[:, :2]
        pair = np.take_along_axis(d2, two, 1)
        order = np.argsort(pair, axis=1)
        idx[s : s + chunk] = np.take_along_axis(two, order, 1)
        dist[s : s + chunk] = np.sqrt(np.maximum(np.take_along_axis(pair, order, 1), 0))
    return idx, dist


class Memorization(JobOperator):
    """Nearest training image of each sample, the nearest/second-nearest ratio, copies flagged."""

    name = "evaluate.memorization"
    version = 1
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (2, 3)
    reads = (C.ID, C.IMAGE)
    resources = Resources(num_cpus=1)

    @classmethod
    def output_columns(cls, params, input_columns):
        return {C.ID, "nearest_id", "distance", "ratio", "memorized"}

    def run(self, ctx: JobContext) -> JobResult:
        import numpy as np
        import pyarrow as pa

        from difforge.models.classifier import classifier_features, load_classifier, load_images
        from difforge.platform.imaging import decode
        from difforge.platform.show import grid

        p = self.params
        samples, train = ctx.inputs[:2]
        mode, net = None, None
        if p.features == "classifier":
            if len(ctx.inputs) < 3:
                raise DifforgeError("evaluate.memorization: features 'classifier' needs a third "
                                    "input, a train.classifier step")  # fmt: skip
            model = ctx.inputs[2].to_arrow().to_pylist()[0]
            net, config = load_classifier(model[C.MODEL_URI])
            mode = "L" if config["in_channels"] == 1 else "RGB"
        fake, _, fake_ids = load_images(samples.file_uris(), mode, with_labels=False)
        real, _, real_ids = load_images(train.file_uris(), mode, with_labels=False)
        if len(real) < 2:
            raise DifforgeError("evaluate.memorization: the training input needs at least 2 images")
        if fake.shape[1:] != real.shape[1:]:
            raise DifforgeError(f"evaluate.memorization: samples are {fake.shape[1:]}, training "
                                f"images {real.shape[1:]}: resize one to the other first")  # fmt: skip
        if net is not None:
            q, t = classifier_features(net, fake)[0], classifier_features(net, real)[0]
        else:
            q = fake.reshape(len(fake), -1).astype(np.float32) / 127.5 - 1.0
            t = real.reshape(len(real), -1).astype(np.float32) / 127.5 - 1.0
        idx, dist = two_nearest(q, t, p.chunk)
        ratio = dist[:, 0] / np.maximum(dist[:, 1], 1e-12)
        copied = ratio < p.ratio_threshold
        metrics = {
            "memorized_fraction": float(copied.mean()) if len(copied) else 0.0,
            "memorized": float(copied.sum()),
            "nearest_distance_median": float(np.median(dist[:, 0])) if len(dist) else 0.0,
            "ratio_median": float(np.median(ratio)) if len(ratio) else 0.0,
            "num_samples": float(len(fake)),
        }
        ctx.log.log_metrics(metrics)
        if p.pairs and len(fake):
            closest = np.argsort(ratio)[: p.pairs]
            sample_png = dict(
                zip(*self._images(samples, {fake_ids[i] for i in closest}), strict=True)
            )
            train_png = dict(
                zip(*self._images(train, {real_ids[idx[i, 0]] for i in closest}), strict=True)
            )
            tiles = []
            for i in closest:  # each pair: the sample, then the training image it is closest to
                tiles += [decode(sample_png[fake_ids[i]]), decode(train_png[real_ids[idx[i, 0]]])]
            canvas = grid(tiles, columns=8)
            ctx.log.log_image(canvas.resize((canvas.width * 3, canvas.height * 3), 0),
                                  "closest_pairs.png")  # fmt: skip
        table = pa.table({
            C.ID: pa.array(fake_ids, pa.string()),
            "nearest_id": pa.array([real_ids[j] for j in idx[:, 0]], pa.string()),
            "distance": pa.array(dist[:, 0], pa.float64()),
            "ratio": pa.array(ratio, pa.float64()),
            "memorized": pa.array(copied, pa.bool_()),
        })  # fmt: skip
        return JobResult(table, metadata={"memorization": metrics})

    @staticmethod
    def _images(ds, ids: set[str]) -> tuple[list[str], list[bytes]]:
        """The image bytes of these rows (only these are decoded for the pairs grid)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        t = ds.to_arrow(columns=[C.ID, C.IMAGE])
        t = t.filter(pc.is_in(t.column(C.ID), value_set=pa.array(sorted(ids))))
        return t.column(C.ID).to_pylist(), t.column(C.IMAGE).to_pylist()
