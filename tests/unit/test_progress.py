"""A training job's progress line, read from the metric its rank 0 logs."""

from __future__ import annotations

from difforge.platform.progress import MetricProgress


class History:
    """What MetricProgress reads of a step's MLflow run: (step, value) points of a metric."""

    def __init__(self, points: dict[str, list[tuple[int, float]]]):
        self.points = points

    def metric_history(self, name: str) -> list[tuple[int, float]]:
        return self.points.get(name, [])


def test_epochs_logged_from_zero_count_to_their_total():
    """train.classifier logs accuracy at each epoch's index: 3 epochs end as 3/3 (not 2/2), and
    1 epoch as 1/1 (not "0 epochs")."""
    for epochs in (3, 1):
        log = History({"accuracy": [(e, 0.5) for e in range(epochs)]})
        with MetricProgress(log, "classifier", "accuracy", epochs, "epochs", first=0) as bar:
            pass
        assert bar.progress.line().startswith(f"classifier: {epochs}/{epochs} epochs in ")


def test_optimizer_steps_count_as_logged():
    log = History({"loss": [(250, 0.2), (500, 0.1)], "running_loss": [(512, 0.1)]})
    with MetricProgress(log, "model", "loss", 1000, "steps") as bar:
        pass
    assert bar.progress.line().startswith("model: 512/1000 steps in ")
