"""`evaluate.linear_probe`: how much of the labels a feature column carries, read by a linear
classifier (multinomial logistic regression on standardised features, scikit-learn's L-BFGS),
the standard probe of representation learning (e.g. Xiang et al. 2023 for diffusion
features).

Rows are split by id hash into training and held-out rows (or a second input is the held-out
set); the probe is fitted on growing fractions of the training rows, and each point of that
learning curve (training rows, training and held-out accuracy) is a row of the output, a metric
(step = training rows) and a point of `learning_curve.png`. `shuffle_labels: true` fits the same
probe on labels permuted among the training rows: the control every probe result needs (a probe
that does as well on shuffled labels reads noise, not the features). The features are read into
the driver (`max_rows` caps them, chosen by id hash): 100,000 rows of 512 floats are 200 MB."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from difforge.models.features import FEATURES
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.ids import id_fraction, id_hash
from difforge.platform.operator import Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    from difforge.platform.context import JobContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    column: str = Field(FEATURES, description="the feature column (a fixed-shape tensor)")
    label_column: str = C.LABEL
    eval_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="held out by id hash, unless a second input is the held-out set",
    )
    fractions: list[float] = Field(
        [0.1, 0.25, 0.5, 1.0],
        min_length=1,
        description="the learning curve: fractions of training rows",
    )
    C: float = Field(1.0, gt=0, description="inverse L2 regularisation strength")
    max_iter: int = Field(1000, ge=10)
    max_rows: int = Field(200_000, ge=10, description="rows read from each input at most")
    shuffle_labels: bool = Field(
        False, description="the control: labels permuted among the training rows"
    )
    seed: int = 0


class LinearProbe(JobOperator):
    """A linear classifier on a feature column against labels, with its learning curve."""

    name = "evaluate.linear_probe"
    report_metrics = ("accuracy",)
    version = 1
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (1, 2)
    resources = Resources(num_cpus=1)

    def columns(self) -> Columns:
        reads = {C.ID, self.params.column, self.params.label_column}
        figures = {C.ID, "train_rows", "train_accuracy", "eval_accuracy"}
        return Columns(reads=reads, writes=figures, keeps_input=False)

    def _read(self, ds):
        import numpy as np

        from difforge.platform.tensors import to_numpy

        p = self.params
        if p.column not in ds.manifest.column_names:
            raise DifforgeError(f"{self.name}: {ds.uri} has no column '{p.column}'")
        ids, xs, ys = [], [], []
        for batch in ds.iter_batches(columns=[C.ID, p.column, p.label_column]):
            ids += batch.column(C.ID).to_pylist()
            xs.append(to_numpy(batch.column(p.column)).reshape(batch.num_rows, -1))
            ys.append(batch.column(p.label_column).to_numpy())
        x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.int64)
        if len(ids) > p.max_rows:  # a subset chosen by id hash, whatever the order
            keep = id_fraction(ids, p.max_rows / len(ids), f"rows:{p.seed}")
            ids, x, y = [i for i, k in zip(ids, keep, strict=True) if k], x[keep], y[keep]
        return ids, x, y

    def run(self, ctx: JobContext) -> JobResult:
        import numpy as np
        import pyarrow as pa
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        p = self.params
        ids, x, y = self._read(ctx.inputs[0])
        if len(ctx.inputs) > 1:
            _, x_eval, y_eval = self._read(ctx.inputs[1])
            x_train, y_train, train_ids = x, y, ids
        else:
            out = id_fraction(ids, p.eval_fraction, f"eval:{p.seed}")
            x_train, y_train, x_eval, y_eval = x[~out], y[~out], x[out], y[out]
            train_ids = [i for i, o in zip(ids, out, strict=True) if not o]
        if len(np.unique(y_train)) < 2 or not len(y_eval):
            raise DifforgeError(
                f"{self.name}: needs training rows of two classes or more and held-out rows"
            )
        rng = np.random.default_rng(p.seed)
        if p.shuffle_labels:
            y_train = rng.permutation(y_train)
        scaler = StandardScaler().fit(x_train)
        x_train, x_eval = scaler.transform(x_train), scaler.transform(x_eval)
        # growing prefixes of one fixed order of the training rows (by id hash)
        order = np.argsort([id_hash(i, f"order:{p.seed}") for i in train_ids])
        rows, figures = [], []
        for fraction in sorted(set(p.fractions)):
            n = max(2, int(round(fraction * len(order))))
            take = order[:n]
            if len(np.unique(y_train[take])) < 2:
                continue
            probe = LogisticRegression(C=p.C, max_iter=p.max_iter)
            probe.fit(x_train[take], y_train[take])
            train_acc = float(probe.score(x_train[take], y_train[take]))
            eval_acc = float(probe.score(x_eval, y_eval))
            rows.append(
                {
                    "id": f"n{n}",
                    "train_rows": n,
                    "train_accuracy": train_acc,
                    "eval_accuracy": eval_acc,
                }
            )
            ctx.log.log_metrics({"eval_accuracy": eval_acc, "train_accuracy": train_acc}, step=n)
            figures.append((n, eval_acc))
        if not rows:
            raise DifforgeError(
                f"{self.name}: every fraction of the training rows holds one "
                "class only: use larger fractions"
            )
        final = rows[-1]
        ctx.log.log_metrics(
            {
                "accuracy": final["eval_accuracy"],
                "eval_rows": float(len(y_eval)),
                "chance": float(np.bincount(y_eval).max() / len(y_eval)),
            }
        )
        ctx.log.log_image(_curve(figures, p.shuffle_labels), "learning_curve.png")
        table = pa.table(
            {
                C.ID: [r["id"] for r in rows],
                "train_rows": pa.array([r["train_rows"] for r in rows], pa.int64()),
                "train_accuracy": [r["train_accuracy"] for r in rows],
                "eval_accuracy": [r["eval_accuracy"] for r in rows],
            }
        )
        return JobResult(
            table, metadata={"probe": {"column": p.column, "shuffle_labels": p.shuffle_labels}}
        )


def _curve(points: list[tuple[int, float]], shuffled: bool):
    from difforge.platform.show import figure, figure_image

    fig, ax = figure(4, 3)
    ax.plot([n for n, _ in points], [a for _, a in points], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("training rows")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("linear probe" + (" (shuffled labels)" if shuffled else ""))
    return figure_image(fig)
