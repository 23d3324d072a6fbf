"""Semantic deduplication by embeddings, and decontamination against an evaluation set.

`curate.semantic_dedup` is SemDeDup (Abbas et al., "SemDeDup: Data-efficient learning at
web-scale through semantic deduplication", 2023, sec. 3): k-means over the image embeddings,
then within each cluster every pair whose cosine similarity is at least `threshold` (their
1 - epsilon) is a duplicate pair; of each such pair the row that ranks lower goes. The rule
here: a row is dropped when a row of its cluster that ranks above it is that similar, ranking
by `score_column` (highest first, rows without a score last) when given, then by the lowest id. Clustering confines the
quadratic comparison to a cluster: pairs split across two clusters are missed, as in the paper
(near-duplicates lie close together and rarely straddle a boundary).

`curate.decontaminate` drops (to the same `duplicates` side output) every training row whose
embedding is that similar to any row of a reference set, an evaluation split or FID's reference
images: such rows would let a model score well on images it was trained on.

It scales as the other dedup steps do (`platform.dedup`): the centroids are fitted by faiss on
a sample of at most `sample_rows` embeddings (the only embeddings the driver reads), rows are
assigned to their nearest centroid in parallel tasks, each cluster's rows are brought together
(plain tasks, one per CPU, or Ray Data's shuffle for large inputs) and compared there."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difforge.models.features import unit_embeddings
from difforge.platform import columns as C
from difforge.platform.dedup import DUPLICATES, DedupOperator, run_dedup
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from difforge.platform.context import JobContext
    from difforge.platform.operator import Columns, JobResult


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(
        0.95,
        gt=0,
        le=1,
        description="cosine similarity at or above "
        "which two rows are duplicates (SemDeDup's 1 - epsilon)",
    )
    column: str = Field("embedding", description="the embedding column (encode.image's)")
    clusters: int | None = Field(
        None,
        ge=1,
        description="k of k-means; default about the "
        "square root of the rows (clusters of about as many rows)",
    )
    sample_rows: int = Field(100_000, ge=1, description="rows the centroids are fitted on")
    iterations: int = Field(20, ge=1, description="k-means iterations")
    score_column: str | None = Field(
        None,
        description="of a duplicate pair the row with the "
        "higher score stays (ties: the lower id; no score: "
        "ranked last); default: the lower id stays",
    )
    seed: int = 0


class DecontaminateParams(Params):
    threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="cosine similarity to a reference row at or above which a training row goes",
    )

    @model_validator(mode="after")
    def _no_ranking(self):
        if self.score_column is not None:
            raise ValueError(
                "score_column: decontamination drops every training row near a "
                "reference row, whatever its score"
            )
        return self


class SemanticDedup(DedupOperator):
    """Drops semantic near-duplicates (SemDeDup): k-means on embeddings, then within clusters
    pairs above a cosine similarity."""

    name = "curate.semantic_dedup"
    version = 2  # 2: a row without a score ranks below every scored row
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (1, 1)
    resources = Resources(batch_size=4096)
    one_key_per_row = True
    grid = "semantic_duplicates.png"

    def columns(self) -> Columns:
        p = self.params
        reads = {C.ID, p.column} | ({p.score_column} if p.score_column else set())
        duplicates = {C.ID, "duplicate_of", "similarity", "cluster"}
        return Columns(reads=reads, writes=(), sides={DUPLICATES: duplicates})

    def run(self, ctx: JobContext) -> JobResult:
        self.centroids = fit_centroids(self, ctx)
        ctx.log.log_metrics({"clusters": len(self.centroids)})
        return run_dedup(self, ctx)

    def keys(self, batch: pa.Table, role: str) -> pa.Table:
        """Each row's nearest centroid is its key; its unit embedding and score travel along."""
        import numpy as np
        import pyarrow as pa

        from difforge.platform.tensors import to_column

        e = unit_embeddings(batch, self.params.column, self.name)
        _, nearest = nearest_centroids(self.centroids, e)
        p = self.params
        score = (
            batch.column(p.score_column).to_numpy(zero_copy_only=False).astype(np.float64)
            if p.score_column
            else np.zeros(len(e))
        )
        return pa.table(
            {
                C.ID: batch.column(C.ID).cast(pa.string()),
                "key": pa.array(nearest, pa.int64()),
                "role": pa.array([role] * len(e), pa.string()),
                "score": pa.array(score, pa.float64()),
                "e": to_column(e),
            }
        )

    def match(self, group: pa.Table, reference: bool) -> pa.Table:
        """In one cluster: each main row with a row ranked above it (or, against a reference,
        any reference row) at or above the threshold, and its most similar such row."""
        import numpy as np
        import pyarrow as pa

        from difforge.platform.tensors import to_numpy

        ids = np.asarray(group.column(C.ID).to_pylist(), dtype=str)
        ref = np.asarray(group.column("role").to_pylist()) == "ref"
        e = to_numpy(group.column("e"))
        score = group.column("score").to_numpy()
        main = np.flatnonzero(~ref)
        # rank 0 is kept first: the highest score (none: last), then the lowest id
        rank = np.empty(len(ids), np.int64)
        rank[np.lexsort((ids, np.nan_to_num(-score, nan=np.inf)))] = np.arange(len(ids))
        out_id, out_of, out_sim = [], [], []
        for start in range(0, len(main), 2048):  # a block of rows against the whole cluster
            rows = main[start : start + 2048]
            sim = e[rows] @ e.T
            if reference:
                sim[:, ~ref] = -np.inf
            else:  # only rows ranked above
                sim[rank[None, :] >= rank[rows, None]] = -np.inf
            best = sim.argmax(1)
            hit = sim[np.arange(len(rows)), best] >= self.params.threshold
            out_id += ids[rows[hit]].tolist()
            out_of += ids[best[hit]].tolist()
            out_sim += sim[np.arange(len(rows)), best][hit].tolist()
        return pa.table(
            {
                C.ID: pa.array(out_id, pa.string()),
                "duplicate_of": pa.array(out_of, pa.string()),
                "similarity": pa.array(out_sim, pa.float32()),
                "cluster": pa.array([group.column("key")[0].as_py()] * len(out_id), pa.int64()),
            }
        )


class Decontaminate(SemanticDedup):
    """Drops training rows near-identical to a reference set's (an evaluation split, FID's
    reference images), by embedding similarity; they go to `duplicates` with the reference id."""

    name = "curate.decontaminate"
    version = 1
    Params = DecontaminateParams
    inputs: ClassVar[tuple[int, int]] = (2, 2)
    grid = "contaminated.png"


def nearest_centroids(centroids: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, index) of each row's nearest centroid by inner product (faiss)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    sim, nearest = index.search(e, 1)
    return sim[:, 0], nearest[:, 0]


def fit_centroids(op: SemanticDedup, ctx: JobContext) -> np.ndarray:
    """Spherical k-means (faiss) on at most `sample_rows` embeddings of the inputs, read shard
    by shard: the centroids, unit vectors [k, D]."""
    import faiss
    import numpy as np

    from difforge.models.features import choose_rows
    from difforge.platform.parallel import open_parquet

    p = op.params
    rows = sum(ds.num_rows for ds in ctx.inputs)
    if not rows:
        raise DifforgeError(f"{op.name}: no rows to deduplicate")
    parts = []
    for ds in ctx.inputs:
        share = max(1, round(p.sample_rows * ds.num_rows / rows))
        take = choose_rows(ds, share, p.seed)
        for i, shard in enumerate(ds.shards()):
            if take is not None and not take[i]:
                continue
            table = open_parquet(shard).read(columns=[C.ID, p.column])
            if take is not None:
                table = table.take(take[i])
            parts.append(unit_embeddings(table, p.column, op.name))
    sample = np.concatenate(parts)
    k = p.clusters or max(1, round(math.sqrt(rows)))
    k = min(k, len(sample))
    kmeans = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=p.iterations,
        seed=p.seed,
        spherical=True,
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 30,
    )
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
