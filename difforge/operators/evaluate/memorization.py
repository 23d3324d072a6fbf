"""`evaluate.memorization`: did the model copy its training data?

For each generated image, the distance to its nearest training image and the ratio of that
distance to the distance to the second nearest. A sample much closer to one training image than
to any other (a small ratio) is a likely copy, the relative-distance test of Carlini et al.
("Extracting Training Data from Diffusion Models", 2023), which is robust where absolute
distances are not (plain backgrounds are close to everything). Distances are Euclidean, in
pixel space (images scaled to [-1, 1]) or on a classifier's penultimate features. Reports the
fraction of samples under `ratio_threshold`, writes one row per sample (nearest training id,
distance, ratio, flag), and logs the closest pairs side by side so a user sees what was copied.

Both sides' features are computed by the feature pass (`difforge.models.features`); the search
runs in parallel tasks, each holding one shard of samples and streaming the training features
past it, so no process holds either dataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.features import FEATURES
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import MAIN, Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

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


class _Nearest:
    """Each sample of a batch: its nearest and second-nearest training rows, streamed."""

    def __init__(self, train: list[dict], chunk: int, threshold: float):
        self.train, self.chunk, self.threshold = train, chunk, threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        from difforge.platform.parallel import open_parquet
        from difforge.platform.tensors import to_numpy

        q = to_numpy(batch.column(FEATURES)).reshape(batch.num_rows, -1)
        best = np.full((len(q), 2), np.inf)
        best_ids = np.full((len(q), 2), "", dtype=object)
        for shard in self.train:
            for rb in open_parquet(shard).iter_batches(batch_size=4096, columns=[C.ID, FEATURES]):
                t = to_numpy(rb.column(1)).reshape(rb.num_rows, -1)
                idx, dist = two_nearest(q, t, self.chunk)
                ids = np.asarray(rb.column(0).to_pylist(), dtype=object)
                d = np.concatenate([best, dist**2], 1)
                cand = np.concatenate([best_ids, ids[idx]], 1)
                order = np.argsort(d, axis=1, kind="stable")[:, :2]
                best = np.take_along_axis(d, order, 1)
                best_ids = np.take_along_axis(cand, order, 1)
        dist = np.sqrt(best)
        ratio = dist[:, 0] / np.maximum(dist[:, 1], 1e-12)
        return pa.table(
            {
                C.ID: batch.column(C.ID),
                "nearest_id": pa.array(best_ids[:, 0].tolist(), pa.string()),
                "distance": pa.array(dist[:, 0], pa.float64()),
                "ratio": pa.array(ratio, pa.float64()),
                "memorized": pa.array(ratio < self.threshold, pa.bool_()),
            }
        )


class Memorization(JobOperator):
    """Nearest training image of each sample, the nearest/second-nearest ratio, copies flagged."""

    name = "evaluate.memorization"
    # 2: features by the feature pass, the search in parallel tasks (same results)
    version = 2
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (2, 3)
    resources = Resources(num_cpus=1)

    def columns(self) -> Columns:
        written = {C.ID, "nearest_id", "distance", "ratio", "memorized"}
        return Columns(reads={C.ID, C.IMAGE}, writes=written, keeps_input=False)

    def run(self, ctx: JobContext) -> JobResult:
        import numpy as np
        import pyarrow.parquet as pq

        from difforge.models.features import FeatureSpec, classifier_spec, features_of, same_size
        from difforge.models.resolve import model_of
        from difforge.platform.datasets import join, url_to_fs
        from difforge.platform.imaging import decode
        from difforge.platform.parallel import map_files
        from difforge.platform.show import grid

        p = self.params
        samples, train = ctx.inputs[:2]
        spec = FeatureSpec("pixels")
        if p.features == "classifier":
            if len(ctx.inputs) < 3:
                raise DifforgeError(
                    "evaluate.memorization: features 'classifier' needs a third "
                    "input, a train.classifier step"
                )
            spec = classifier_spec(model_of(ctx.inputs[2])[C.MODEL_URI])
        if train.num_rows < 2:
            raise DifforgeError("evaluate.memorization: the training input needs at least 2 images")
        same_size(samples, train, "evaluate.memorization", "samples", "training images")
        root = join(ctx.work_uri, "features")
        fake, _ = features_of(ctx, samples, spec, root, self.name)
        real, _ = features_of(ctx, train, spec, root, self.name)
        out = ctx.outputs[MAIN]
        entries = map_files(
            fake.shards(),
            _Nearest(real.shards(), p.chunk, p.ratio_threshold),
            {MAIN: out},
            p.chunk,
            columns=[C.ID, FEATURES],
        )[MAIN]
        # the summary: four small columns of the rows just written
        fs, root_path = url_to_fs(out.uri)
        parts = [
            pq.read_table(
                f"{root_path}/{e['path']}",
                filesystem=fs,
                columns=[C.ID, "nearest_id", "distance", "ratio"],
            )
            for e in entries
            if e["path"]
        ]
        ids = [i for t in parts for i in t.column(C.ID).to_pylist()]
        nearest = [i for t in parts for i in t.column("nearest_id").to_pylist()]
        dist = np.concatenate([t.column("distance").to_numpy() for t in parts] or [np.zeros(0)])
        ratio = np.concatenate([t.column("ratio").to_numpy() for t in parts] or [np.zeros(0)])
        copied = ratio < p.ratio_threshold
        metrics = {
            "memorized_fraction": float(copied.mean()) if len(copied) else 0.0,
            "memorized": float(copied.sum()),
            "nearest_distance_median": float(np.median(dist)) if len(dist) else 0.0,
            "ratio_median": float(np.median(ratio)) if len(ratio) else 0.0,
            "num_samples": float(len(ratio)),
        }
        ctx.log.log_metrics(metrics)
        if p.pairs and len(ratio):
            closest = np.argsort(ratio, kind="stable")[: p.pairs]
            shown = samples.rows_with_ids({ids[i] for i in closest}, [C.IMAGE])
            sample_png = dict(
                zip(shown.column(C.ID).to_pylist(), shown.column(C.IMAGE).to_pylist(), strict=True)
            )
            shown = train.rows_with_ids({nearest[i] for i in closest}, [C.IMAGE])
            train_png = dict(
                zip(shown.column(C.ID).to_pylist(), shown.column(C.IMAGE).to_pylist(), strict=True)
            )
            tiles = []
            for i in closest:  # each pair: the sample, then the training image it is closest to
                tiles += [decode(sample_png[ids[i]]), decode(train_png[nearest[i]])]
            canvas = grid(tiles, columns=8)
            ctx.log.log_image(
                canvas.resize((canvas.width * 3, canvas.height * 3), 0), "closest_pairs.png"
            )
        return JobResult(entries={MAIN: entries}, metadata={"memorization": metrics})
